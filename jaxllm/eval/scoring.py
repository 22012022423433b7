"""Per-token log-probabilities of token rows under a GPT-family model, on a device mesh.

The one scoring primitive behind sliding-window perplexity (`eval perplexity`,
`train.eval_data`) and lm-eval's loglikelihood requests. A row of n tokens is scored as
a language model reads it: token i+1 given tokens 0..i, so a row gets n - 1 scores, each
a log-probability and whether that token was the model's greedy (argmax) choice.

Rows are right-padded to a bucket length (a power of two from 16 up, capped at the
model's positions) and batches to a fixed number of rows, so a whole evaluation compiles
a handful of programs however its rows vary. Right padding needs no mask: attention is
causal, so a real token never sees the padding that follows it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import ConfigError
from jaxllm.losses import split_sequence
from jaxllm.models import GPT, ModelConfig
from jaxllm.models.gpt import output_head
from jaxllm.sharding import BATCH_AXES, batch_sharding, replicated

MIN_BUCKET = 16
# Positions whose float32 logits [batch, chunk, vocab] exist at once: GPT-2's vocabulary
# over a whole 1024-token batch would otherwise be the largest array of the evaluation.
LOGITS_CHUNK = 128


class RowScores(NamedTuple):
  """Scores of one row of n tokens: entry i is about token i + 1."""
  logprobs: np.ndarray  # [n - 1] float32: log p(token i+1 | tokens 0..i)
  greedy: np.ndarray    # [n - 1] bool: token i+1 is the argmax of that distribution


def bucket_length(length: int, max_length: int) -> int:
  """The padded input length for `length` inputs: the next power of two (at least MIN_BUCKET),
  but never beyond the model's `max_length` positions."""
  padded = MIN_BUCKET
  while padded < length:
    padded *= 2
  return min(padded, max_length)


def _chunked_scores(features: jax.Array, head: jax.Array, targets: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """log p(target) and argmax == target per position, LOGITS_CHUNK positions of logits at a
  time. features [batch, seq, d_model], head [d_model, vocab], targets [batch, seq]."""
  batch, seq_len, _ = features.shape
  xs, ts = split_sequence(min(LOGITS_CHUNK, seq_len), features, targets)
  head = head.astype(features.dtype)

  def one(args):
    x, t = args
    logits = jnp.einsum("bcd,dv->bcv", x, head).astype(jnp.float32)  # [batch, chunk, vocab]
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
    return logprob, jnp.argmax(logits, axis=-1) == t

  logprobs, greedy = jax.lax.map(one, (xs, ts))
  unchunk = lambda a: jnp.swapaxes(a, 0, 1).reshape(batch, -1)[:, :seq_len]  # noqa: E731
  return unchunk(logprobs), unchunk(greedy)


def _score_tokens(params: Any, tokens: jax.Array, *, cfg: ModelConfig, mesh: jax.sharding.Mesh | None
                  ) -> tuple[jax.Array, jax.Array]:
  """tokens [batch, seq + 1] -> (logprobs, greedy) [batch, seq] of tokens[:, 1:]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  # A prompt-tuned model puts its virtual tokens before the inputs inside `features`.
  features = GPT(cfg, mesh).apply({"params": params}, inputs, method=GPT.features)
  return _chunked_scores(features, output_head(params, cfg), targets)


class Scorer:
  """Scores rows of token ids under one model; params may be on the host or on `mesh`.

  batch_size rows go through the model at a time (rounded up to a multiple of the mesh's
  data x fsdp size, over which the batch is split). Rows hold at most `max_row_len` tokens.
  """

  def __init__(self, cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, batch_size: int = 8):
    if cfg.family != "gpt":
      raise ConfigError(f"model.family={cfg.family!r} is not a causal language model; scoring "
                        "needs a GPT-family model.")
    if batch_size < 1:
      raise ConfigError(f"--batch-size={batch_size} must be at least 1.")
    self.cfg = dataclasses.replace(cfg, remat="none", dropout_rate=0.0)
    self.mesh = mesh
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    self.batch_size = -(-batch_size // shards) * shards
    # The positions a row's inputs may take: a prompt-tuned model's virtual tokens come first.
    self.max_input_len = cfg.max_seq_len - cfg.num_virtual_tokens
    kwargs = {} if mesh is None else dict(out_shardings=(replicated(mesh), replicated(mesh)))
    self._jitted = jax.jit(functools.partial(_score_tokens, cfg=self.cfg, mesh=mesh), **kwargs)

  @property
  def max_row_len(self) -> int:
    """The most tokens a row may have: the inputs fill the positions, the last is only a target."""
    return self.max_input_len + 1

  def score(self, params: Any, rows: Sequence[Sequence[int]]) -> list[RowScores]:
    """Scores of every row (each of 2 to max_row_len tokens), in order."""
    return [s for batch in self.batches(params, rows) for s in batch]

  def batches(self, params: Any, rows: Sequence[Sequence[int]]) -> Iterator[list[RowScores]]:
    """The scores of `rows`, one batch (up to batch_size rows) at a time, for progress bars.
    Rows of similar length batch best: callers sort them (lm-eval's Collator does)."""
    for start in range(0, len(rows), self.batch_size):
      yield self._score_batch(params, rows[start:start + self.batch_size])

  def _score_batch(self, params: Any, rows: Sequence[Sequence[int]]) -> list[RowScores]:
    lengths = [len(r) for r in rows]
    if min(lengths) < 2 or max(lengths) > self.max_row_len:
      bad = next(n for n in lengths if n < 2 or n > self.max_row_len)
      raise ConfigError(f"a row of {bad} tokens cannot be scored: rows need 2 to {self.max_row_len} "
                        f"tokens (the model has {self.max_input_len} input positions).")
    width = bucket_length(max(lengths) - 1, self.max_input_len) + 1
    tokens = np.zeros((self.batch_size, width), np.int32)  # the missing rows are padding too
    for i, row in enumerate(rows):
      tokens[i, :len(row)] = row
    if np.any(tokens >= self.cfg.vocab_size) or np.any(tokens < 0):
      raise ConfigError(f"a token id is outside the model's vocabulary (size {self.cfg.vocab_size}); "
                        "was the text encoded with another tokenizer?")
    placed = tokens if self.mesh is None else jax.device_put(tokens, batch_sharding(self.mesh))
    logprobs, greedy = jax.device_get(self._jitted(params, placed))
    return [RowScores(logprobs[i, :n - 1], greedy[i, :n - 1]) for i, n in enumerate(lengths)]
