"""Prompt tuning on CPU: only 16 virtual-token embeddings train; the base stays frozen.

Start from the base of configs/sft_tiny_cpu.py (stage 1 there), then:
  python -m jaxllm.train --config configs/prompt_tuning_tiny_cpu.py --workdir runs/pt-tiny \
    --config.init_from=runs/sft-base --config.data.tokenizer=runs/sft-base/tokenizer
Checkpoints hold only the prompt; export it for Hugging Face PEFT with
  python -m jaxllm.convert to-peft --run runs/pt-tiny --out runs/pt-tiny-adapter
"""

from configs.sft_tiny_cpu import get_config as sft_config


def get_config():
  config = sft_config()
  config.model.num_virtual_tokens = 16
  config.train.update(trainable="^prompt/", prompt_init_text="Answer the instruction below.",
                      steps=300)
  config.optim.update(lr=3e-2, warmup_steps=20, min_lr=3e-3, weight_decay=0.0)
  return config
