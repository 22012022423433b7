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
