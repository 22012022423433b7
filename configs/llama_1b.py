"""A LLaMA-style 1.1B model in TinyLlama's shape: 22 layers, d_model 2048, 32 query heads
sharing 4 key/value heads (grouped-query attention), SwiGLU d_ff 5632, rotary positions,
RMSNorm, no biases, untied head, context 2048. The ~1B row of the GPU benchmark."""

from configs import llama_100m


def get_config():
  config = llama_100m.get_config()
  config.data.update(seq_len=2048)
  config.model.update(d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, d_ff=5632,
                      max_seq_len=2048)
  config.train.update(batch_size=16)
  config.optim.update(lr=4e-4, min_lr=4e-5, warmup_steps=2000)
  return config
