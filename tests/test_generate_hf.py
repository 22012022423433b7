"""Greedy generation equals Hugging Face `generate` on random GPT-2 and LLaMA models; the same
on a sharded mesh; the CLI streams what the library returns and fails with one clear line."""

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxllm.generate import Generator, SamplingConfig, layout, prefill
from jaxllm.models import GPT, ModelConfig
from jaxllm.sharding import logical_shardings, make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7], [100, 3, 64, 12, 55, 9, 1, 80, 23, 4, 77]]
NEW = 10


def _np(t):
  return t.detach().numpy().astype(np.float32)


def gpt2_pair(vocab_size=128):
  """A random HF GPT-2 and the same weights as jaxllm params (GPT-2's Conv1D is x @ W)."""
  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                   initializer_range=0.3, bos_token_id=None, eos_token_id=None)
  hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
  cfg = ModelConfig(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=4, max_seq_len=64,
                    position="learned", norm="layernorm", activation="gelu_tanh", norm_eps=1e-5)
  sd = {k: _np(v) for k, v in hf.state_dict().items()}
  d, h, hd = 32, 4, 8
  params = {"embed": {"embedding": sd["transformer.wte.weight"]},
            "pos_embed": {"embedding": sd["transformer.wpe.weight"]},
            "final_norm": {"scale": sd["transformer.ln_f.weight"], "bias": sd["transformer.ln_f.bias"]}}
  for i in range(2):
    p = f"transformer.h.{i}."
    w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
    attn = {name: {"kernel": w[:, j * d:(j + 1) * d].reshape(d, h, hd),
                   "bias": b[j * d:(j + 1) * d].reshape(h, hd)}
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": sd[p + "attn.c_proj.weight"].reshape(h, hd, d), "bias": sd[p + "attn.c_proj.bias"]}
    params[f"layer_{i}"] = {
        "attn": attn,
        "attn_norm": {"scale": sd[p + "ln_1.weight"], "bias": sd[p + "ln_1.bias"]},
        "mlp_norm": {"scale": sd[p + "ln_2.weight"], "bias": sd[p + "ln_2.bias"]},
        "mlp": {"wi": {"kernel": sd[p + "mlp.c_fc.weight"], "bias": sd[p + "mlp.c_fc.bias"]},
                "wo": {"kernel": sd[p + "mlp.c_proj.weight"], "bias": sd[p + "mlp.c_proj.bias"]}}}
  return hf, cfg, params


def llama_pair():
  """A random HF LLaMA with grouped-query attention (4 heads, 2 kv heads) and its jaxllm params."""
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.3,
                                    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  cfg = ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    max_seq_len=64, position="rotary", norm="rmsnorm", activation="swiglu",
                    use_bias=False, tie_embeddings=False, norm_eps=1e-5)
  sd = {k: _np(v) for k, v in hf.state_dict().items()}
  params = {"embed": {"embedding": sd["model.embed_tokens.weight"]},
            "final_norm": {"scale": sd["model.norm.weight"]},
            "lm_head": {"kernel": sd["lm_head.weight"].T}}
  for i in range(2):
    p = f"model.layers.{i}."
    heads = lambda name, n: sd[p + f"self_attn.{name}.weight"].T.reshape(32, n, 8)  # noqa: E731
    params[f"layer_{i}"] = {
        "attn": {"query": {"kernel": heads("q_proj", 4)}, "key": {"kernel": heads("k_proj", 2)},
                 "value": {"kernel": heads("v_proj", 2)},
                 "out": {"kernel": sd[p + "self_attn.o_proj.weight"].T.reshape(4, 8, 32)}},
        "attn_norm": {"scale": sd[p + "input_layernorm.weight"]},
        "mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        "mlp": {"wi_gate": {"kernel": sd[p + "mlp.gate_proj.weight"].T},
                "wi_up": {"kernel": sd[p + "mlp.up_proj.weight"].T},
                "wo": {"kernel": sd[p + "mlp.down_proj.weight"].T}}}
  return hf, cfg, params


def hf_greedy(hf, prompt, new=NEW, **kwargs):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
  hf, cfg, params = {"gpt2": gpt2_pair, "llama": llama_pair}[request.param]()
  return request.param, hf, cfg, params, [hf_greedy(hf, p) for p in PROMPTS]


def test_greedy_batch_matches_hf_solo(pair):
  """Each row of a left-padded batch equals HF's greedy output for that prompt alone."""
  _, _, cfg, params, expected = pair
  out = Generator(cfg, params).generate(PROMPTS, SamplingConfig(max_new_tokens=NEW))
  assert [c.tokens for c in out] == expected
  assert len({tuple(e) for e in expected}) == len(PROMPTS)


def test_repetition_penalty_matches_hf():
  hf, cfg, params = gpt2_pair()
  prompt = PROMPTS[0]
  [out] = Generator(cfg, params).generate([prompt], SamplingConfig(max_new_tokens=NEW, repetition_penalty=1.8))
  assert out.tokens == hf_greedy(hf, prompt, repetition_penalty=1.8)
  assert out.tokens != hf_greedy(hf, prompt)  # the penalty changed something


def test_sharded_mesh_matches_hf(pair):
  """On a data x tensor mesh (cache batch over data, kv heads over tensor) the output is the same."""
  name, _, cfg, params, expected = pair
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=2)))
  boxed = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
  params = jax.device_put(params, logical_shardings(boxed, mesh))
  prompts = PROMPTS + [PROMPTS[0]]
  out = Generator(cfg, params, mesh).generate(prompts, SamplingConfig(max_new_tokens=NEW))
  assert [c.tokens for c in out] == expected + expected[:1]
  if name == "llama":  # check where the cache lives (prefill's compiled call is cached)
    prompt, key_positions, key_valid = layout(prompts, 0, NEW)
    state = prefill(params, prompt, key_positions, key_valid, np.int32(-1), jax.random.key(0), None,
                    cfg=cfg, sampling=SamplingConfig().program_key(), mesh=mesh)
    spec = state.cache[0].k.sharding.spec
    assert tuple(spec)[:3] == ("data", None, "tensor"), spec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A jaxllm model directory (config.json, tokenizer/, checkpoint) with a random GPT-2."""
  from jaxllm.checkpoint import save_model_dir  # pylint: disable=import-outside-toplevel
  from jaxllm.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel
  from tests.helpers import _WORDS  # pylint: disable=import-outside-toplevel
  _, cfg, params = gpt2_pair(vocab_size=320)
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(_WORDS, 30)) for _ in range(50)]
  tokenizer = train_bpe(texts, vocab_size=300)
  path = str(tmp_path_factory.mktemp("model"))
  save_model_dir(path, {"model": dataclasses.asdict(cfg)}, params, tokenizer)
  return path, cfg, params, tokenizer


def test_cli_streams_library_output(model_dir):
  from tests.helpers import run_cli  # pylint: disable=import-outside-toplevel
  path, cfg, params, tokenizer = model_dir
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


def test_cli_errors(model_dir, tmp_path, capsys):
  from jaxllm.generate_cli import main  # pylint: disable=import-outside-toplevel
  path = model_dir[0]
  cases = [
      (["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], "no config.json"),
      (["--checkpoint", path], "no prompt"),
      (["--checkpoint", path, "--prompt-file", str(tmp_path / "missing.txt")], "no such file"),
      (["--checkpoint", path, "--prompt", "x", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
      (["--checkpoint", path, "--prompt", "x", "--max-new-tokens", "100"], "max_seq_len=64"),
      (["--checkpoint", path, "--prompt", "x", "--mesh", "3,1,1"], "mesh"),
  ]
  for argv, message in cases:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
  assert not os.path.exists(tmp_path / "nope")
