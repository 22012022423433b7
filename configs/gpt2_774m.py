"""GPT-2 large (774M): 36 layers, d_model 1280, 20 heads. FSDP over the data-parallel
devices so parameters and Adam state are split, not replicated; remat keeps activations small."""

from configs import gpt2_124m


def get_config():
  config = gpt2_124m.get_config()
  config.model.update(d_model=1280, num_layers=36, num_heads=20, remat="dots")
  config.optim.update(lr=2.5e-4, min_lr=2.5e-5)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
