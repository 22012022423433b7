"""Model definitions. No training code lives here."""

from jaxllm.models.config import ModelConfig
from jaxllm.models.gpt import GPT

__all__ = ["ModelConfig", "GPT", "build_model"]


def build_model(model_config: ModelConfig, mesh=None):
  """Returns the Flax module named by `model_config.family`; with `mesh` (a jax Mesh) its
  activations are sharding-constrained by logical name (same parameters either way)."""
  if model_config.family == "gpt":
    return GPT(model_config, mesh)
  if model_config.family == "bert":
    from jaxllm.models.bert import Bert  # pylint: disable=import-outside-toplevel
    return Bert(model_config, mesh)
  raise ValueError(f"model.family={model_config.family!r} is not known; use 'gpt' or 'bert'.")


def abstract_params(model_config: ModelConfig, shardings=None, device=None):
  """The model's parameter tree as ShapeDtypeStructs (nothing allocated), unboxed.

  `shardings` (boxed abstract params -> shardings tree) places them on a mesh; otherwise
  on `device` (default: the first device) when given a sharding at all."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = build_model(model_config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  abstract = nn.meta.unbox(boxed)
  if shardings is not None:
    tree = shardings(boxed)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, tree)
  placed = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), abstract)
