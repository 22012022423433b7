"""Greedy generation equals Hugging Face `generate` on random GPT-2, LLaMA (GQA) and Bloom
models imported with `jaxllm.convert`; the same on a sharded mesh; the CLI streams what the
library returns and fails with one clear line."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxllm.generate import Generator, SamplingConfig, layout, prefill
from jaxllm.models import GPT
from jaxllm.sharding import logical_shardings, make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7], [100, 3, 64, 12, 55, 9, 1, 80, 23, 4, 77]]
NEW = 10
VOCAB = 320


def hf_config(name: str):
  t = transformers
  # initializer_range 0.3 makes next-token distributions peaked: no near-ties for noise to flip.
  common = dict(vocab_size=VOCAB, initializer_range=0.3, bos_token_id=None, eos_token_id=None)
  return {
      "gpt2": lambda: t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common),
      "llama": lambda: t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=64, tie_word_embeddings=False, **common),
      "bloom": lambda: t.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common),
  }[name]()


def hf_greedy(hf, prompt, new=NEW, **kwargs):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tokenizer():
  from jaxllm.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel
  from tests.helpers import _WORDS  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  return train_bpe([" ".join(rng.choice(_WORDS, 30)) for _ in range(50)], vocab_size=300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
  """name -> (HF model, jaxllm model dir, ModelConfig, params, HF greedy output per prompt):
  a random HF model imported with `jaxllm.convert.from_hf`, once per module."""
  from jaxllm.model_dir import load_model_dir  # pylint: disable=import-outside-toplevel
  from jaxllm.convert import from_hf  # pylint: disable=import-outside-toplevel
  cache = {}

  def get(name):
    if name not in cache:
      torch.manual_seed(0)
      hf = transformers.AutoModelForCausalLM.from_config(hf_config(name)).eval()
      root = tmp_path_factory.mktemp(name)
      hf.save_pretrained(str(root / "hf"))
      tokenizer.save_pretrained(str(root / "hf"))
      from_hf(str(root / "hf"), str(root / "jaxllm"))
      cfg, params, _ = load_model_dir(str(root / "jaxllm"))
      cache[name] = (hf, str(root / "jaxllm"), cfg, params, [hf_greedy(hf, p) for p in PROMPTS])
    return cache[name]
  return get


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_greedy_batch_matches_hf_solo(converted, name):
  """Each row of a left-padded batch equals HF's greedy output for that prompt alone
  (learned positions; rotary + grouped-query attention; ALiBi)."""
  _, _, cfg, params, expected = converted(name)
  out = Generator(cfg, params).generate(PROMPTS, SamplingConfig(max_new_tokens=NEW))
  assert [c.tokens for c in out] == expected
  assert len({tuple(e) for e in expected}) == len(PROMPTS)


def test_repetition_penalty_matches_hf(converted):
  hf, _, cfg, params, expected = converted("gpt2")
  sampling = SamplingConfig(max_new_tokens=NEW, repetition_penalty=1.8)
  [out] = Generator(cfg, params).generate([PROMPTS[0]], sampling)
  assert out.tokens == hf_greedy(hf, PROMPTS[0], repetition_penalty=1.8)
  assert out.tokens != expected[0]  # the penalty changed something


def test_sharded_mesh_matches_hf(converted):
  """On a data=4 x tensor=2 mesh (cache batch over data, kv heads over tensor) the output is
  the same, with grouped-query attention."""
  _, _, cfg, params, expected = converted("llama")
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=2)))
  boxed = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
  params = jax.device_put(params, logical_shardings(boxed, mesh))
  prompts = PROMPTS + [PROMPTS[0]]
  out = Generator(cfg, params, mesh).generate(prompts, SamplingConfig(max_new_tokens=NEW))
  assert [c.tokens for c in out] == expected + expected[:1]
  # Where the cache lives (this prefill call hits generate's compiled program).
  prompt, key_positions, key_valid = layout(prompts, 0, NEW)
  state = prefill(params, prompt, key_positions, key_valid, np.int32(-1), jax.random.key(0), None,
                  cfg=cfg, sampling=SamplingConfig().program_key(), mesh=mesh)
  spec = tuple(state.cache.k.sharding.spec)[1:] + (None,) * 4  # [layers, batch, kv_heads, max_len, head_dim]
  assert spec[:4] == ("data", "tensor", None, None)


def test_cli_streams_library_output(converted, tokenizer):
  """The CLI on an imported model directory streams exactly the library's greedy text."""
  from tests.helpers import run_cli  # pylint: disable=import-outside-toplevel
  _, path, cfg, params, _ = converted("gpt2")
  prompt = "the cat sat"
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  sampling = SamplingConfig(max_new_tokens=12, eos_id=tokenizer.eos_token_id)
  [expected] = Generator(cfg, params).generate(
      [ids], sampling, detokenize=lambda t: tokenizer.decode(t, skip_special_tokens=True))
  result = run_cli("jaxllm.generate", "--checkpoint", path, "--prompt", prompt, "--max-new-tokens", "12",
                   "--temperature", "0", timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout == prompt + expected.text + "\n"
  assert "tokens in" in result.stderr


def test_cli_prompt_file_and_samples(converted, tmp_path, capsys):
  from jaxllm.generate.__main__ import main  # pylint: disable=import-outside-toplevel
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "the cat"}\n\n{"prompt": "red trees\\nand"}\n', encoding="utf-8")
  argv = ["--checkpoint", converted("gpt2")[1], "--prompt-file", str(prompts), "--num-samples", "2",
          "--max-new-tokens", "6", "--temperature", "1.0", "--top-k", "20", "--seed", "3"]
  assert main(argv) == 0
  out = capsys.readouterr().out
  headers = [line for line in out.splitlines() if line.startswith("=== ")]
  assert headers == [f"=== prompt {p} sample {s} (length) ===" for p in (0, 1) for s in (0, 1)]
  assert out.count("\nthe cat") == 2 and out.count("red trees\nand") == 2
  assert main(argv) == 0
  assert capsys.readouterr().out == out  # the seed reproduces


def test_cli_batches_of_a_prompt_file_print_what_one_batch_prints_under_a_bar(converted, tmp_path, capsys,
                                                                             monkeypatch):
  """--batch-size splits the rows (greedy: each row's text is its solo text); the bar is on stderr."""
  from jaxllm.generate.__main__ import main  # pylint: disable=import-outside-toplevel
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the cat\nred trees and\nbig birds sang songs of\nold kings\n", encoding="utf-8")
  argv = ["--checkpoint", converted("gpt2")[1], "--prompt-file", str(prompts), "--max-new-tokens", "5",
          "--temperature", "0"]
  capsys.readouterr()
  monkeypatch.setenv("JAXLLM_PROGRESS", "1")
  assert main(argv + ["--batch-size", "2"]) == 0
  batched = capsys.readouterr()
  monkeypatch.setenv("JAXLLM_PROGRESS", "0")
  assert main(argv) == 0
  whole = capsys.readouterr()
  assert batched.out == whole.out and whole.out.count("=== prompt ") == 4
  assert "generating" in batched.err and "0/4" in batched.err
  assert "generating" not in whole.err


def test_cli_errors(converted, tmp_path, capsys):
  from jaxllm.generate.__main__ import main  # pylint: disable=import-outside-toplevel
  path = converted("gpt2")[1]
  cases = [
      (["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], "no such directory"),
      (["--checkpoint", path], "no prompt"),
      (["--checkpoint", path, "--prompt-file", str(tmp_path / "missing.txt")], "no such file"),
      (["--checkpoint", path, "--prompt", "x", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
      (["--checkpoint", path, "--prompt", "x", "--max-new-tokens", "100"], "max_seq_len=64"),
      (["--checkpoint", path, "--prompt", "x", "--mesh", "3,1,1"], "mesh"),
      (["--checkpoint", path, "--prompt", "x", "--batch-size", "0"], "--batch-size=0"),
  ]
  capsys.readouterr()  # drop what building the fixture model printed (transformers' progress bars)
  for argv, message in cases:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
  assert not os.path.exists(tmp_path / "nope")
