"""English instruction tuning of GPT-2 (124M) on Alpaca-format data (full fine-tuning).

  python -m jaxllm.convert from-hf PATH/gpt2 runs/gpt2
  python -m jaxllm.train --config configs/sft_gpt2.py --workdir runs/gpt2-alpaca \
    --config.data.path=alpaca_data.json
Packing keeps every row full; each example still only sees itself (segment ids).
"""

from configs.gpt2_124m import get_config as gpt2_config


def get_config():
  config = gpt2_config()
  config.task = "sft"
  config.init_from = "runs/gpt2"
  config.model.vocab_size = 50257
  config.data.update(source="jsonl", path="", seq_len=512, template="alpaca", packing="document",
                     tokenizer="runs/gpt2/tokenizer", val_fraction=0.02)
  config.train.update(steps=2000, batch_size=32, log_every=20, eval_every=250, eval_steps=10,
                      checkpoint_every=500, sample_prompt="Give three tips for staying healthy.",
                      sample_tokens=128, sample_temperature=0.0)
  config.optim.update(lr=2e-5, warmup_steps=50, min_lr=2e-6, weight_decay=0.0)
  return config
