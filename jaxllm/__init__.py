"""jaxllm: train language models in JAX/Flax, from a laptop CPU to TPU pods and GPU clusters."""

__version__ = "0.1.0"
