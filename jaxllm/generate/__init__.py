"""Text generation with a preallocated KV cache: the Python API and the CLI.

  python -m jaxllm.generate --checkpoint DIR --prompt "def main():" [--max-new-tokens 128 ...]

Prompts of different lengths share one batch: each is left-padded so that its last token
sits in the same cache slot; padding slots are masked out and positions count from each
prompt's first real token, so every row decodes exactly as it would alone. `prefill` runs
the whole prompt in one pass and picks the first new token; `decode_chunk` then adds one
token per step inside a `lax.while_loop`. The host looks at the tokens only between chunks
(to stream text and to check stop strings), so without streaming or stop strings the whole
generation is two compiled calls. A prefix-LM model (trained with `sft.prefix_lm`) gets
`prefix_lm=True`: the prompt, its prefix, is prefilled with bidirectional attention and the new
tokens are decoded causally, as the model saw instruction and response in training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import GPT, ModelConfig
from jaxllm.models.gpt import init_cache, output_head
from jaxllm.models.layers import KVCache
from jaxllm.sampling import GenerationError, SamplingConfig, sample
from jaxllm.sharding import logical_shardings

Array = jax.Array

__all__ = ["Completion", "DecodeState", "GenerationError", "Generator", "SamplingConfig",
           "fit_prompt", "generate"]

PAD_MULTIPLE = 16  # prompts are left-padded to a multiple of this, so few shapes compile
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")


class DecodeState(NamedTuple):
  """Everything the decode loop carries; one row per sequence, one slot per cache position."""
  # k and v [batch, kv_heads, max_len, head_dim] per layer: one KVCache stacked
  # [num_layers, ...] for scanned layers, else a tuple of them (`gpt.init_cache`)
  cache: KVCache | tuple[KVCache, ...]
  tokens: Array               # [batch, max_len] int32: prefix/padding dummies, prompt, output
  key_positions: Array        # [batch, max_len] int32: the position of each slot's token
  key_valid: Array            # [batch, max_len] bool: False for padding slots
  seen: Array                 # [batch, vocab] bool: tokens in the prompt or output so far
  done: Array                 # [batch] bool: the row produced EOS (or the host stopped it)
  index: Array                # int32 scalar: slots filled so far
  eos_id: Array               # int32 scalar; -1 = none
  rng: Array


@dataclasses.dataclass
class Completion:
  """One generated continuation. `tokens` excludes EOS; with stop strings it ends with the
  token that completed the stop string, while `text` ends just before the stop string."""
  tokens: list[int]
  text: str | None
  finish_reason: str  # "eos" | "stop" | "length"


def _state_shardings(state: DecodeState, mesh: jax.sharding.Mesh) -> DecodeState:
  """Batch over the data axes, cache kv heads over the tensor axis (via the logical rules)."""
  def box(x, names):
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(x.shape, x.dtype), names)
  boxed = state._replace(
      cache=(KVCache(box(state.cache.k, ("layers",) + CACHE_AXES), box(state.cache.v, ("layers",) + CACHE_AXES))
             if isinstance(state.cache, KVCache) else
             tuple(KVCache(box(c.k, CACHE_AXES), box(c.v, CACHE_AXES)) for c in state.cache)),
      tokens=box(state.tokens, ("batch", "seq")),
      key_positions=box(state.key_positions, ("batch", "seq")),
      key_valid=box(state.key_valid, ("batch", "seq")),
      seen=box(state.seen, ("batch", "vocab")), done=box(state.done, ("batch",)),
      index=jax.ShapeDtypeStruct((), jnp.int32), eos_id=jax.ShapeDtypeStruct((), jnp.int32),
      rng=jax.ShapeDtypeStruct(state.rng.shape,
                                                                         state.rng.dtype))
  return logical_shardings(boxed, mesh)


def _constrain(state: DecodeState, mesh: jax.sharding.Mesh | None) -> DecodeState:
  if mesh is None:
    return state
  return jax.lax.with_sharding_constraint(state, _state_shardings(state, mesh))


def _append(state: DecodeState, logits: Array, sampling: SamplingConfig) -> DecodeState:
  """Samples the token for slot `index` from `logits` [batch, vocab] and writes it there."""
  token = sample(logits, state.seen, jax.random.fold_in(state.rng, state.index), sampling)
  token = jnp.where(state.done, 0, token)  # finished rows write padding
  tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.index))
  seen = state.seen.at[jnp.arange(token.shape[0]), token].set(True)
  done = state.done | (token == state.eos_id)
  return state._replace(tokens=tokens, seen=seen, done=done, index=state.index + 1)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "mesh", "prefix_lm"))
def prefill(params: Any, prompt: Array, key_positions: Array, key_valid: Array, eos_id: Array,
            rng: Array, prefix_embeddings: Array | None, *, cfg: ModelConfig, sampling: SamplingConfig,
            mesh: jax.sharding.Mesh | None, prefix_lm: bool = False) -> DecodeState:
  """Runs the (left-padded) prompt [batch, prompt_len] through the model in one pass, filling
  the cache, and samples the first new token. key_positions/key_valid [batch, max_len] cover
  prefix + prompt + every new token (see `layout`). prefix_lm: soft prefix and prompt attend
  to each other both ways (the model's prefix)."""
  batch, prompt_len = prompt.shape
  max_len = key_positions.shape[1]
  prefix_len = 0 if prefix_embeddings is None else prefix_embeddings.shape[1]
  cache = init_cache(cfg, batch, max_len)
  logits, cache = GPT(cfg).apply({"params": params}, prompt, cache, jnp.int32(0), key_positions,
                                 key_valid, prefix_embeddings, bidirectional=prefix_lm, method=GPT.decode)
  tokens = jnp.zeros((batch, max_len), jnp.int32).at[:, prefix_len:prefix_len + prompt_len].set(prompt)
  in_prompt = key_valid[:, prefix_len:prefix_len + prompt_len]
  seen = jnp.zeros((batch, cfg.vocab_size), bool).at[jnp.arange(batch)[:, None], prompt].max(in_prompt)
  state = DecodeState(cache=cache, tokens=tokens, key_positions=key_positions, key_valid=key_valid,
                      seen=seen, done=jnp.zeros((batch,), bool),
                      index=jnp.int32(prefix_len + prompt_len), eos_id=eos_id, rng=rng)
  return _constrain(_append(_constrain(state, mesh), logits, sampling), mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "mesh"), donate_argnums=(1,))
def decode_chunk(params: Any, state: DecodeState, num_steps: Array, *, cfg: ModelConfig,
                 sampling: SamplingConfig, mesh: jax.sharding.Mesh | None) -> DecodeState:
  """Adds up to `num_steps` tokens, one per step, stopping early when the cache is full or
  every row is done. num_steps is traced, so any chunk size reuses one compiled program."""
  model = GPT(cfg)
  stop_at = jnp.minimum(state.index + num_steps, state.tokens.shape[1])
  # Laid out once per call: inside the loop XLA CPU would copy the transposed embedding per step.
  head = output_head(params, cfg)
  if mesh is not None:
    head = jax.lax.with_sharding_constraint(head, logical_shardings(
        nn.LogicallyPartitioned(jax.ShapeDtypeStruct(head.shape, head.dtype), ("embed", "vocab")), mesh))

  def body(s: DecodeState) -> DecodeState:
    last = jax.lax.dynamic_slice_in_dim(s.tokens, s.index - 1, 1, axis=1)  # [batch, 1]
    logits, cache = model.apply({"params": params}, last, s.cache, s.index - 1, s.key_positions,
                                s.key_valid, None, head, method=GPT.decode)
    return _constrain(_append(s._replace(cache=cache), logits, sampling), mesh)

  return jax.lax.while_loop(lambda s: (s.index < stop_at) & ~jnp.all(s.done), body, state)


def layout(prompts: Sequence[Sequence[int]], prefix_len: int, max_new_tokens: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-pads the prompts: (prompt [batch, padded_len], key_positions, key_valid [batch, max_len]).

  Slots: [prefix | padding | prompt | new tokens]. The prefix takes positions 0..prefix_len-1
  and each prompt continues from prefix_len, whatever its padding.
  """
  lens = np.asarray([len(p) for p in prompts])
  padded = -(-int(lens.max()) // PAD_MULTIPLE) * PAD_MULTIPLE
  prompt = np.zeros((len(prompts), padded), np.int32)
  for row, p in enumerate(prompts):
    prompt[row, padded - len(p):] = p
  max_len = prefix_len + padded + max_new_tokens
  slots = np.arange(max_len)[None, :]
  pad = (padded - lens)[:, None]
  in_padding = (slots >= prefix_len) & (slots < prefix_len + pad)
  positions = np.where(slots < prefix_len, slots, np.maximum(slots - pad, 0))
  positions = np.where(in_padding, 0, positions).astype(np.int32)
  return prompt, positions, ~in_padding


def fit_prompt(prompt_ids: Sequence[int], max_new_tokens: int, cfg: ModelConfig
               ) -> tuple[list[int], int]:
  """For learned positions, keeps at most max_seq_len - 1 prompt tokens (the end) and caps
  max_new_tokens to the positions left (what the end-of-training sample wants; the CLI
  reports an error instead)."""
  prompt_ids = list(prompt_ids)
  if cfg.position != "learned":
    return prompt_ids, max_new_tokens
  max_len = cfg.max_seq_len - cfg.num_virtual_tokens  # a prompt-tuned model's prompt takes positions too
  prompt_ids = prompt_ids[-(max_len - 1):]
  return prompt_ids, max(1, min(max_new_tokens, max_len - len(prompt_ids)))


class Generator:
  """Generates from one model's params, optionally on a mesh and after a soft-prompt prefix.

  params may be on the host or already sharded on `mesh` (e.g. from
  `model_dir.load_model_dir(path, shardings=...)`). prefix_embeddings [prefix_len, d_model]
  (prompt tuning) are placed before every prompt. prefix_lm: the model was trained as a
  prefix-LM (`sft.prefix_lm`; `model_dir.trained_prefix_lm` reads it from a model directory),
  so each prompt is prefilled with bidirectional attention.
  """

  def __init__(self, cfg: ModelConfig, params: Any, mesh: jax.sharding.Mesh | None = None,
               prefix_embeddings: Any | None = None, prefix_lm: bool = False):
    if cfg.family != "gpt":
      raise GenerationError(f"model.family={cfg.family!r} cannot generate text; use a GPT-family model.")
    self.cfg = dataclasses.replace(cfg, remat="none", dropout_rate=0.0)
    self.mesh = mesh
    self.params = params
    self.prefix_lm = prefix_lm
    if prefix_embeddings is None and cfg.num_virtual_tokens:  # prompt tuning: the model's own prompt
      prefix_embeddings = params["prompt"]["embedding"]
    self.prefix_embeddings = None if prefix_embeddings is None else jnp.asarray(prefix_embeddings)

  def _check(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> None:
    if not prompts:
      raise GenerationError("no prompts given.")
    prefix_len = 0 if self.prefix_embeddings is None else self.prefix_embeddings.shape[0]
    for i, p in enumerate(prompts):
      if len(p) + prefix_len == 0:
        raise GenerationError(f"prompt {i} is empty; give at least one token (e.g. the BOS/EOS id).")
      bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
      if bad:
        raise GenerationError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary "
                              f"(size {self.cfg.vocab_size}); was it encoded with another tokenizer?")
      total = prefix_len + len(p) + sampling.max_new_tokens
      if self.cfg.position == "learned" and total > self.cfg.max_seq_len:
        raise GenerationError(
            f"prompt {i} has {len(p)} tokens; with max_new_tokens={sampling.max_new_tokens} that is "
            f"{total} positions, more than the model's max_seq_len={self.cfg.max_seq_len}; shorten "
            "the prompt or lower max_new_tokens.")

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int = 0,
               stop: Sequence[str] = (), detokenize: Callable[[list[int]], str] | None = None,
               on_text: Callable[[int, str], None] | None = None, chunk_size: int = 0
               ) -> list[Completion]:
    """Continues each prompt (a list of token ids). `detokenize` (ids -> text) is needed for
    `stop` strings, `on_text` (row, new text) streaming and `Completion.text`. chunk_size is
    the number of tokens decoded between host checks (0: 8 when streaming or stopping on
    strings, else all at once)."""
    self._check(prompts, sampling)
    if (stop or on_text) and detokenize is None:
      raise GenerationError("stop strings and streaming need a detokenize function (a tokenizer).")
    prefix_len = 0 if self.prefix_embeddings is None else self.prefix_embeddings.shape[0]
    prompt, key_positions, key_valid = layout(prompts, prefix_len, sampling.max_new_tokens)
    prefix = None
    if self.prefix_embeddings is not None:
      prefix = jnp.broadcast_to(self.prefix_embeddings[None], (len(prompts),) + self.prefix_embeddings.shape)
    eos_id = np.int32(-1 if sampling.eos_id is None else sampling.eos_id)
    program = sampling.program_key()
    state = prefill(self.params, prompt, key_positions, key_valid, eos_id, jax.random.key(seed),
                    prefix, cfg=self.cfg, sampling=program, mesh=self.mesh, prefix_lm=self.prefix_lm)
    first = prefix_len + prompt.shape[1]
    chunk = chunk_size or (8 if (stop or on_text) else sampling.max_new_tokens)
    tracker = _StopTracker(len(prompts), stop, detokenize, on_text, sampling.eos_id)
    while True:
      # One transfer of the whole (small) token buffer; slicing on device would compile per index.
      index, tokens, done = _fetch((state.index, state.tokens, state.done))
      newly_stopped = tracker.update(tokens[:, first:index], full=index - first >= sampling.max_new_tokens)
      if tracker.all_finished():
        break
      if newly_stopped.any():
        state = state._replace(done=jax.device_put(done | newly_stopped, state.done.sharding))
      state = decode_chunk(self.params, state, np.int32(chunk), cfg=self.cfg, sampling=program,
                           mesh=self.mesh)
    return tracker.completions()


def _fetch(tree: Any) -> Any:
  """Global arrays to host numpy; across hosts every process gathers the whole batch."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


class _StopTracker:
  """Host-side bookkeeping between chunks: EOS, stop strings, and the text streamed so far."""

  def __init__(self, batch: int, stop: Sequence[str], detokenize, on_text, eos_id: int | None):
    self.stop, self.detokenize, self.on_text, self.eos_id = tuple(stop), detokenize, on_text, eos_id
    self.tokens: list[list[int]] = [[] for _ in range(batch)]
    self.reason: list[str | None] = [None] * batch
    self.text: list[str | None] = [None] * batch
    self.emitted = [""] * batch

  def all_finished(self) -> bool:
    return all(r is not None for r in self.reason)

  def update(self, new_tokens: np.ndarray, full: bool) -> np.ndarray:
    """Reads each unfinished row's tokens so far; returns rows that a stop string ended now."""
    stopped = np.zeros(len(self.tokens), bool)
    for row, ids in enumerate(new_tokens.tolist()):
      if self.reason[row] is not None:
        continue
      if self.eos_id is not None and self.eos_id in ids:
        ids, self.reason[row] = ids[:ids.index(self.eos_id)], "eos"
      elif full:
        self.reason[row] = "length"
      self.tokens[row] = ids
      if self.detokenize is None:
        continue
      text = self.detokenize(ids)
      cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
      if cut >= 0:
        self.reason[row], stopped[row] = "stop", True
        text = text[:cut]
        self.tokens[row] = ids[:self._stop_token_count(ids)]
      self.text[row] = text
      self._stream(row, text, finished=self.reason[row] is not None)
    return stopped

  def _stop_token_count(self, ids: list[int]) -> int:
    for n in range(1, len(ids) + 1):
      if any(s in self.detokenize(ids[:n]) for s in self.stop):
        return n
    return len(ids)

  def _stream(self, row: int, text: str, finished: bool) -> None:
    if self.on_text is None:
      return
    safe = text
    if not finished:
      safe = safe.rstrip("\ufffd")  # an incomplete multi-byte character
      for s in self.stop:  # hold back what may be the start of a stop string
        for k in range(min(len(s) - 1, len(safe)), 0, -1):
          if safe.endswith(s[:k]):
            safe = safe[:-k]
            break
    if safe.startswith(self.emitted[row]) and len(safe) > len(self.emitted[row]):
      self.on_text(row, safe[len(self.emitted[row]):])
      self.emitted[row] = safe

  def completions(self) -> list[Completion]:
    return [Completion(tokens=t, text=x, finish_reason=r)
            for t, x, r in zip(self.tokens, self.text, self.reason)]


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig, *, mesh: jax.sharding.Mesh | None = None,
             prefix_embeddings: Any | None = None, prefix_lm: bool = False, **kwargs) -> list[Completion]:
  """One-call form of `Generator(cfg, params, mesh, prefix_embeddings, prefix_lm).generate(prompts, ...)`."""
  return Generator(cfg, params, mesh, prefix_embeddings, prefix_lm).generate(prompts, sampling, **kwargs)
