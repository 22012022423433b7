"""The CPU benchmark shape of docs/performance.md: a 6-layer GPT-2 (d_model 384, 6 heads) at
seq 256, batch 8, vocab 8192, float32, the nanoGPT "baby GPT" scale that a laptop CPU can train.

  python -m jaxllm.bench --config configs/bench_gpt_cpu.py --compare-hf
"""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.data.seq_len = 256
  config.model.update(vocab_size=8192, d_model=384, num_layers=6, num_heads=6, max_seq_len=256,
                      dtype="float32", param_dtype="float32")
  config.train.update(steps=1000, batch_size=8)
  config.optim.update(lr=1e-3, warmup_steps=100, min_lr=1e-4, weight_decay=0.1)
  return config
