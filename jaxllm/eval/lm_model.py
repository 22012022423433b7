"""A jaxllm model as an EleutherAI lm-evaluation-harness model (`lm_eval.api.model.LM`).

It answers lm-eval's three request types as its `hf` backend (HFLM) does, so that a task's
figures are the same whichever backend runs the same weights:

  loglikelihood          (context, continuation) -> (sum of the continuation's log-probs,
                         whether greedy decoding would produce it); contexts are encoded by
                         lm-eval's TemplateLM rules (trailing spaces move to the continuation,
                         the pair is encoded whole and split, an empty context is the prefix
                         token), and context + continuation keep their last max_length + 1 tokens.
  loglikelihood_rolling  a whole text, in lm-eval's disjoint rolling windows of max_length
                         tokens after the prefix token; the windows' sums add up.
  generate_until         the KV-cache generator, greedy unless do_sample, up to max_gen_toks
                         new tokens, cut at the `until` strings (and EOS).

Requests are sorted longest first (lm-eval's Collator) and batched; scores come from
`jaxllm.eval.scoring` and generations from `jaxllm.generate.Generator`, both on the mesh.
This module imports lm_eval: import it only when the `eval` extra is wanted.
"""

from __future__ import annotations

from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)

from jaxllm import progress
from jaxllm.errors import ConfigError
from jaxllm.eval.scoring import Scorer
from jaxllm.generate import Generator, SamplingConfig

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


class JaxLM(TemplateLM):
  """lm-eval model over one jaxllm model's (cfg, params, tokenizer), on `mesh`."""

  def __init__(self, cfg: Any, params: Any, tokenizer: Any, mesh: Any = None, batch_size: int = 8,
               seed: int = 0):
    super().__init__()
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.scorer = Scorer(cfg, mesh, batch_size)
    self.generator = Generator(cfg, params, mesh)
    self.batch_size = self.scorer.batch_size
    self.seed = seed

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_input_len

  @property
  def max_gen_toks(self) -> int:
    return DEFAULT_MAX_GEN_TOKS

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The tokenizer's own special-token rule unless told; none added to a text that already
    starts with the prefix token (as HFLM)."""
    del kwargs
    if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
      add_special_tokens = False
    options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return self.tokenizer.encode(string, **options)

  def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """requests: ((context, continuation) or None, context ids, continuation ids)."""
    del kwargs
    reorder = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
    results = []
    with progress.bar(len(requests), desc="loglikelihood", unit="request") as bar:
      for chunk in reorder.get_batched(n=self.batch_size):
        for req in chunk:
          if not req[2] or len(req[2]) > self.max_length:
            raise ConfigError(f"a continuation of {len(req[2])} tokens cannot be scored: the model "
                              f"reads 1 to {self.max_length} tokens.")
        # The last max_length + 1 tokens: the inputs fill the positions, the last is only a target.
        rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
        for (request, _, continuation), scores in zip(chunk, self.scorer.score(self.params, rows)):
          n = len(continuation)
          answer = (float(scores.logprobs[-n:].sum()), bool(scores.greedy[-n:].all()))
          results.append(answer)
          if request is not None:
            self.cache_hook.add_partial("loglikelihood", request, answer)
        if not disable_tqdm:
          bar.update(len(chunk))
    return reorder.get_original(results)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for index, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(index)
    sums = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      sums[owner] += logprob
    for req, total in zip(requests, sums):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return sums

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    reorder = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                       group_by="gen_kwargs", group_fn=lambda r: r[1])
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    results = []
    with progress.bar(len(requests), desc="generate_until", unit="request") as bar:
      for chunk in reorder.get_batched(n=self.batch_size):
        contexts, all_kwargs = zip(*chunk)
        texts = self._generate(list(contexts), dict(all_kwargs[0]), eos)
        for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
          results.append(text)
          self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        if not disable_tqdm:
          bar.update(len(chunk))
    return reorder.get_original(results)

  def _generate(self, contexts: list[str], gen_kwargs: dict, eos: str) -> list[str]:
    """One batch of contexts that share generation kwargs -> their continuations' text."""
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = int(kwargs.pop("max_gen_toks"))
    max_context = self.max_length - max_gen_toks
    if max_context <= 0:
      raise ConfigError(f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                        f"{self.max_length} positions.")
    prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-max_context:] for c in contexts]
    sampling = SamplingConfig(max_new_tokens=max_gen_toks,
                              temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                              top_p=float(kwargs.get("top_p", 1.0) or 1.0), top_k=int(kwargs.get("top_k", 0) or 0),
                              eos_id=self.eot_token_id)
    # A full batch every time (the last prompt repeated): each batch shape compiles once.
    padded = prompts + [prompts[-1]] * (self.batch_size - len(prompts))
    self.seed += 1
    completions = self.generator.generate(padded, sampling, seed=self.seed, stop=until,
                                          detokenize=lambda ids: self.tok_decode(ids))
    # As HFLM: the decoded continuation, cut at the first stop string.
    return [postprocess_generated_text(self.tok_decode(c.tokens), until, None)
            for c in completions[:len(prompts)]]
