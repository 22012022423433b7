"""GPT-2 XL (1.5B): 48 layers, d_model 1600, 25 heads. FSDP across all devices; on more
than one host of 8 GPUs use mesh.data = number of hosts and mesh.fsdp = 8 so the all-gathers
stay inside a host's NVLink domain."""

from configs import gpt2_124m


def get_config():
  config = gpt2_124m.get_config()
  config.model.update(d_model=1600, num_layers=48, num_heads=25, remat="dots")
  config.train.update(batch_size=128)
  config.optim.update(lr=2e-4, min_lr=2e-5)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
