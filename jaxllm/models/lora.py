"""The blocks' linear layer: nn.DenseGeneral's product, plus a LoRA adapter and int8 weights.

`Linear` contracts x's last `num_inputs` dims with kernel [*in, *out] (+ bias), creating its
kernel and bias exactly as nn.Dense / nn.DenseGeneral do (same shapes, init and rng order,
so a model without LoRA has the same parameters as before). Two additions, both driven by
what the model is given rather than by code paths elsewhere:

- LoRA (Hu et al. 2021), when `model.lora_rank > 0` and the module's path (e.g.
  `layers/attn/query`, `layer_3/mlp/wi`) matches `model.lora_targets`: parameters
  `lora_a` [*in, rank] and `lora_b` [rank, *out] beside the kernel, and
  out += dropout(x) A B * lora_alpha / rank. B starts at zero, so step 0 is the base model
  exactly; A is uniform in +-1/sqrt(fan_in), PEFT's kaiming_uniform(a=sqrt(5)). A keeps the
  kernel's logical axes on its input side and B on its output side; the rank axis is never
  sharded.
- int8 weights (`train.frozen_quant='int8'`, the QLoRA idea): a kernel stored as int8 comes
  with `kernel_scale` (float, the kernel's shape with the input dims 1: one scale per output
  channel); the product is (x q) * scale, which equals x (q * scale) for a per-output-channel
  scale, so the float kernel is never materialised.

Every product goes through `matmul_dot_general(cfg)`, so the CPU/XLA switch applies to the
adapter's two small matmuls too.
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxllm.models.cpu_matmul as cpu_matmul
from jaxllm.errors import ConfigError
from jaxllm.models.config import ModelConfig

Array = jax.Array

LORA_A, LORA_B, KERNEL_SCALE = "lora_a", "lora_b", "kernel_scale"
# The parameters a LoRA run trains unless train.trainable says otherwise.
LORA_PATTERN = f"/({LORA_A}|{LORA_B})$"


def matmul_dot_general(cfg: ModelConfig):
  """The dot_general every linear layer of the blocks uses (`model.matmul_impl`): plain
  lax.dot_general, or on the CPU backend the variant with a CPU-laid-out backward."""
  return cpu_matmul.matmul_dot_general if cfg.cpu_matmul else jax.lax.dot_general


def is_target(cfg: ModelConfig, module_path: str) -> bool:
  """Whether the linear layer at `module_path` ("layers/attn/query") gets a LoRA adapter."""
  return cfg.lora_rank > 0 and re.search(cfg.lora_targets, module_path) is not None


def _flat_normal(std: float, num_inputs: int):
  """normal(std) drawn on the kernel flattened to [prod(in), prod(out)], as nn.DenseGeneral draws it."""
  def init(rng, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:num_inputs]), math.prod(shape[num_inputs:]))
    return nn.initializers.normal(std)(rng, flat, dtype).reshape(shape)
  return init


def _kaiming_uniform(fan_in: int):
  """PEFT's init of lora_A: kaiming_uniform(a=sqrt(5)), i.e. uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


class Linear(nn.Module):
  """y = x W (+ b) over x's last `num_inputs` dims, kernel [*in, *features] with logical
  `kernel_axes`; a LoRA adapter when the config targets this module (see the module doc)."""
  cfg: ModelConfig
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  init_std: float
  num_inputs: int = 1

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg, n_in = self.cfg, self.num_inputs
    in_shape = x.shape[x.ndim - n_in:]
    out_axes = self.kernel_axes[n_in:]
    kernel = self.param("kernel", nn.with_logical_partitioning(_flat_normal(self.init_std, n_in), self.kernel_axes),
                        in_shape + self.features, cfg.weight_dtype)
    bias = None
    if cfg.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, out_axes), self.features,
                        cfg.weight_dtype)
    dot = matmul_dot_general(cfg)
    dtype = cfg.compute_dtype
    x = x.astype(dtype)
    contract = lambda a, b, k: dot(a, b, ((tuple(range(a.ndim - k, a.ndim)), tuple(range(k))), ((), ())))  # noqa: E731
    if self.has_variable("params", KERNEL_SCALE):  # an int8 kernel: scale per output channel after the product
      scale = self.get_variable("params", KERNEL_SCALE).reshape(self.features).astype(dtype)
      # Rematerialised: the backward re-converts the int8 kernel instead of keeping its float copy
      # (under scan, every layer's) as a residual, which would cost more than the float kernel itself.
      out = jax.checkpoint(lambda x, q, s: contract(x, q.astype(dtype), n_in) * s)(x, kernel, scale)
    else:
      out = contract(x, kernel.astype(dtype), n_in)
    if bias is not None:
      out = out + bias.astype(dtype)
    if is_target(cfg, "/".join(self.path)):
      rank = cfg.lora_rank
      lora_a = self.param(LORA_A, nn.with_logical_partitioning(
          _kaiming_uniform(math.prod(in_shape)), self.kernel_axes[:n_in] + (None,)),
          in_shape + (rank,), cfg.weight_dtype)
      lora_b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                          (rank,) + self.features, cfg.weight_dtype)
      h = nn.Dropout(cfg.lora_dropout)(x, deterministic=deterministic)
      h = contract(h, lora_a.astype(dtype), n_in) * jnp.asarray(cfg.lora_alpha / rank, dtype)  # [..., rank]
      out = out + contract(h, lora_b.astype(dtype), 1)
    return out


# ------------------------------------------------------------------ weights outside the model

def input_ndim(module: str) -> int:
  """How many leading (input) dims the kernel of module `module` ("out", "query", "wi") has."""
  return 2 if module == "out" else 1


def lora_delta(lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
  """The kernel update scale * A B [*in, *out] of one adapter (A [*in, rank], B [rank, *out])."""
  return scale * np.tensordot(np.asarray(lora_a, np.float32), np.asarray(lora_b, np.float32), axes=1)


def quantize_int8(kernel: Array, num_inputs: int, stacked: bool) -> tuple[Array, Array]:
  """(int8 kernel, float32 scale): symmetric per output channel, scale = max|w| / 127 over the
  input dims (shape: the kernel's, input dims 1). `stacked`: a leading [num_layers] axis."""
  lead = 1 if stacked else 0
  axes = tuple(range(lead, lead + num_inputs))
  scale = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
  q = jnp.clip(jnp.round(kernel.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
  return q, scale


def is_block_kernel(path: tuple[str, ...]) -> bool:
  """A linear layer's kernel inside a block: (..., "attn" | "mlp", module, "kernel")."""
  return len(path) >= 3 and path[-1] == "kernel" and path[-3] in ("attn", "mlp")


def check_targets(params: dict, cfg: ModelConfig) -> None:
  """Refuses a LoRA config whose `lora_targets` gives no linear layer an adapter (`params`: the
  model's flat {path tuple: leaf} tree)."""
  if cfg.lora_rank and not any(path[-1] == LORA_A for path in params):
    modules = sorted({"/".join(p[:-1]) for p in params if is_block_kernel(p)})
    raise ConfigError(f"model.lora_targets={cfg.lora_targets!r} matches no linear layer; module paths "
                      f"are {', '.join(modules[:8])}{' ...' if len(modules) > 8 else ''}.")


def quantize_tree(flat: dict) -> dict:
  """{path: leaf} with every block kernel as int8 plus its `kernel_scale` (`quantize_int8`);
  everything else as it is. Paths are tuples; a leading "layers" means stacked layers."""
  out = {}
  for path, leaf in flat.items():
    if is_block_kernel(path) and jnp.issubdtype(leaf.dtype, jnp.floating):
      out[path], out[path[:-1] + (KERNEL_SCALE,)] = quantize_int8(leaf, input_ndim(path[-2]),
                                                                 path[0] == "layers")
    else:
      out[path] = leaf
  return out


def merge_tree(flat: dict, cfg: ModelConfig) -> dict:
  """{"a/b/kernel": array} with every adapter folded into its kernel (kernel + scale A B) and the
  adapters dropped: the plain model LoRA trained (host numpy; stacked layers merged per layer)."""
  scale = cfg.lora_alpha / max(cfg.lora_rank, 1)
  out = {}
  for key, leaf in flat.items():
    module, _, name = key.rpartition("/")
    if name in (LORA_A, LORA_B):
      continue
    if name == "kernel" and f"{module}/{LORA_A}" in flat:
      a, b = np.asarray(flat[f"{module}/{LORA_A}"]), np.asarray(flat[f"{module}/{LORA_B}"])
      kernel = np.asarray(leaf)
      if key.startswith("layers/"):  # [num_layers, ...]: one product per layer
        delta = np.stack([lora_delta(a[i], b[i], scale) for i in range(a.shape[0])])
      else:
        delta = lora_delta(a, b, scale)
      leaf = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
    out[key] = leaf
  return out
