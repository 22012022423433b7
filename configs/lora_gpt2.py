"""LoRA instruction tuning of GPT-2 (124M) imported with `convert from-hf` (any GPT-2/LLaMA/Bloom
import works): rank-16 adapters on every linear layer, the frozen base in int8 (QLoRA's idea:
one byte a weight, one scale per output channel).

  python -m jaxllm.convert from-hf PATH/gpt2 runs/gpt2
  python -m jaxllm.train --config configs/lora_gpt2.py --workdir runs/gpt2-lora \
    --config.data.path=alpaca_data.json
  python -m jaxllm.convert to-peft runs/gpt2-lora runs/gpt2-lora-adapter --base-model gpt2
"""

from configs.sft_gpt2 import get_config as sft_config


def get_config():
  config = sft_config()
  config.model.update(lora_rank=16, lora_alpha=32.0, lora_dropout=0.05)
  config.train.update(frozen_quant="int8", steps=2000)
  config.optim.update(lr=2e-4, warmup_steps=100, min_lr=2e-5, weight_decay=0.0)
  return config
