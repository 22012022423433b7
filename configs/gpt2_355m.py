"""GPT-2 medium (355M): 24 layers, d_model 1024, 16 heads. Same recipe as gpt2_124m."""

from configs import gpt2_124m


def get_config():
  config = gpt2_124m.get_config()
  config.model.update(d_model=1024, num_layers=24, num_heads=16)
  config.optim.update(lr=3e-4, min_lr=3e-5)
  return config
