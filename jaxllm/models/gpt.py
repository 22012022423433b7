"""The GPT-family decoder: GPT-2, LLaMA-style and Bloom-style blocks from one config."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models.config import ModelConfig
from jaxllm.models.masks import alibi_bias
from jaxllm.models.layers import (HIDDEN, Attention, KVCache, Mlp, Visibility, constrain, make_norm, tied_logits)

Array = jax.Array

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def make_layers(block: type[nn.Module], cfg: ModelConfig, mesh: jax.sharding.Mesh | None,
                deterministic_argnum: int, scan_in_axes: tuple) -> nn.Module | list[nn.Module]:
  """The stack of blocks, each rematerialised as `cfg.remat` says.

  With `cfg.scan_layers`, one `nn.scan` over the block: the step's program holds one layer
  however deep the model, and every parameter is stacked along a leading `layers` axis
  (`layers/attn/query/kernel` [num_layers, ...]). Otherwise a list `layer_0 ... layer_N`.
  The block returns (carry, per-layer output); `deterministic_argnum` counts the module as 0.
  """
  if cfg.remat != "none":
    # Inside a scan the loop already keeps XLA from merging recomputation with the forward.
    block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                     static_argnums=(deterministic_argnum,))
  if not cfg.scan_layers:
    return [block(cfg, mesh, name=f"layer_{i}") for i in range(cfg.num_layers)]
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=scan_in_axes, length=cfg.num_layers, unroll=cfg.layers_per_scan_step,
                 metadata_params={nn.PARTITION_NAME: "layers"})(cfg, mesh, name="layers")


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None  # activation sharding constraints (layers.constrain)

  @nn.compact
  def __call__(self, x: Array, positions: Array, visibility: Visibility,
               deterministic: bool = True, cache: KVCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, KVCache | None]:
    """Returns (x, new_cache); new_cache is None without `cache` (decoding, see Attention)."""
    cfg = self.cfg
    x = constrain(x, HIDDEN, self.mesh)
    h = make_norm(cfg, "attn_norm")(x).astype(cfg.compute_dtype)
    h = Attention(cfg, self.mesh, name="attn")(h, positions, visibility, deterministic, cache, cache_index)
    if cache is not None:
      h, cache = h
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = make_norm(cfg, "mlp_norm")(x).astype(cfg.compute_dtype)
    h = Mlp(cfg, self.mesh, name="mlp")(h, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return constrain(x, HIDDEN, self.mesh), cache


class GPT(nn.Module):
  """Decoder-only language model. Returns logits [batch, seq, vocab] in float32. With `mesh`,
  activations inside the blocks are constrained by logical name (the train step's model)."""
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                    ("vocab", "embed")))
    if cfg.position == "learned":
      self.pos_embed = nn.Embed(
          cfg.max_seq_len, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                      (None, "embed")))
    if cfg.num_virtual_tokens:
      # Prompt tuning (Lester et al. 2021): virtual-token embeddings placed before the tokens.
      self.prompt = nn.Embed(
          cfg.num_virtual_tokens, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                      (None, "embed")))
    if cfg.embed_norm:
      self.embed_norm = make_norm(cfg, "embed_norm")
    # `deterministic` (argument 4) is a Python bool; the cache (5) is scanned over with the layers.
    broadcast = nn.broadcast
    self.layers = make_layers(Block, cfg, self.mesh, 4, (broadcast, broadcast, broadcast, 0, broadcast))
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.final_norm = make_norm(cfg, "final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                   ("embed", "vocab")))

  def embed_tokens(self, tokens: Array, positions: Array, prefix_embeddings: Array | None = None
                   ) -> Array:
    """prefix_embeddings [batch, prefix_len, d_model] (soft prompts) go before the tokens and
    take the first prefix_len of `positions`, which then covers prefix + tokens."""
    x = self.embed(tokens)
    if prefix_embeddings is not None:
      x = jnp.concatenate([prefix_embeddings.astype(x.dtype), x], axis=1)
    if self.cfg.position == "learned":
      x = x + self.pos_embed(positions)
    if self.cfg.embed_norm:
      x = self.embed_norm(x)
    return x

  def logits(self, x: Array) -> Array:
    """The last block's output [..., d_model] -> float32 logits [..., vocab]."""
    return self.head(self.final_norm(x).astype(self.cfg.compute_dtype))

  def head(self, x: Array) -> Array:
    """Final-normed features [..., d_model] -> float32 logits [..., vocab] (see `output_head`)."""
    if self.cfg.tie_embeddings:
      out = tied_logits(x, self.embed.embedding.astype(self.cfg.compute_dtype), self.cfg)  # = embed.attend(x)
    else:
      out = self.lm_head(x)
    return out.astype(jnp.float32)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, in_prefix: Array | None = None,
               deterministic: bool = True) -> Array:
    """tokens [batch, seq] int; positions [batch, seq] (restart per packed document);
    segment_ids [batch, seq] (documents never attend across); in_prefix [batch, seq] bool
    (prefix-LM: each document's prompt, its first tokens, attends both ways)."""
    return self.head(self.features(tokens, positions, segment_ids, in_prefix, deterministic))

  def features(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, in_prefix: Array | None = None,
               deterministic: bool = True) -> Array:
    """The final-normed features [batch, seq, d_model] that the output head turns into logits
    (a chunked loss multiplies them by `output_head` piece by piece: jaxllm/losses.py)."""
    cfg = self.cfg
    batch, seq_len = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    num_virtual = cfg.num_virtual_tokens
    if num_virtual:  # the virtual tokens take positions 0..num_virtual-1; the tokens follow
      positions = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(num_virtual, dtype=positions.dtype), (batch, num_virtual)),
           positions + num_virtual], axis=1)
      if segment_ids is not None:  # the prompt belongs to the row's first example
        segment_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], num_virtual, 1), segment_ids], 1)
      if in_prefix is not None:  # the soft prompt is prompt: it joins the first example's prefix
        in_prefix = jnp.concatenate([jnp.ones((batch, num_virtual), bool), in_prefix.astype(bool)], 1)
      seq_len += num_virtual
    prompt = None
    if num_virtual:  # embedded like tokens (position embeddings, embed_norm), as in HF PEFT
      prompt = jnp.broadcast_to(self.prompt(jnp.arange(num_virtual)), (batch, num_virtual, cfg.d_model))
    x = self.embed_tokens(tokens, positions, prompt)
    x = self.dropout(x, deterministic=deterministic)
    x, _ = self.run_layers(x, positions, Visibility(segment_ids, in_prefix), deterministic)
    x = x[:, num_virtual:]  # virtual positions predict nothing and get no loss
    return self.final_norm(x).astype(cfg.compute_dtype)

  def decode(self, tokens: Array, cache: KVCache | tuple[KVCache, ...], cache_index: Array,
             key_positions: Array, key_valid: Array, prefix_embeddings: Array | None = None,
             head: Array | None = None, bidirectional: bool = False
             ) -> tuple[Array, KVCache | tuple[KVCache, ...]]:
    """Runs `tokens` against a preallocated KV cache (prefill: the whole prompt; then one token).

    tokens [batch, q_len] fill cache slots cache_index .. cache_index + q_len - 1 (after
    prefix_embeddings [batch, prefix_len, d_model], if given, which take the first slots).
    key_positions [batch, max_len] is the position of the token in each slot and key_valid
    [batch, max_len] is False for padding slots; a query sees valid slots up to its own.
    Returns the float32 logits of the last slot [batch, vocab] and the updated cache.
    head [d_model, vocab], if given, is the output projection laid out for this matmul
    (`output_head`): a decode loop passes it so that XLA does not transpose the tied
    embedding again at every step. bidirectional: the q_len new slots see each other both
    ways (a prefix-LM's prefill: the prompt is its prefix; later steps decode causally over
    the cache, which is what the full-sequence prefix mask computes). Build the model with
    remat="none" to call this.
    """
    cfg = self.cfg
    q_len = tokens.shape[1] + (0 if prefix_embeddings is None else prefix_embeddings.shape[1])
    max_len = key_positions.shape[1]
    positions = jax.lax.dynamic_slice_in_dim(key_positions, cache_index, q_len, axis=1)
    x = self.embed_tokens(tokens, positions, prefix_embeddings)
    slots = cache_index + jnp.arange(q_len)
    last_visible = jnp.full((q_len, 1), cache_index + q_len - 1) if bidirectional else slots[:, None]
    causal = jnp.arange(max_len)[None, :] <= last_visible  # [q_len, max_len]
    mask = key_valid[:, None, None, :] & causal[None, None]  # [batch, 1, q_len, max_len]
    bias = alibi_bias(cfg.num_heads, positions, key_positions) if cfg.position == "alibi" else None
    x, new_cache = self.run_layers(x, positions, Visibility(slot_mask=mask, slot_bias=bias), True, cache,
                                   cache_index)
    x = x[:, -1]
    if head is None:
      return self.logits(x), new_cache
    x = self.final_norm(x).astype(cfg.compute_dtype)
    return jnp.dot(x, head.astype(cfg.compute_dtype)).astype(jnp.float32), new_cache

  def run_layers(self, x: Array, positions: Array, visibility: Visibility,
                 deterministic: bool, cache: KVCache | tuple[KVCache, ...] | None = None,
                 cache_index: Array | None = None) -> tuple[Array, KVCache | tuple[KVCache, ...] | None]:
    """x through every block. The cache is one KVCache stacked [num_layers, ...] for scanned
    layers, else a tuple of per-layer KVCaches (see `init_cache`)."""
    if self.cfg.scan_layers:
      return self.layers(x, positions, visibility, deterministic, cache, cache_index)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, visibility, deterministic,
                             None if cache is None else cache[i], cache_index)
      new_cache.append(layer_cache)
    return x, None if cache is None else tuple(new_cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache | tuple[KVCache, ...]:
  """An empty KV cache: k and v [batch, kv_heads, max_len, head_dim] per layer, stacked into one
  KVCache [num_layers, batch, ...] for scanned layers, else a tuple of one KVCache per layer."""
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.num_layers,) + shape
    return KVCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
  return tuple(KVCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
               for _ in range(cfg.num_layers))


def output_head(params: dict, cfg: ModelConfig) -> Array:
  """The output projection [d_model, vocab]: the tied embedding transposed, or lm_head's kernel."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]
