"""KV-cache generation: cached logits vs the full forward, batching, sampling, EOS, stop strings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.generate import Generator, SamplingConfig, init_cache, layout
from jaxllm.models import GPT, ModelConfig
from jaxllm.sampling import GenerationError, sample

POSITIONS = {
    "learned": dict(position="learned"),
    "rotary_gqa": dict(position="rotary", num_kv_heads=2, norm="rmsnorm", activation="swiglu",
                       use_bias=False, tie_embeddings=False),
    "alibi": dict(position="alibi", embed_norm=True, num_heads=6, d_model=48),
}
ALPHABET = "abcdefghijklmnopqrstuvwxyz ."


def tiny(**overrides) -> ModelConfig:
  # init_std 0.3 makes the next-token distribution peaked, so greedy ties cannot flip on noise.
  values = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=64,
                init_std=0.3)
  values.update(overrides)
  return ModelConfig(**values)


def init_params(cfg: ModelConfig, seed: int = 0):
  return nn.meta.unbox(GPT(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def detokenize(ids):
  return "".join(ALPHABET[i % len(ALPHABET)] for i in ids)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", list(POSITIONS))
def test_cached_logits_match_full_forward(name, scan_layers):
  """Prefill + one token at a time on a left-padded batch gives, at every step, the logits
  of the full-sequence forward of each row alone (stacked cache for scanned layers, else one per layer)."""
  cfg = tiny(**POSITIONS[name], scan_layers=scan_layers)
  model, params = GPT(cfg), init_params(cfg)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 64, 5).tolist(), rng.integers(0, 64, 11).tolist()]
  steps = 6
  continuation = rng.integers(0, 64, (2, steps)).astype(np.int32)
  prompt, key_positions, key_valid = layout(prompts, 0, steps)
  cache = init_cache(cfg, 2, key_positions.shape[1])
  decode = jax.jit(lambda tokens, cache, index: model.apply(
      {"params": params}, tokens, cache, index, key_positions, key_valid, method=GPT.decode))
  cached = []
  logits, cache = decode(prompt, cache, jnp.int32(0))
  cached.append(logits)
  for t in range(steps - 1):
    logits, cache = decode(continuation[:, t:t + 1], cache, jnp.int32(prompt.shape[1] + t))
    cached.append(logits)
  cached = np.stack(cached, axis=1)  # [batch, steps, vocab]
  # Each row alone, right-padded to one length (causal: padding after a token cannot change it).
  full_len = max(len(p) for p in prompts) + steps
  rows = np.zeros((2, full_len), np.int32)
  for row, p in enumerate(prompts):
    rows[row, :len(p) + steps] = p + continuation[row].tolist()
  full = jax.jit(lambda tokens: model.apply({"params": params}, tokens))(rows)
  for row, p in enumerate(prompts):
    expected = full[row, len(p) - 1:len(p) - 1 + steps]
    np.testing.assert_allclose(cached[row], expected, atol=1e-4, rtol=1e-4)


def test_prefix_embeddings_act_as_prompt_tokens():
  """Soft-prompt slot: prefix embeddings equal to token embeddings decode like those tokens."""
  cfg = tiny()
  model, params = GPT(cfg), init_params(cfg)
  head, tail = [3, 9, 27], [5, 1]
  prefix = params["embed"]["embedding"][jnp.asarray(head)][None]
  prompt, key_positions, key_valid = layout([tail], 3, 1)
  cache = init_cache(cfg, 1, key_positions.shape[1])
  logits, _ = jax.jit(lambda *a: model.apply({"params": params}, *a, method=GPT.decode))(
      prompt, cache, jnp.int32(0), key_positions, key_valid, prefix)
  full = jax.jit(lambda tokens: model.apply({"params": params}, tokens))(np.asarray([head + tail]))[0, -1]
  np.testing.assert_allclose(logits[0], full, atol=1e-4, rtol=1e-4)


def test_prefix_lm_prefill_matches_the_full_forward_with_the_prefix_mask():
  """A prefix-LM model (sft.prefix_lm): on a left-padded batch, the first-step logits (prefill,
  the prompt bidirectional) and every later step's (causal over the cache) equal the full
  forward of each row alone with in_prefix over its prompt; greedy generate follows them."""
  cfg = tiny(**POSITIONS["rotary_gqa"])
  model, params = GPT(cfg), init_params(cfg, seed=2)
  prompts = [[5, 17, 3, 40, 22], [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 11]]
  steps = 4
  completions = Generator(cfg, params, prefix_lm=True).generate(prompts, SamplingConfig(max_new_tokens=steps))
  forward = jax.jit(lambda tokens, in_prefix: model.apply({"params": params}, tokens, in_prefix=in_prefix))
  prompt, key_positions, key_valid = layout(prompts, 0, steps)
  decode = jax.jit(lambda tokens, cache, index, bidirectional: model.apply(
      {"params": params}, tokens, cache, index, key_positions, key_valid, bidirectional=bidirectional,
      method=GPT.decode), static_argnums=3)
  logits, cache = decode(prompt, init_cache(cfg, 2, key_positions.shape[1]), jnp.int32(0), True)
  cached = [logits]
  generated = np.asarray([c.tokens for c in completions], np.int32)
  for t in range(steps - 1):
    logits, cache = decode(generated[:, t:t + 1], cache, jnp.int32(prompt.shape[1] + t), False)
    cached.append(logits)
  for row, p in enumerate(prompts):
    tokens = np.asarray([p + generated[row].tolist()], np.int32)
    in_prefix = np.arange(tokens.shape[1])[None] < len(p)
    full = np.asarray(forward(tokens, in_prefix))[0, len(p) - 1:len(p) - 1 + steps]
    np.testing.assert_allclose(np.stack([np.asarray(c[row]) for c in cached]), full, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(generated[row], full.argmax(-1))  # greedy follows these logits
    causal = np.asarray(forward(tokens, None))[0, len(p) - 1]
    assert np.abs(causal - full[0]).max() > 1e-3, "the prefix mask should change the first step"


@pytest.fixture(scope="module")
def alibi_generator():
  cfg = tiny(**POSITIONS["alibi"])
  return Generator(cfg, init_params(cfg, seed=1))


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [40, 41], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]
NEW = 12


@pytest.fixture(scope="module")
def greedy_batch(alibi_generator):
  return alibi_generator.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW))


def test_batch_equals_solo(alibi_generator, greedy_batch):
  assert all(c.finish_reason == "length" and len(c.tokens) == NEW for c in greedy_batch)
  assert len({tuple(c.tokens) for c in greedy_batch}) == len(PROMPTS)  # rows really differ
  for prompt, batched in zip(PROMPTS, greedy_batch):
    [solo] = alibi_generator.generate([prompt], SamplingConfig(max_new_tokens=NEW))
    assert solo.tokens == batched.tokens


def test_top_k_1_and_temperature_0_are_greedy(alibi_generator, greedy_batch):
  greedy = [c.tokens for c in greedy_batch]
  top1 = alibi_generator.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW, temperature=1.5, top_k=1),
                                  seed=3)
  assert [c.tokens for c in top1] == greedy
  cold = alibi_generator.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW, temperature=0.0, top_k=5,
                                                          top_p=0.5), seed=4)
  assert [c.tokens for c in cold] == greedy


def test_seed_reproducible_and_sampling_differs(alibi_generator, greedy_batch):
  sampling = SamplingConfig(max_new_tokens=NEW, temperature=2.0)
  a = alibi_generator.generate(PROMPTS, sampling, seed=7)
  b = alibi_generator.generate(PROMPTS, sampling, seed=7)
  c = alibi_generator.generate(PROMPTS, sampling, seed=8)
  assert [x.tokens for x in a] == [x.tokens for x in b]
  assert [x.tokens for x in a] != [x.tokens for x in c]
  assert [x.tokens for x in a] != [x.tokens for x in greedy_batch]


def test_eos_ends_only_its_row(alibi_generator, greedy_batch):
  greedy = [c.tokens for c in greedy_batch]
  eos = greedy[0][4]
  out = alibi_generator.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW, eos_id=eos))
  for tokens, c in zip(greedy, out):
    if eos in tokens:
      assert c.tokens == tokens[:tokens.index(eos)] and c.finish_reason == "eos"
    else:
      assert c.tokens == tokens and c.finish_reason == "length"


def test_stop_strings_and_streaming(alibi_generator, greedy_batch):
  texts = [detokenize(c.tokens) for c in greedy_batch]
  stop = texts[1][5:7]
  streamed = ["", "", ""]

  def on_text(row, delta):
    streamed[row] += delta

  out = alibi_generator.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW), stop=[stop, "@@"],
                                 detokenize=detokenize, on_text=on_text, chunk_size=3)
  for c, tokens, text, got in zip(greedy_batch, [c.tokens for c in greedy_batch], texts, out):
    cut = text.find(stop)
    if cut < 0:
      assert (got.tokens, got.text, got.finish_reason) == (tokens, text, "length")
    else:
      n = next(n for n in range(1, len(tokens) + 1) if stop in detokenize(tokens[:n]))
      assert (got.tokens, got.text, got.finish_reason) == (tokens[:n], text[:cut], "stop")
  assert out[1].finish_reason == "stop"
  assert streamed == [c.text for c in out]


def test_sampling_filters():
  """Draws only from the top-k / top-p set, with the renormalised probabilities."""
  logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  logits = jnp.repeat(logits, 20000, axis=0)
  seen = jnp.zeros(logits.shape, bool)
  counts = lambda s: np.bincount(np.asarray(sample(logits, seen, jax.random.key(0), s)),  # noqa: E731
                                 minlength=5) / logits.shape[0]
  np.testing.assert_allclose(counts(SamplingConfig(temperature=1.0, top_k=2)),
                             [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.015)
  # top_p=0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; the rest go.
  np.testing.assert_allclose(counts(SamplingConfig(temperature=1.0, top_p=0.75)),
                             [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.015)
  penalised = sample(logits[:1], jnp.asarray([[False, True, False, False, False]]), None,
                     SamplingConfig(repetition_penalty=2.0))
  assert int(penalised[0]) == 3  # log 0.4 < 0 is multiplied by 2, so 0.3 wins


def test_matches_hf_logits_processors():
  torch = pytest.importorskip("torch")
  from transformers.generation.logits_process import (  # pylint: disable=import-outside-toplevel
      RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
  from jaxllm.sampling import apply_repetition_penalty, filter_logits  # pylint: disable=import-outside-toplevel
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  ids = np.random.default_rng(1).integers(0, 50, (4, 7))
  seen = np.zeros((4, 50), bool)
  np.put_along_axis(seen, ids, True, axis=1)
  hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits)).numpy()
  np.testing.assert_allclose(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3), hf,
                             rtol=1e-6)
  s = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8)
  hf = torch.tensor(logits)
  for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
    hf = warper(None, hf)
  ours = np.asarray(filter_logits(jnp.asarray(logits), s))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(hf.numpy()))
  np.testing.assert_allclose(ours[~np.isinf(ours)], hf.numpy()[~np.isinf(ours)], rtol=1e-6)


def test_clear_errors():
  cfg = tiny()
  gen = Generator(cfg, init_params(cfg))
  with pytest.raises(GenerationError, match="max_seq_len=64"):
    gen.generate([[1] * 60], SamplingConfig(max_new_tokens=10))
  with pytest.raises(GenerationError, match="outside the model's vocabulary"):
    gen.generate([[1, 99]], SamplingConfig(max_new_tokens=2))
  with pytest.raises(GenerationError, match="prompt 1 is empty"):
    gen.generate([[1], []], SamplingConfig(max_new_tokens=2))
  with pytest.raises(GenerationError, match="top_p"):
    SamplingConfig(top_p=0.0)
