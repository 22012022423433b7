"""Quickstart: a tiny Python code model trained from scratch in a few minutes on a laptop CPU.

The CodeParrot recipe in miniature. The corpus is the Python standard library's own
source (on every machine, no download); a byte-level BPE tokenizer is trained on it
first, then a 4-layer GPT learns to write Python. Ends with a sample completion.
"""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.data.source = "stdlib"
  config.data.max_chars = 4_000_000   # about 4 MB of Python source
  config.data.seq_len = 128
  config.data.val_fraction = 0.05
  config.data.row_shuffle = 1024   # stdlib files are long: mix rows from many of them per batch
  config.model.update(vocab_size=4096, d_model=192, num_layers=4, num_heads=6, d_ff=768,
                      max_seq_len=128)
  config.train.update(steps=500, batch_size=16, log_every=25, eval_every=100, eval_steps=8,
                      checkpoint_every=250, sample_prompt="def read_config(path):\n",
                      sample_tokens=96, sample_temperature=0.6)
  config.optim.update(lr=2e-3, warmup_steps=50, min_lr=2e-4, weight_decay=0.1)
  return config
