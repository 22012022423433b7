"""Instruction tuning on a laptop CPU in minutes: a tiny GPT learns the Alpaca format.

Data: data/alpaca_en_sample.json (200 Alpaca records, committed; CC BY-NC 4.0, see
data/alpaca_en_sample.md). Two stages, both on CPU (docs/sft.md has the measured run):
  1. a small base model: plain language modelling on the sample's responses
     python -m jaxllm.train --config configs/sft_tiny_cpu.py:base --workdir runs/sft-base
  2. instruction tuning from it (prompt tokens masked, responses end with EOS)
     python -m jaxllm.train --config configs/sft_tiny_cpu.py --workdir runs/sft-tiny \
       --config.init_from=runs/sft-base --config.data.tokenizer=runs/sft-base/tokenizer
The run ends by answering `train.sample_prompt`, an instruction that is not in the sample.
"""

from jaxllm.config import default_config

SAMPLE = "data/alpaca_en_sample.json"


def _model(config):
  config.model.update(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, d_ff=512,
                      max_seq_len=256, position="rotary", norm="rmsnorm", activation="swiglu",
                      use_bias=False, tie_embeddings=True)


def get_config(stage: str = "sft"):
  config = default_config()
  _model(config)
  config.train.update(log_every=20, eval_every=100, eval_steps=4, checkpoint_every=200,
                      sample_prompt="Give three tips for staying healthy.", sample_tokens=96,
                      sample_temperature=0.0)
  if stage == "base":
    config.data.update(source="jsonl", path=SAMPLE, field="output", seq_len=64, val_fraction=0.0,
                       tokenizer_vocab_size=2048)
    config.train.update(steps=600, batch_size=16, sample_prompt="")
    config.optim.update(lr=3e-3, warmup_steps=50, min_lr=3e-4, weight_decay=0.1)
    return config
  config.task = "sft"
  config.data.update(path=SAMPLE, template="alpaca", seq_len=256, val_fraction=0.1, pad_multiple=32)
  config.train.update(steps=150, batch_size=16)
  config.optim.update(lr=1e-3, warmup_steps=20, min_lr=1e-4, weight_decay=0.0)
  return config
