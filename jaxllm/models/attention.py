"""Attention behind one function, with the kernel chosen per platform (`model.attention_impl`).

The model passes integer `segment_ids` (packed documents), the causal flag, per-token
`in_prefix` flags (prefix-LM) and positions; it never builds a dense mask. Only the `xla`
reference and `cpu` do (`masks.reference_mask`). The kernels, and what each takes (see docs/attention.md):

| impl         | segment ids | causal / full | prefix-LM      | GQA          | bias (ALiBi) | dtypes          | decode |
|--------------|-------------|---------------|----------------|--------------|--------------|-----------------|--------|
| `xla`        | yes         | yes           | yes            | yes          | yes          | any             | yes    |
| `cpu`        | yes         | yes           | yes            | yes          | yes          | any             | no     |
| `cudnn`      | no          | yes           | yes (2 calls)  | yes          | yes          | bf16, f16       | no     |
| `pallas_gpu` | yes         | yes           | yes (2 calls)  | kv repeated  | no           | bf16, f16, f32  | no     |
| `splash`     | yes         | yes           | yes (2 calls)  | yes          | no           | bf16, f32       | no     |

A kernel asked for a feature it lacks falls back to `xla` with a one-time warning naming the
feature (`resolve_impl` says why); `auto` picks the fastest kernel that takes the batch's
features. Prefix-LM on a kernel is two kernel calls, exact when each segment's prefix is its
first tokens (what the SFT pipeline builds): a query inside the prefix sees its document's
prefix both ways (full attention over segment ids split at the prefix), a query after it sees
its document causally; the output takes, per query, the call that applies.
`cpu` (jaxllm/models/cpu_attention.py) is the reference's math with a backward laid out for
XLA CPU; `auto` picks it on the CPU backend only.
On CPU a Pallas kernel asked for by name runs in interpret mode (slow; for tests).
With a mesh of more than one device the Pallas kernels run under `shard_map`: batch over
the mesh axes of the logical `batch` axis, heads over those of `heads` (jaxllm.sharding).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from jaxllm.errors import ConfigError
import jaxllm.models.cpu_attention as cpu_attention
from jaxllm.models.masks import alibi_bias, reference_mask
from jaxllm.sharding import LOGICAL_RULES

Array = jax.Array

IMPLS = ("auto", "xla", "cpu", "cudnn", "pallas_gpu", "splash")
# jax.nn.dot_product_attention takes no segment ids through jax 0.11.0 (only per-row
# query/key lengths), so packed rows cannot go to cuDNN through the public API.
CUDNN_TAKES_SEGMENT_IDS = False
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every cuDNN-capable GPU
PALLAS_GPU_BLOCK = 128    # the kernel's default block_q = block_k; sequences are padded to it
# Its tiles grow with the head dim (padded to a power of 2); past 128 they may not fit in
# shared memory at the default blocks, so auto leaves those to xla (asked for by name, it runs).
PALLAS_GPU_AUTO_MAX_HEAD_DIM = 128
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) sequence is used
_KERNEL_PLATFORM = {"pallas_gpu": "gpu", "splash": "tpu"}


@dataclasses.dataclass(frozen=True)
class AttentionFeatures:
  """The static facts of one attention call that decide which kernel can take it."""
  segment_ids: bool = False
  prefix_lm: bool = False
  bias: bool = False          # an additive bias, e.g. ALiBi
  dtype: str = "bfloat16"
  head_dim: int = 64
  decode: bool = False        # queries against a longer key sequence (KV-cache decoding)

  @classmethod
  def of(cls, q: Array, k: Array, *, segment_ids: Array | None = None, in_prefix: Array | None = None,
         has_bias: bool = False, causal: bool = True) -> "AttentionFeatures":
    """The features of a call with these arrays (q [batch, q_len, ...], k [batch, kv_len, ...])."""
    return cls(segment_ids=segment_ids is not None, prefix_lm=in_prefix is not None and causal,
               bias=has_bias, dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1],
               decode=q.shape[1] != k.shape[1])


def _lacks(name: str, platform: str, f: AttentionFeatures) -> str | None:
  """What kernel `name` cannot take of these features on `platform`, or None if it takes them."""
  if name == "xla":
    return None
  if f.decode:
    return "KV-cache decoding (q_len != kv_len), which runs on xla only"
  if name == "cpu":
    return None
  if name == "cudnn":
    if platform != "gpu":
      return f"platform {platform} (cuDNN runs on CUDA GPUs only)"
    if f.segment_ids and not CUDNN_TAKES_SEGMENT_IDS:
      return "packed segment ids (jax.nn.dot_product_attention takes none)"
    if f.dtype not in CUDNN_DTYPES:
      return f"dtype {f.dtype} (cuDNN takes bfloat16 or float16)"
    if f.head_dim % 8 or f.head_dim > CUDNN_MAX_HEAD_DIM:
      return f"head_dim {f.head_dim} (cuDNN takes multiples of 8 up to {CUDNN_MAX_HEAD_DIM})"
    return None
  if f.bias:
    return "an additive bias (ALiBi)"
  if platform not in (_KERNEL_PLATFORM[name], "cpu"):
    return f"platform {platform} ({name} runs on {_KERNEL_PLATFORM[name]}, or interpreted on cpu)"
  if name == "splash" and f.dtype not in ("bfloat16", "float32"):
    return f"dtype {f.dtype} (splash takes bfloat16 or float32)"
  return None


def resolve_impl(impl: str, platform: str, features: AttentionFeatures) -> tuple[str, str]:
  """(kernel, reason): the kernel `impl` runs as on `platform` ('cpu', 'gpu', 'tpu') for
  these features, and a short reason for the start-up line. An explicit impl that lacks a
  feature resolves to 'xla', its reason naming the feature."""
  if impl not in IMPLS:
    raise ConfigError(f"model.attention_impl={impl!r} is not one of {IMPLS}.")
  if impl != "auto":
    why = _lacks(impl, platform, features)
    if why:
      return "xla", f"{impl} cannot take {why}; falling back to xla"
    interpreted = platform == "cpu" and impl in _KERNEL_PLATFORM
    return impl, "as asked" + (" (Pallas interpret mode on cpu: slow, for tests)" if interpreted else "")
  if features.decode:
    return "xla", "KV-cache decoding runs on xla"
  if platform == "gpu":
    if features.dtype not in CUDNN_DTYPES:
      return "xla", f"{features.dtype} on GPU: the fused kernels are picked for bfloat16/float16"
    no_cudnn = _lacks("cudnn", platform, features)
    if no_cudnn is None:
      return "cudnn", "cuDNN fused attention"
    no_pallas = _lacks("pallas_gpu", platform, features)
    if no_pallas is None and features.head_dim > PALLAS_GPU_AUTO_MAX_HEAD_DIM:
      no_pallas = f"head_dim {features.head_dim} (auto picks it up to {PALLAS_GPU_AUTO_MAX_HEAD_DIM})"
    if no_pallas is None:
      return "pallas_gpu", f"Pallas flash attention (cuDNN cannot take {no_cudnn})"
    return "xla", f"cuDNN cannot take {no_cudnn}, pallas_gpu {no_pallas}"
  if platform == "tpu":
    why = _lacks("splash", platform, features)
    return ("xla", f"splash cannot take {why}") if why else ("splash", "TPU splash attention")
  if platform == "cpu":
    return "cpu", "the XLA-CPU-laid-out attention (jaxllm/models/cpu_attention.py)"
  return "xla", f"{platform}: the XLA reference"


def attention(q: Array, k: Array, v: Array, *, segment_ids: Array | None = None, causal: bool = True,
              in_prefix: Array | None = None, bias: Array | None = None, alibi: bool = False,
              positions: Array | None = None, impl: str = "auto",
              mesh: Mesh | AbstractMesh | None = None) -> Array:
  """Scaled dot-product self-attention, softmax(q k^T / sqrt(head_dim) + bias) v, on the kernel
  `impl` resolves to (`resolve_impl`).

  q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] (kv_heads divides
  heads; query head n uses kv head n // (heads / kv_heads)). segment_ids [batch, seq] int:
  documents never attend across (0 = padding, its own segment). in_prefix [batch, seq] bool:
  with causal, the flagged tokens, the first ones of their segment, attend both ways among
  themselves (prefix-LM; `reference_mask` has the exact rule). bias: an additive
  [batch or 1, heads, seq, seq] bias; or alibi=True with positions [batch, seq] (restarting
  per document), which builds the ALiBi bias only where a kernel takes one. mesh (default:
  the one set by an enclosing `jax.set_mesh`): with more than one device, the Pallas
  kernels run per shard under shard_map.
  Returns [batch, seq, heads, head_dim] in q's dtype.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  assert k.shape == v.shape and k.shape[0] == batch and k.shape[3] == head_dim, (q.shape, k.shape, v.shape)
  assert k.shape[1] == seq_len, f"self-attention needs q_len == kv_len; decode with decode_attention ({q.shape}, {k.shape})"
  assert num_heads % k.shape[2] == 0, f"kv_heads {k.shape[2]} must divide heads {num_heads}"
  assert segment_ids is None or segment_ids.shape == (batch, seq_len), segment_ids.shape
  assert in_prefix is None or in_prefix.shape == (batch, seq_len), in_prefix.shape
  if not causal:
    in_prefix = None  # bidirectional everywhere already
  if in_prefix is not None:
    in_prefix = in_prefix.astype(bool)
  features = AttentionFeatures.of(q, k, segment_ids=segment_ids, in_prefix=in_prefix,
                                  has_bias=bias is not None or alibi, causal=causal)
  if mesh is None:  # the mesh of an enclosing jax.set_mesh, if any
    context = jax.sharding.get_abstract_mesh()
    mesh = None if context.empty else context
  platform = mesh.devices.flat[0].platform if isinstance(mesh, Mesh) else jax.default_backend()
  name, reason = resolve_impl(impl, platform, features)
  if name != impl and impl != "auto":
    warnings.warn(f"model.attention_impl={impl}: {reason}.", stacklevel=2)
  if alibi:
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    alibi_term = alibi_bias(num_heads, positions, positions)
    bias = alibi_term if bias is None else bias + alibi_term
  if name == "xla":
    return _xla(q, k, v, segment_ids, causal, in_prefix, bias)
  if name == "cpu":
    mask = reference_mask(seq_len, segment_ids, in_prefix, causal, batch)
    # Prefix-LM rows see later prefix keys: only a plain causal mask lets blocks be skipped.
    return cpu_attention.attention(q, k, v, mask=mask, bias=bias, causal=causal and in_prefix is None)
  if name == "cudnn":
    return _cudnn(q, k, v, causal, in_prefix, bias)
  kernel = _pallas_gpu if name == "pallas_gpu" else _splash
  interpret = platform == "cpu"
  if mesh is not None and mesh.size > 1:
    return _sharded(kernel, mesh, q, k, v, segment_ids, causal, in_prefix, interpret)
  return kernel(q, k, v, segment_ids, causal, in_prefix, interpret)


def _xla(q, k, v, segment_ids, causal, in_prefix, bias) -> Array:
  batch, seq_len = q.shape[:2]
  mask = reference_mask(seq_len, segment_ids, in_prefix, causal, batch)
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal and mask is None,
                                      implementation="xla")


def _with_prefix(run, segment_ids: Array | None, causal: bool, in_prefix: Array | None) -> Array:
  """Prefix-LM from two calls of run(segment_ids, causal) -> [batch, seq, heads, head_dim].

  A query in the prefix sees exactly its document's prefix (full attention, segments split
  at the prefix); a query after it sees its document causally (the prefix, its document's
  first tokens, lies before it)."""
  if in_prefix is None or not causal:
    return run(segment_ids, causal)
  base = jnp.zeros(in_prefix.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  split = 2 * base + (~in_prefix).astype(jnp.int32)
  full = run(split, False)
  after = run(segment_ids, True)
  return jnp.where(in_prefix[:, :, None, None], full, after)


def _cudnn(q, k, v, causal, in_prefix, bias) -> Array:
  """jax.nn's cuDNN flash attention; prefix-LM as a full call over the first prefix_len keys
  (`key_value_seq_lengths`) for the prefix's queries and a causal call for the rest. cuDNN
  takes no segment ids, so a row is one document and its prefix is its first prefix_len tokens."""
  if bias is not None:
    bias = bias.astype(q.dtype)
  call = lambda **kw: jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn", **kw)  # noqa: E731
  if in_prefix is None:
    return call(is_causal=causal)
  prefix_len = jnp.sum(in_prefix, axis=1)  # [batch]
  # At least one key, so a row with no prefix gets finite (unused) values and gradients.
  full = call(is_causal=False, key_value_seq_lengths=jnp.maximum(prefix_len, 1).astype(jnp.int32))
  return jnp.where(in_prefix[:, :, None, None], full, call(is_causal=True))


def _pad_seq(x: Array | None, target: int, axis: int, value=0) -> Array | None:
  if x is None or x.shape[axis] == target:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, target - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _pad_for_blocks(q, k, v, segment_ids, in_prefix, block: int):
  """Pads the sequence to a multiple of `block`; padded tokens get segment id -1 (an id no real
  token has, so nothing real attends to them) and lie outside any prefix."""
  seq_len = q.shape[1]
  target = -(-seq_len // block) * block
  if target == seq_len:
    return q, k, v, segment_ids, in_prefix
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  q, k, v = (_pad_seq(x, target, 1) for x in (q, k, v))
  return (q, k, v, _pad_seq(segment_ids.astype(jnp.int32), target, 1, value=-1),
          _pad_seq(in_prefix, target, 1, value=False))


def _pallas_gpu(q, k, v, segment_ids, causal, in_prefix, interpret) -> Array:
  """jax's Pallas (Triton) flash attention. It takes one segment-id row for queries and keys,
  and as many kv heads as query heads, so grouped kv heads are repeated."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=import-outside-toplevel
  batch, seq_len, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  if group > 1:
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  q_p, k_p, v_p, seg_p, prefix_p = _pad_for_blocks(q, k, v, segment_ids, in_prefix, PALLAS_GPU_BLOCK)
  sm_scale = 1.0 / math.sqrt(head_dim)

  def run(seg, is_causal):
    return gpu_attention.mha(q_p, k_p, v_p, seg, sm_scale=sm_scale, causal=is_causal, interpret=interpret)

  out = _with_prefix(run, seg_p, causal, prefix_p)
  return out[:, :seq_len].astype(q.dtype)


def _splash(q, k, v, segment_ids, causal, in_prefix, interpret) -> Array:
  """TPU splash attention, one example at a time (vmap), heads first. It does not scale the
  logits itself, so q is scaled here; grouped kv heads are native."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  batch, seq_len, num_heads, head_dim = q.shape
  q = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(q.dtype)
  q, k, v, segment_ids, in_prefix = _pad_for_blocks(q, k, v, segment_ids, in_prefix, SPLASH_BLOCKS[-1])
  padded_len = q.shape[1]
  block = next(b for b in SPLASH_BLOCKS if padded_len % b == 0)
  block_sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                  block_q_dq=block, block_kv_dq=block)
  # [batch, heads, seq, head_dim]
  q_t, k_t, v_t = (x.swapaxes(1, 2) for x in (q, k, v))

  def run(seg, is_causal):
    mask_type = splash.CausalMask if is_causal else splash.FullMask
    mask = splash.MultiHeadMask([mask_type((padded_len, padded_len)) for _ in range(num_heads)])
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=block_sizes,
                                    interpret=interpret)
    if seg is None:
      out = jax.vmap(kernel)(q_t, k_t, v_t)
    else:
      out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=splash.SegmentIds(s, s)))(q_t, k_t, v_t, seg)
    return out.swapaxes(1, 2)

  out = _with_prefix(run, segment_ids, causal, in_prefix)
  return out[:, :seq_len].astype(q.dtype)


def _mesh_axes(logical: str, dim: int, mesh: Mesh | AbstractMesh) -> tuple[str, ...] | None:
  """The mesh axes jaxllm.sharding maps `logical` onto, keeping those that divide `dim`."""
  axes = dict(LOGICAL_RULES).get(logical)
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  kept, size = [], 1
  for axis in axes:
    if axis in mesh.shape and dim % (size * mesh.shape[axis]) == 0:
      kept.append(axis)
      size *= mesh.shape[axis]
  return tuple(kept) or None


def _sharded(kernel, mesh: Mesh | AbstractMesh, q, k, v, segment_ids, causal, in_prefix, interpret) -> Array:
  """Runs `kernel` per shard: batch over the `batch` mesh axes, heads over the `heads` ones.
  Kv heads that the head axes do not divide are repeated up to the query heads first."""
  batch, _, num_heads, _ = q.shape
  batch_axes = _mesh_axes("batch", batch, mesh)
  head_axes = _mesh_axes("heads", num_heads, mesh)
  if head_axes and _mesh_axes("heads", k.shape[2], mesh) != head_axes:
    group = num_heads // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  heads_spec = P(batch_axes, None, head_axes, None)
  args, specs = [q, k, v], [heads_spec] * 3
  if segment_ids is not None:
    args.append(segment_ids)
    specs.append(P(batch_axes, None))
  if in_prefix is not None:
    args.append(in_prefix)
    specs.append(P(batch_axes, None))

  def body(q, k, v, *rest):
    rest = list(rest)
    seg = rest.pop(0) if segment_ids is not None else None
    prefix = rest.pop(0) if in_prefix is not None else None
    return kernel(q, k, v, seg, causal, prefix, interpret)

  # check_vma=False: pallas_call does not declare how its outputs vary over the mesh.
  return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=heads_spec,
                       check_vma=False)(*args)


def decode_attention(q: Array, cache_k: Array, cache_v: Array, *, cache_index: Array, key_valid: Array,
                     bias: Array | None = None) -> Array:
  """Queries at cache slots cache_index .. cache_index + q_len - 1 against a KV cache, on xla
  (the kernels take self-attention only; a decode step is one small query block).

  q [batch, q_len, heads, head_dim]; cache_k, cache_v [batch, kv_heads, max_len, head_dim]
  (jaxllm.models.layers.KVCache's layout); key_valid [batch, max_len] is False for padding
  slots; a query sees the valid slots up to its own. bias [batch, heads, q_len, max_len] or
  None (ALiBi: alibi_bias(heads, query positions, key positions)). Softmax in float32.
  """
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads, max_len = cache_k.shape[1], cache_k.shape[2]
  slots = cache_index + jnp.arange(q_len)
  mask = key_valid[:, None, :] & (jnp.arange(max_len)[None, :] <= slots[:, None])[None]  # [batch, q_len, max_len]
  q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores = jnp.einsum("btkgh,bksh->bkgts", q, cache_k.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(head_dim)
  if bias is not None:
    scores = scores + bias.reshape(batch, num_kv_heads, -1, q_len, max_len)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, cache_v.astype(q.dtype))
  return out.reshape(batch, q_len, num_heads, head_dim)
