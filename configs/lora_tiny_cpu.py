"""LoRA instruction tuning on CPU: rank-8 adapters on every linear layer of the tiny SFT base.

Start from the base of configs/sft_tiny_cpu.py (stage 1 there), then:
  python -m jaxllm.train --config configs/lora_tiny_cpu.py --workdir runs/lora-tiny \
    --config.init_from=runs/sft-base --config.data.tokenizer=runs/sft-base/tokenizer
Only the adapters train (model.lora_rank > 0 and train.trainable empty); checkpoints hold only
them. Generate with the unmerged adapters, export them for Hugging Face PEFT, or merge them:
  python -m jaxllm.generate --checkpoint runs/lora-tiny --prompt "..."
  python -m jaxllm.convert to-peft runs/lora-tiny runs/lora-tiny-adapter
  python -m jaxllm.convert to-hf runs/lora-tiny runs/lora-tiny-merged --merge-lora
"""

from configs.sft_tiny_cpu import get_config as sft_config


def get_config():
  config = sft_config()
  config.model.update(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05)
  config.train.update(steps=150, memory_report=True)
  # Adapters start at zero and are small: a higher rate than full fine-tuning's (1e-3 there).
  config.optim.update(lr=3e-3, warmup_steps=20, min_lr=3e-4, weight_decay=0.0)
  return config
