"""Prompt tuning of a Hugging Face causal LM imported with `convert from-hf` (GPT-2 here; any
GPT-2/LLaMA/Bloom import works with its model section): 20 virtual tokens train, the model is
frozen and held in bf16, so a 1.3B model fits where full fine-tuning (about 16 bytes a
parameter for weights, gradients and Adam) would not.

  python -m jaxllm.convert from-hf PATH/gpt2 runs/gpt2
  python -m jaxllm.train --config configs/prompt_tuning_gpt2.py --workdir runs/gpt2-pt \
    --config.data.path=alpaca_data.json
  python -m jaxllm.convert to-peft --run runs/gpt2-pt --out runs/gpt2-pt-adapter --base-model gpt2
"""

from configs.sft_gpt2 import get_config as sft_config


def get_config():
  config = sft_config()
  config.model.num_virtual_tokens = 20
  config.data.update(packing="concat", seq_len=512, pad_multiple=64)  # virtual tokens need no packing
  config.train.update(trainable="^prompt/", prompt_init_text="Answer the following instruction well.",
                      frozen_dtype="bfloat16", steps=2000)
  config.optim.update(lr=3e-2, warmup_steps=100, min_lr=3e-3, weight_decay=0.0)
  return config
