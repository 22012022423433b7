"""Building blocks shared by every model: norms, positions, attention masks, attention, MLP.

Every parameter is created with logical axis names (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `norm`); `jaxllm.sharding` maps them onto the mesh.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxllm.models.cpu_matmul as cpu_matmul
from jaxllm.models.attention import attention
from jaxllm.models.config import ModelConfig
from jaxllm.models.lora import Linear
from jaxllm.sharding import LOGICAL_RULES

Array = jax.Array


def dense_init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def constrain(x: Array, names: tuple[str, ...], mesh: jax.sharding.Mesh | None) -> Array:
  """Pins activation x to the mesh by logical names (`activation_batch`, ...: sharding.LOGICAL_RULES),
  so XLA's propagation cannot pick another layout inside the blocks; a no-op without a mesh."""
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, names, rules=LOGICAL_RULES, mesh=mesh)


HIDDEN = ("activation_batch", "activation_seq", "activation_embed")  # [batch, seq, d_model]


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm or RMSNorm, computed in float32 for stability whatever the compute dtype."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                      scale_init=scale_init, name=name)
  # model.use_bias=False drops every bias, the LayerNorms' included (nanoGPT's bias=False).
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                      use_bias=cfg.use_bias, scale_init=scale_init, bias_init=zeros_init(("norm",)),
                      name=name)


def gelu_exact(x: Array) -> Array:
  """x * Phi(x), as nn.gelu(approximate=False), written with erf as PyTorch's exact GELU is:
  flax's form uses erfc, which XLA's CPU backend evaluates at ~30% of a small GPT's step."""
  x32 = x.astype(jnp.float32)
  return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * (1 / math.sqrt(2))))).astype(x.dtype)


def tied_logits(x: Array, embedding: Array, cfg: ModelConfig) -> Array:
  """x [..., d] against the tied embedding [vocab, d]: logits [..., vocab] (nn.Embed.attend)."""
  if cfg.cpu_matmul:
    return cpu_matmul.tied_logits(x, embedding)
  return jax.lax.dot_general(x, embedding, (((x.ndim - 1,), (1,)), ((), ())))


def activation_fn(name: str):
  return {"gelu_tanh": lambda x: nn.gelu(x, approximate=True),
          "gelu": gelu_exact,
          "geglu": gelu_exact,
          "relu": nn.relu, "silu": nn.silu, "swiglu": nn.silu}[name]


def rotary_embedding(x: Array, positions: Array, theta: float) -> Array:
  """Rotates pairs (i, i + head_dim/2) of `x` [batch, seq, heads, head_dim] (the LLaMA/HF layout)."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [batch, seq, 1, head_dim/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Visibility(NamedTuple):
  """What attention may see, as the model hands it down to every block.

  Training and prefill carry integer facts only, never a dense mask, so that a fused kernel
  takes them (jaxllm/models/attention.py): segment_ids [batch, seq] (packed documents never
  attend across) and in_prefix [batch, seq] bool (prefix-LM: True on each example's prompt, its
  first tokens, which see each other both ways; per token, so packed rows hold several prefixes).
  Decoding against a KV cache carries the slot mask [batch, 1, q_len, max_len] and ALiBi's bias
  over the slots instead."""
  segment_ids: Array | None = None
  in_prefix: Array | None = None
  slot_mask: Array | None = None
  slot_bias: Array | None = None


class KVCache(NamedTuple):
  """One layer's preallocated keys and values, each [batch, kv_heads, max_len, head_dim]
  (kv heads before slots: the value matmul reads this layout directly, where XLA CPU copies
  a transposed [batch, max_len, kv_heads, head_dim] cache at every decode step)."""
  k: Array
  v: Array


def cached_attention(q: Array, cache: KVCache, mask: Array, bias: Array | None) -> Array:
  """q [batch, q_len, heads, head_dim] attends over every cache slot allowed by mask
  [batch, 1, q_len, max_len]; bias [batch, heads, q_len, max_len] or None. Softmax in float32;
  query head n uses kv head n // (heads / kv_heads), as in grouped-query attention."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads, max_len = cache.k.shape[1], cache.k.shape[2]
  q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores = jnp.einsum("btkgh,bksh->bkgts", q, cache.k.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(head_dim)
  if bias is not None:
    scores = scores + bias.reshape(batch, num_kv_heads, -1, q_len, max_len)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, cache.v.astype(q.dtype))
  return out.reshape(batch, q_len, num_heads, head_dim)


class Attention(nn.Module):
  """Multi-head / grouped-query attention on the kernel `model.attention_impl` resolves to
  (`attention.attention`: segment ids, causal or prefix-LM, ALiBi from the positions).

  With `cache` (decoding), the new keys/values are written into the cache at slot
  `cache_index` and the queries attend over every cache slot (`cached_attention`) as
  `visibility.slot_mask` allows. Returns (out, new_cache) in that case, else out.
  """
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array, positions: Array, visibility: Visibility,
               deterministic: bool = True, cache: KVCache | None = None,
               cache_index: Array | None = None) -> Array | tuple[Array, KVCache]:
    cfg = self.cfg
    dense = lambda features, axes, name: Linear(  # noqa: E731
        cfg, features, ("embed",) + axes, cfg.init_std, name=name)
    q = dense((cfg.num_heads, cfg.head_dim), ("heads", "head_dim"), "query")(x, deterministic)
    k = dense((cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"), "key")(x, deterministic)
    v = dense((cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"), "value")(x, deterministic)
    # q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim]
    q = constrain(q, ("activation_batch", "activation_seq", "activation_heads", None), self.mesh)
    k = constrain(k, ("activation_batch", "activation_seq", "activation_kv_heads", None), self.mesh)
    v = constrain(v, ("activation_batch", "activation_seq", "activation_kv_heads", None), self.mesh)
    if cfg.position == "rotary":
      q = rotary_embedding(q, positions, cfg.rope_theta)
      k = rotary_embedding(k, positions, cfg.rope_theta)
    if cache is not None:
      write = lambda buf, new: jax.lax.dynamic_update_slice(  # noqa: E731
          buf, new.swapaxes(1, 2).astype(buf.dtype), (0, 0, cache_index, 0))
      cache = KVCache(write(cache.k, k), write(cache.v, v))
      out = cached_attention(q, cache, visibility.slot_mask, visibility.slot_bias)
    else:
      out = attention(q, k, v, segment_ids=visibility.segment_ids, in_prefix=visibility.in_prefix,
                      causal=self.causal, alibi=cfg.position == "alibi", positions=positions,
                      impl=cfg.attention_impl, mesh=self.mesh)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    out = Linear(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), out_std, num_inputs=2,
                 name="out")(out, deterministic)
    return out if cache is None else (out, cache)


class Mlp(nn.Module):
  """Feed-forward block: act(x W_in) W_out, or the gated form act(x W_gate) * (x W_up) W_out."""
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.cfg
    dense = lambda features, axes, std, name: Linear(cfg, (features,), axes, std, name=name)  # noqa: E731
    act = activation_fn(cfg.activation)
    if cfg.activation in ("swiglu", "geglu"):
      h = act(dense(cfg.d_ff, ("embed", "mlp"), cfg.init_std, "wi_gate")(x, deterministic))
      h = h * dense(cfg.d_ff, ("embed", "mlp"), cfg.init_std, "wi_up")(x, deterministic)
    else:
      h = act(dense(cfg.d_ff, ("embed", "mlp"), cfg.init_std, "wi")(x, deterministic))
    h = constrain(h, ("activation_batch", "activation_seq", "activation_mlp"), self.mesh)  # [batch, seq, d_ff]
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    return dense(cfg.d_model, ("mlp", "embed"), out_std, "wo")(h, deterministic)
