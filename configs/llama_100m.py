"""A LLaMA-style ~93M model: pre-norm RMSNorm, SwiGLU, rotary positions, grouped-query
attention (10 query heads sharing 2 key/value heads), no biases, untied output head."""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.data.update(source="text", path="", seq_len=1024, tokenizer_vocab_size=32000)
  config.model.update(vocab_size=32000, d_model=640, num_layers=12, num_heads=10, num_kv_heads=2,
                      d_ff=1728, max_seq_len=2048, position="rotary", norm="rmsnorm", norm_eps=1e-5,
                      activation="swiglu", use_bias=False, tie_embeddings=False,
                      dtype="bfloat16", param_dtype="float32")
  config.train.update(steps=20000, batch_size=64, log_every=50, eval_every=1000, eval_steps=20,
                      checkpoint_every=2000)
  config.optim.update(lr=1e-3, warmup_steps=1000, min_lr=1e-4, weight_decay=0.1, b2=0.95)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config
