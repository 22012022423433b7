"""Every attention kernel against the xla reference on packed rows, and xla against a hand-built mask.

The Pallas kernels (pallas_gpu, splash) run in interpret mode on the CPU: the kernels' own
code, tiling and online softmax, executed as XLA ops. cuDNN cannot run here: its fallback
and auto choices are tested, and its prefix-LM decomposition through jax.nn's xla path.

Tolerances, as ||out - ref|| / ||ref|| against a float32 reference computed from the same
inputs: float32 1e-5 (outputs) and 1e-4 (gradients of q, k, v); bfloat16 2e-2 for both, the
error of bf16 operands, which the xla path in bfloat16 reaches too.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxllm.errors import ConfigError
from jaxllm.models import attention as attn
from jaxllm.models.attention import AttentionFeatures, attention, resolve_impl
from jaxllm.models.config import ModelConfig
from jaxllm.sharding import MESH_AXES

TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}  # (outputs, gradients)
KERNELS = ("cpu", "pallas_gpu", "splash")


def packed_segments(seq: int) -> np.ndarray:
  """[4, seq] segment ids: one long document; many short ones (1 to 9 tokens); documents and a
  padding tail (id 0); two halves."""
  rows = [np.ones(seq)]
  lengths = np.resize(np.arange(1, 10), seq)
  rows.append(np.repeat(np.arange(1, seq + 1), lengths)[:seq])
  rows.append(np.r_[np.full(seq // 3, 1), np.full(seq // 3, 2), np.zeros(seq - 2 * (seq // 3))])
  rows.append(np.r_[np.full(seq // 2, 7), np.full(seq - seq // 2, 8)])
  return np.stack(rows).astype(np.int32)


def qkv(seq: int, heads: int, kv_heads: int, head_dim: int = 32, batch: int = 4, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, seq, heads, head_dim))
  k = jax.random.normal(ks[1], (batch, seq, kv_heads, head_dim))
  v = jax.random.normal(ks[2], (batch, seq, kv_heads, head_dim))
  cotangent = jax.random.normal(ks[3], (batch, seq, heads, head_dim))
  return q, k, v, cotangent


def value_and_grads(fn, q, k, v, cotangent):
  """fn(q, k, v) and the gradients of sum(fn * cotangent) wrt q, k, v, all as float32."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)  # noqa: E731
  out = fn(q, k, v)
  grads = jax.grad(loss, (0, 1, 2))(q, k, v)
  return [x.astype(jnp.float32) for x in (out, *grads)]


def rel_err(x, ref) -> float:
  return float(jnp.linalg.norm((x - ref).ravel()) / jnp.linalg.norm(ref.ravel()))


def naive_attention(q, k, v, allowed, bias=None):
  """softmax(q k^T / sqrt(d) + bias) v in float64 numpy over a boolean allowed [batch, q, k]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  logits = np.where(allowed[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


def hand_mask(segment_ids, in_prefix=None, causal=True) -> np.ndarray:
  """Per example: its prompt block (in_prefix) sees itself both ways, the rest is causal, and
  no token sees another segment."""
  batch, seq = segment_ids.shape
  allowed = np.zeros((batch, seq, seq), bool)
  for b in range(batch):
    for i in range(seq):
      for j in range(seq):
        both_in_prompt = in_prefix is not None and in_prefix[b, i] and in_prefix[b, j]
        visible = (not causal) or j <= i or both_in_prompt
        allowed[b, i, j] = visible and segment_ids[b, i] == segment_ids[b, j]
  return allowed


PREFIX = np.array([40, 0, 17, 128], np.int32)  # one document per row: the first PREFIX tokens


def row_prefixes(seq: int) -> np.ndarray:
  """in_prefix [4, seq] of unpacked rows: the first PREFIX[b] tokens (none, and all, included)."""
  return np.arange(seq)[None, :] < PREFIX[:, None]


def segment_prefixes(segment_ids: np.ndarray) -> np.ndarray:
  """in_prefix of packed rows, as the SFT pipeline lays it out: each document's first third
  (at least one token) is its prompt; padding (id 0) has none."""
  in_prefix = np.zeros(segment_ids.shape, bool)
  for b, row in enumerate(segment_ids):
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(row)]):
      if row[start] != 0:
        in_prefix[b, start:start + max(1, (end - start) // 3)] = True
  return in_prefix


@pytest.mark.parametrize("causal,prefix,alibi", [(True, False, False), (True, True, False),
                                                 (False, False, False), (True, True, True)])
def test_xla_matches_hand_built_mask(causal, prefix, alibi):
  seq = 128
  segment_ids = packed_segments(seq)
  in_prefix = segment_prefixes(segment_ids) if prefix else None
  q, k, v, _ = qkv(seq, heads=4, kv_heads=2)
  positions = np.concatenate([np.arange(seq)[None]] * 4)
  bias = attn.alibi_bias(4, jnp.asarray(positions), jnp.asarray(positions)) if alibi else None
  want = naive_attention(q, k, v, hand_mask(segment_ids, in_prefix, causal), bias)
  got = attention(q, k, v, segment_ids=jnp.asarray(segment_ids), causal=causal,
                  in_prefix=None if in_prefix is None else jnp.asarray(in_prefix),
                  alibi=alibi, positions=jnp.asarray(positions), impl="xla")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


# (name, seq, heads, kv_heads, packed, causal, prefix); seq 200 is padded to the kernels' blocks,
# which the bidirectional cases would see if the padding were not a segment of its own.
CASES = [("packed_gqa", 128, 4, 2, True, True, False),
         ("packed_prefix_lm_gqa", 128, 4, 2, True, True, True),
         ("packed_bidirectional_mha_padded", 200, 2, 2, True, False, False),
         ("unpacked_bidirectional_mqa_padded", 200, 4, 1, False, False, False),
         ("unpacked_prefix_lm_mqa", 128, 4, 1, False, True, True)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_matches_xla(impl, case, dtype):
  _, seq, heads, kv_heads, packed, causal, prefix = case
  q, k, v, cotangent = qkv(seq, heads, kv_heads)
  segment_ids = packed_segments(seq) if packed else None
  in_prefix = (segment_prefixes(segment_ids) if packed else row_prefixes(seq)) if prefix else None
  kwargs = dict(segment_ids=None if segment_ids is None else jnp.asarray(segment_ids), causal=causal,
                in_prefix=None if in_prefix is None else jnp.asarray(in_prefix))
  ref = value_and_grads(lambda q, k, v: attention(q, k, v, impl="xla", **kwargs), q, k, v, cotangent)
  cast = lambda x: x.astype(dtype)  # noqa: E731
  run = lambda q, k, v: attention(q, k, v, impl=impl, **kwargs)  # noqa: E731
  got = value_and_grads(jax.jit(run) if impl == "cpu" else run, cast(q), cast(k), cast(v), cotangent)
  out_tol, grad_tol = TOLERANCE[dtype]
  for name, x, r, tol in zip(("out", "dq", "dk", "dv"), got, ref, (out_tol,) + (grad_tol,) * 3):
    assert bool(jnp.all(jnp.isfinite(x))), f"{name} has non-finite values"
    assert rel_err(x, r) < tol, f"{name}: {rel_err(x, r):.2e} >= {tol}"


@pytest.mark.parametrize("impl", ("xla",) + KERNELS)
@pytest.mark.parametrize("prefix", [False, True])
def test_documents_do_not_see_each_other(impl, prefix):
  """Perturbing one document's queries, keys and values moves its own outputs and no other token's."""
  seq = 128
  segment_ids = packed_segments(seq)
  q, k, v, _ = qkv(seq, heads=4, kv_heads=2)
  kwargs = dict(segment_ids=jnp.asarray(segment_ids),
                in_prefix=jnp.asarray(segment_prefixes(segment_ids)) if prefix else None, impl=impl)
  # Row 2 holds documents 1 and 2 and a padding tail; perturb its document 2.
  doc = jnp.asarray((segment_ids == 2) & (np.arange(4) == 2)[:, None])[:, :, None, None]
  noise = jax.random.normal(jax.random.key(9), q.shape)
  base = attention(q, k, v, **kwargs)
  moved = attention(q + doc * noise, k + doc * noise[:, :, :2], v + doc * noise[:, :, 2:], **kwargs)
  changed = np.asarray(jnp.abs(moved - base).max(axis=(2, 3)) > 0)
  np.testing.assert_array_equal(changed & ~np.asarray(doc[:, :, 0, 0]), False)
  assert changed[np.asarray(doc[:, :, 0, 0])].all(), "the perturbed document's outputs should move"


@pytest.mark.parametrize("impl,kv_heads", [("pallas_gpu", 1), ("splash", 2), ("splash", 1)])
def test_sharded_kernel_matches_xla(impl, kv_heads):
  """On a (data 2, fsdp 2, tensor 2) mesh of 8 simulated devices, under shard_map: batch over
  data x fsdp, heads over tensor; a single kv head is repeated to be split over tensor."""
  assert jax.device_count() == 8
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), MESH_AXES)
  seq = 128
  q, k, v, cotangent = qkv(seq, heads=4, kv_heads=kv_heads)
  segment_ids = packed_segments(seq)
  kwargs = dict(segment_ids=jnp.asarray(segment_ids), in_prefix=jnp.asarray(segment_prefixes(segment_ids)))
  ref = value_and_grads(lambda q, k, v: attention(q, k, v, impl="xla", **kwargs), q, k, v, cotangent)
  sharded = jax.jit(lambda q, k, v: attention(q, k, v, impl=impl, mesh=mesh, **kwargs))
  got = value_and_grads(sharded, q, k, v, cotangent)
  for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref):
    assert rel_err(x, r) < 1e-4, f"{name}: {rel_err(x, r):.2e}"
  assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v))


def test_kernel_takes_the_mesh_of_jax_set_mesh():
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), MESH_AXES)
  q, k, v, _ = qkv(128, heads=4, kv_heads=2)
  segment_ids = jnp.asarray(packed_segments(128))
  fn = jax.jit(lambda q, k, v: attention(q, k, v, segment_ids=segment_ids, impl="splash"))
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    got = fn(q, k, v)
  assert rel_err(got, attention(q, k, v, segment_ids=segment_ids, impl="xla")) < 1e-5


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_cpu_kernel_matches_xla_causal_and_alibi(alibi, kv_heads):
  """The cpu kernel's in-kernel causal mask (no dense mask given) and its bias gradient."""
  seq, heads = 64, 4
  q, k, v, cotangent = qkv(seq, heads, kv_heads, batch=2)
  positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
  bias = attn.alibi_bias(heads, positions, positions) * 3.0

  def grads(impl):
    loss = lambda q, k, v, b: jnp.sum(attention(q, k, v, bias=b if alibi else None, impl=impl) * cotangent)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))(q, k, v, bias)

  (want_loss, want), (got_loss, got) = grads("xla"), grads("cpu")
  assert abs(float(got_loss - want_loss)) < 1e-4 * abs(float(want_loss))
  for name, x, r in zip(("dq", "dk", "dv", "dbias"), got, want):
    if name == "dbias" and not alibi:
      continue
    assert rel_err(x, r) < 1e-5, f"{name}: {rel_err(x, r):.2e}"


@pytest.mark.parametrize("packed,kv_heads,alibi,block", [(False, 4, False, 16), (True, 2, False, 16),
                                                         (True, 1, True, 32), (False, 2, True, 24),
                                                         (False, 2, True, 40)])
def test_cpu_kernel_query_blocks_match_xla(packed, kv_heads, alibi, block):
  """Causal rows in query blocks (each block against the keys up to its end only): the same
  outputs and gradients as the xla reference; a block that does not divide seq runs unblocked."""
  from jaxllm.models import cpu_attention  # pylint: disable=import-outside-toplevel
  seq, heads = 96, 4
  q, k, v, cotangent = qkv(seq, heads, kv_heads, batch=2)
  segment_ids = jnp.asarray(packed_segments(seq)[:2]) if packed else None
  positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
  bias = attn.alibi_bias(heads, positions, positions) if alibi else None
  mask = attn.reference_mask(seq, segment_ids, None, True, 2)
  want = value_and_grads(jax.jit(lambda q, k, v: attention(q, k, v, segment_ids=segment_ids, bias=bias,
                                                            impl="xla")), q, k, v, cotangent)
  got = value_and_grads(jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, mask=mask, bias=bias, causal=True,
                                                                        block=block)), q, k, v, cotangent)
  for name, x, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(x, r) < 1e-5, f"{name}: {rel_err(x, r):.2e}"


def test_cudnn_prefix_lm_decomposition(monkeypatch):
  """cuDNN's prefix-LM (a full call over key_value_seq_lengths=prefix_len, a causal call),
  run through jax.nn's xla path, which takes the same arguments, equals the masked reference."""
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw))
  q, k, v, _ = qkv(128, heads=4, kv_heads=2)
  in_prefix = jnp.asarray(row_prefixes(128))
  want = attention(q, k, v, in_prefix=in_prefix, impl="xla")
  np.testing.assert_allclose(attn._cudnn(q, k, v, True, in_prefix, None), want, atol=1e-5)


GPU_BF16 = AttentionFeatures(dtype="bfloat16", head_dim=64)


@pytest.mark.parametrize("impl,platform,features,want", [
    ("auto", "cpu", GPU_BF16, "cpu"),
    ("auto", "cpu", AttentionFeatures(segment_ids=True, prefix_lm=True, bias=True, dtype="float32"), "cpu"),
    ("auto", "cpu", AttentionFeatures(decode=True), "xla"),
    ("cpu", "cpu", AttentionFeatures(decode=True), "xla"),
    ("auto", "gpu", GPU_BF16, "cudnn"),
    ("auto", "gpu", AttentionFeatures(prefix_lm=True), "cudnn"),
    ("auto", "gpu", AttentionFeatures(bias=True), "cudnn"),
    ("auto", "gpu", AttentionFeatures(segment_ids=True), "pallas_gpu"),
    ("auto", "gpu", AttentionFeatures(segment_ids=True, prefix_lm=True), "pallas_gpu"),
    ("auto", "gpu", AttentionFeatures(segment_ids=True, bias=True), "xla"),
    ("auto", "gpu", AttentionFeatures(dtype="float32"), "xla"),
    ("auto", "gpu", AttentionFeatures(head_dim=100), "pallas_gpu"),
    ("auto", "gpu", AttentionFeatures(head_dim=192, segment_ids=True), "xla"),
    ("pallas_gpu", "gpu", AttentionFeatures(head_dim=192, segment_ids=True), "pallas_gpu"),
    ("auto", "gpu", AttentionFeatures(decode=True), "xla"),
    ("auto", "tpu", AttentionFeatures(segment_ids=True, prefix_lm=True, dtype="float32"), "splash"),
    ("auto", "tpu", AttentionFeatures(bias=True), "xla"),
    ("cudnn", "cpu", GPU_BF16, "xla"),
    ("cudnn", "gpu", AttentionFeatures(dtype="float32"), "xla"),
    ("cudnn", "gpu", AttentionFeatures(segment_ids=True), "xla"),
    ("pallas_gpu", "gpu", AttentionFeatures(dtype="float32", segment_ids=True), "pallas_gpu"),
    ("pallas_gpu", "cpu", AttentionFeatures(segment_ids=True), "pallas_gpu"),
    ("pallas_gpu", "tpu", GPU_BF16, "xla"),
    ("pallas_gpu", "gpu", AttentionFeatures(bias=True), "xla"),
    ("splash", "cpu", GPU_BF16, "splash"),
    ("splash", "tpu", AttentionFeatures(bias=True), "xla"),
    ("splash", "tpu", AttentionFeatures(dtype="float16"), "xla"),
    ("splash", "gpu", GPU_BF16, "xla"),
    ("xla", "gpu", GPU_BF16, "xla"),
])
def test_resolve_impl(impl, platform, features, want):
  name, reason = resolve_impl(impl, platform, features)
  assert name == want, reason
  assert reason


def test_unknown_impl_is_a_config_error():
  with pytest.raises(ConfigError, match="attention_impl='flash'"):
    resolve_impl("flash", "gpu", GPU_BF16)
  for impl in attn.IMPLS:
    assert ModelConfig(attention_impl=impl).attention_impl == impl


@pytest.mark.parametrize("impl,kwargs,feature", [("cudnn", {}, "platform cpu"),
                                                 ("splash", {"alibi": True}, "ALiBi"),
                                                 ("pallas_gpu", {"alibi": True}, "ALiBi")])
def test_explicit_kernel_without_the_feature_warns_and_runs_xla(impl, kwargs, feature):
  q, k, v, _ = qkv(128, heads=4, kv_heads=2, batch=2)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = attention(q, k, v, impl=impl, **kwargs)
  messages = [str(w.message) for w in caught]
  assert any(f"attention_impl={impl}" in m and feature in m for m in messages), messages
  np.testing.assert_array_equal(got, attention(q, k, v, impl="xla", **kwargs))


def test_decode_attention_matches_full_attention():
  """Prefill, then one step written to the last slot past invalid ones (key_valid False, holding
  garbage): the same outputs as attending over the whole sequence causally."""
  batch, seq, max_len, heads, kv_heads = 2, 12, 16, 4, 2
  q, k, v, _ = qkv(seq, heads, kv_heads, batch=batch)
  full = attention(q, k, v, impl="xla")

  def cache(x):  # [batch, kv_heads, max_len, head_dim]: tokens 0..seq-2, garbage, the last token
    slots = jnp.full((batch, kv_heads, max_len, 32), 1e3)
    return slots.at[:, :, :seq - 1].set(x[:, :seq - 1].swapaxes(1, 2)).at[:, :, -1].set(x[:, -1])

  key_valid = jnp.broadcast_to((jnp.arange(max_len) < seq - 1) | (jnp.arange(max_len) == max_len - 1),
                               (batch, max_len))
  cache_k, cache_v = cache(k), cache(v)
  prefill = attn.decode_attention(q[:, :seq - 1], cache_k, cache_v, cache_index=jnp.int32(0),
                                  key_valid=key_valid)
  np.testing.assert_allclose(prefill, full[:, :seq - 1], atol=1e-5)
  step = attn.decode_attention(q[:, seq - 1:], cache_k, cache_v, cache_index=jnp.int32(max_len - 1),
                               key_valid=key_valid)
  np.testing.assert_allclose(step, full[:, seq - 1:], atol=1e-5)
