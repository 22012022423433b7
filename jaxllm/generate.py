"""Text generation from a trained model (first version: full-sequence decoding, no cache)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Draws one token id per row from logits [batch, vocab]; temperature 0 is greedy."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def generate(model: Any, params: Any, prompt_ids: list[int], *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 0.8, top_k: int = 40, eos_id: int | None = None) -> list[int]:
  """Continues `prompt_ids`; returns the new token ids (stopping after EOS)."""
  max_len = model.cfg.max_seq_len
  prompt_ids = list(prompt_ids)[-(max_len - 1):]
  total = min(max_len, len(prompt_ids) + max_new_tokens)
  tokens = np.zeros((1, total), np.int32)
  tokens[0, :len(prompt_ids)] = prompt_ids

  @jax.jit
  def next_token(tokens, position, rng):
    logits = model.apply({"params": params}, tokens)  # causal: later (empty) slots are not seen
    return sample_logits(logits[:, position - 1], rng, temperature, top_k)

  tokens = jnp.asarray(tokens)
  out = []
  for position in range(len(prompt_ids), total):
    rng, step_rng = jax.random.split(rng)
    token = next_token(tokens, jnp.int32(position), step_rng)
    tokens = tokens.at[:, position].set(token)
    token_id = int(token[0])
    out.append(token_id)
    if eos_id is not None and token_id == eos_id:
      break
  return out
