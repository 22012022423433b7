"""A LLaMA-2-7B-shaped model (32 layers, d_model 4096, 32 heads, SwiGLU d_ff 11008, rotary,
RMSNorm, vocab 32000) for pod-scale pretraining.

Mesh: pure FSDP over every device (weights, gradients and Adam state sharded; each step
all-gathers a layer's weights just before use). On a TPU v5p/v4 slice the ICI is fast enough
for FSDP over the whole slice. On several 8-GPU H100 hosts use mesh.data = number of hosts,
mesh.fsdp = 8 (hybrid sharding: the all-gathers stay on a host's NVLink, only the gradient
reduction crosses the network). Per-device memory: docs/performance.md.
"""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.data.update(source="text", path="", seq_len=2048, tokenizer_vocab_size=32000)
  config.model.update(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=0,
                      d_ff=11008, max_seq_len=4096, position="rotary", norm="rmsnorm", norm_eps=1e-5,
                      activation="swiglu", use_bias=False, tie_embeddings=False,
                      dtype="bfloat16", param_dtype="float32", remat="full")
  config.train.update(steps=100000, batch_size=256, log_every=50, eval_every=2000, eval_steps=20,
                      checkpoint_every=1000)
  config.optim.update(lr=3e-4, warmup_steps=2000, min_lr=3e-5, weight_decay=0.1, b2=0.95)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
