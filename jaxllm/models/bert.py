"""The BERT encoder with its masked-LM head, built from the shared layers (attention, MLP, norms).

Post-norm blocks (x = norm(x + attn(x)); x = norm(x + mlp(x))), learned absolute position and
token-type embeddings summed with the word embedding and normalised, bidirectional attention,
an optional [CLS] pooler, and the MLM head of BertForMaskedLM: dense -> activation -> norm ->
the word embedding transposed (tied) + a per-token bias. Parameter paths:
`embed`, `pos_embed`, `type_embed`, `embed_norm`, `layers/{attn,attn_norm,mlp,mlp_norm}` (stacked;
`layer_i/...` with model.scan_layers=False),
`pooler`, `mlm_dense`, `mlm_norm`, `mlm_bias`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models.config import ModelConfig
from jaxllm.models.gpt import make_layers
from jaxllm.models.layers import (HIDDEN, Attention, Mlp, Visibility, activation_fn, constrain, dense_init,
                                  make_norm, zeros_init)

Array = jax.Array


class EncoderBlock(nn.Module):
  """Post-norm transformer block with bidirectional attention (the original BERT layout)."""
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None  # activation sharding constraints (layers.constrain)

  @nn.compact
  def __call__(self, x: Array, positions: Array, visibility: Visibility, deterministic: bool = True
               ) -> tuple[Array, None]:
    cfg = self.cfg
    x = constrain(x, HIDDEN, self.mesh)
    h = Attention(cfg, self.mesh, causal=False, name="attn")(x, positions, visibility, deterministic)
    x = make_norm(cfg, "attn_norm")(x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic))
    x = x.astype(cfg.compute_dtype)
    h = Mlp(cfg, self.mesh, name="mlp")(x, deterministic)
    x = make_norm(cfg, "mlp_norm")(x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic))
    return constrain(x.astype(cfg.compute_dtype), HIDDEN, self.mesh), None  # (carry, no per-layer output), as nn.scan wants


class Bert(nn.Module):
  """Encoder + MLM head. `__call__` returns MLM logits [batch, seq, vocab] in float32."""
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None  # see GPT

  def setup(self):
    cfg = self.cfg
    embed = lambda num, axes, std: nn.Embed(  # noqa: E731
        num, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))
    self.embed = embed(cfg.vocab_size, ("vocab", "embed"), cfg.init_std)
    self.pos_embed = embed(cfg.max_seq_len, (None, "embed"), cfg.init_std)
    self.type_embed = embed(cfg.type_vocab_size, (None, "embed"), cfg.init_std)
    self.embed_norm = make_norm(cfg, "embed_norm")
    self.dropout = nn.Dropout(cfg.dropout_rate)
    # `deterministic` (argument 4, counting the module as 0) is a Python bool.
    self.layers = make_layers(EncoderBlock, cfg, self.mesh, 4, (nn.broadcast, nn.broadcast, nn.broadcast))
    # d_model -> d_model: FSDP splits the input side only (one axis name may appear once).
    square = lambda: nn.Dense(  # noqa: E731
        cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        kernel_init=dense_init(cfg.init_std, ("embed", None)), bias_init=zeros_init((None,)))
    if cfg.use_pooler:
      self.pooler = square()
    self.mlm_dense = square()
    self.mlm_norm = make_norm(cfg, "mlm_norm")
    self.mlm_bias = self.param("mlm_bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.weight_dtype)

  def encode(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
             token_types: Array | None = None, deterministic: bool = True) -> Array:
    """Hidden states [batch, seq, d_model]. segment_ids [batch, seq]: a token attends only to tokens
    of its own segment (0 marks padding, which then attends only to padding)."""
    batch, seq_len = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    x = self.embed(tokens) + self.pos_embed(positions) + self.type_embed(token_types)
    x = self.embed_norm(x).astype(self.cfg.compute_dtype)
    x = self.dropout(x, deterministic=deterministic)
    visibility = Visibility(segment_ids)  # padding (segment 0) sees only padding
    if self.cfg.scan_layers:
      x, _ = self.layers(x, positions, visibility, deterministic)
    else:
      for layer in self.layers:
        x, _ = layer(x, positions, visibility, deterministic)
    return x

  def pool(self, hidden: Array) -> Array:
    """tanh(dense(hidden of [CLS])) [batch, d_model], for sentence-level heads."""
    if not self.cfg.use_pooler:
      raise ValueError("this BERT has no pooler; set model.use_pooler=True.")
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def mlm_logits(self, hidden: Array) -> Array:
    h = activation_fn(self.cfg.activation)(self.mlm_dense(hidden))
    h = self.mlm_norm(h).astype(self.cfg.compute_dtype)
    return self.embed.attend(h).astype(jnp.float32) + self.mlm_bias.astype(jnp.float32)

  def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
               token_types: Array | None = None, deterministic: bool = True) -> Array:
    hidden = self.encode(tokens, positions, segment_ids, token_types, deterministic)
    if self.cfg.use_pooler and self.is_initializing():
      self.pool(hidden)  # creates the pooler's parameters
    return self.mlm_logits(hidden)
