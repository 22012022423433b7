"""Turning next-token logits into token ids: repetition penalty, temperature, top-k, top-p.

The order and the formulas follow Hugging Face `generate` (the penalty first, then
temperature, top-k and top-p), so a seeded run is comparable token for token in greedy
mode and in distribution otherwise. The settings are static (a hashable dataclass), so a
disabled filter costs nothing in the compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.errors import GenerationError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each new token and when to stop."""
  max_new_tokens: int = 64
  temperature: float = 0.0         # 0 = greedy (argmax)
  top_k: int = 0                   # keep the k most likely tokens; 0 = off
  top_p: float = 1.0               # keep the smallest set with this much probability; 1 = off
  repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output; 1 = off
  eos_id: int | None = None        # stop a sequence when it produces this token

  def __post_init__(self):
    checks = ((self.max_new_tokens >= 1, "max_new_tokens", "at least 1"),
              (self.temperature >= 0, "temperature", ">= 0 (0 means greedy)"),
              (self.top_k >= 0, "top_k", ">= 0 (0 means off)"),
              (0 < self.top_p <= 1, "top_p", "in (0, 1] (1 means off)"),
              (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 means off)"))
    for ok, name, rule in checks:
      if not ok:
        raise GenerationError(f"{name}={getattr(self, name)!r} must be {rule}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def program_key(self) -> "SamplingConfig":
    """The settings that shape the compiled decode program; the length and EOS id do not
    (they are array shapes and values), so changing them does not recompile."""
    return dataclasses.replace(self, max_new_tokens=1, eos_id=None)


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
  """CTRL's penalty as in HF: logits of seen tokens are divided by `penalty` if positive,
  multiplied if negative. seen [batch, vocab] bool."""
  if penalty == 1.0:
    return logits
  penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalized, logits)


def filter_logits(logits: Array, sampling: SamplingConfig) -> Array:
  """Temperature, then top-k, then top-p; removed tokens get -inf. logits [batch, vocab] float32."""
  logits = logits / sampling.temperature
  if 0 < sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always stays (mass_before is 0 there).
    kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(logits: Array, seen: Array, rng: Array, sampling: SamplingConfig) -> Array:
  """One token id per row [batch] int32 from logits [batch, vocab]."""
  logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, sampling.repetition_penalty)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
