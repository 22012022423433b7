"""Hugging Face import/export: logits equal transformers, exact round trips, greedy decoding, CLI, refusals.

Every model is a small random transformers model with awkward sizes (odd head counts,
a vocabulary of 1000 + 7, GQA ratio 3, an explicit head_dim) whose weights are all
drawn at random (biases and norm weights too, so a wrongly mapped one shows).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxllm.model_dir import load_model_dir  # noqa: E402
from jaxllm.convert import ConvertError, from_hf, to_hf  # noqa: E402
from jaxllm.convert.__main__ import main as convert_main  # noqa: E402
from jaxllm.generate import SamplingConfig, generate  # noqa: E402
from jaxllm.models import build_model  # noqa: E402
from jaxllm.tokenizer import train_bpe  # noqa: E402
from tests.helpers import run_cli  # noqa: E402

VOCAB = 1007


def hf_configs():
  t = transformers
  return {
      "gpt2": t.GPT2Config(n_embd=40, n_layer=2, n_head=5, n_inner=72, vocab_size=VOCAB, n_positions=48,
                           activation_function="gelu_new", layer_norm_epsilon=1e-5,
                           bos_token_id=0, eos_token_id=0),
      "llama_gqa": t.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=2, intermediate_size=72, vocab_size=VOCAB,
                                 max_position_embeddings=48, rope_theta=5000.0, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False),
      "llama_tied_bias": t.LlamaConfig(hidden_size=42, head_dim=16, num_hidden_layers=2,
                                       num_attention_heads=3, num_key_value_heads=1, intermediate_size=56,
                                       vocab_size=VOCAB, max_position_embeddings=48,
                                       tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
      "bloom": t.BloomConfig(hidden_size=48, n_layer=2, n_head=6, vocab_size=VOCAB),
  }


def random_hf_model(config, seed: int = 0):
  """A transformers causal LM with every weight random (norm weights around 1)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = p.ndim == 1 and name.endswith("weight")
      p.copy_(1 + 0.2 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def tokenizer():
  words = "the cat sat on a mat while dogs ran far away from big red trees".split()
  docs = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
  return train_bpe(docs, 300)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer):
  """name -> (HF model, HF dir, jaxllm dir, ModelConfig, params), each converted once per module."""
  cache = {}

  def get(name: str):
    if name not in cache:
      root = tmp_path_factory.mktemp(name)
      model = random_hf_model(hf_configs()[name])
      hf_dir, jx_dir = str(root / "hf"), str(root / "jaxllm")
      model.save_pretrained(hf_dir)
      tokenizer.save_pretrained(hf_dir)
      from_hf(hf_dir, jx_dir)
      model_cfg, params, loaded_tokenizer = load_model_dir(jx_dir)
      assert loaded_tokenizer is not None and len(loaded_tokenizer) == len(tokenizer)
      cache[name] = (model, hf_dir, jx_dir, model_cfg, params)
    return cache[name]
  return get


NAMES = list(hf_configs())


def relative_error(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(zoo, name):
  model, _, _, model_cfg, params = zoo(name)
  ids = np.random.RandomState(1).randint(0, VOCAB, (2, 19))
  ours = jax.jit(build_model(model_cfg).apply)({"params": params}, jnp.asarray(ids))
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  assert ours.shape == theirs.shape == (2, 19, VOCAB)
  assert relative_error(ours, theirs) < 1e-4, name


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches(zoo, name):
  model, _, _, model_cfg, params = zoo(name)
  prompt = [5, 17, 900, 3, 1006]
  [completion] = generate(model_cfg, params, [prompt], SamplingConfig(max_new_tokens=8))
  ours = completion.tokens
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         pad_token_id=0)
  theirs = out[0, len(prompt):].tolist()
  assert ours == theirs, name


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  tensors = {}
  for file in sorted(os.listdir(hf_dir)):
    if file.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(hf_dir, file)))
  return tensors


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_every_tensor(zoo, name, tmp_path):
  model, hf_dir, jx_dir, model_cfg, _ = zoo(name)
  out = str(tmp_path / "exported")
  to_hf(jx_dir, out, max_shard_size="30KB")  # several shards, with an index
  original, exported = read_safetensors(hf_dir), read_safetensors(out)
  assert sorted(exported) == sorted(original), name
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert type(reloaded) is type(model)
  assert transformers.AutoTokenizer.from_pretrained(out)("the cat")["input_ids"]
  if name == "llama_gqa":
    assert reloaded.config.num_key_value_heads == 2 and model_cfg.rope_theta == 5000.0
    assert reloaded.config.rope_parameters["rope_theta"] == 5000.0


def test_pytorch_bin_import_equals_safetensors(zoo, tmp_path):
  """A directory with only pytorch_model.bin (read through torch) gives the same parameters."""
  model, hf_dir, _, _, params = zoo("llama_gqa")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  (bin_dir / "config.json").write_text((open(os.path.join(hf_dir, "config.json"))).read())
  from_hf(str(bin_dir), str(tmp_path / "jx"))
  _, bin_params, _ = load_model_dir(str(tmp_path / "jx"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), bin_params, params)


def test_refusals_are_one_clear_line(tmp_path, capsys):
  bloom = transformers.BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=50,
                                   apply_residual_connection_post_layernorm=True)
  random_hf_model(bloom).save_pretrained(str(tmp_path / "bloom"))
  out = tmp_path / "out"
  with pytest.raises(ConvertError, match="apply_residual_connection_post_layernorm"):
    from_hf(str(tmp_path / "bloom"), str(out))
  assert not out.exists() and not (tmp_path / "out.partial").exists()  # nothing half-written

  llama = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=24, vocab_size=50,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
  random_hf_model(llama).save_pretrained(str(tmp_path / "llama"))
  capsys.readouterr()
  assert convert_main(["from-hf", str(tmp_path / "llama"), str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: LlamaForCausalLM with rope_type='linear' is not supported") and "\n" not in err
  assert not out.exists()

  gptj = transformers.GPTJConfig(n_embd=16, n_layer=1, n_head=2, rotary_dim=4, vocab_size=50)
  gptj.architectures = ["GPTJForCausalLM"]
  gptj.save_pretrained(str(tmp_path / "gptj"))
  with pytest.raises(ConvertError, match="'GPTJForCausalLM' is not supported; jaxllm converts GPT2LMHeadModel"):
    from_hf(str(tmp_path / "gptj"), str(out))


def test_export_refuses_a_model_no_architecture_fits(zoo, tmp_path):
  """A GPT-2 with Bloom's embedding norm exists in jaxllm but in none of the HF classes."""
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  _, _, jx_dir, _, _ = zoo("gpt2")
  odd = tmp_path / "odd"
  shutil.copytree(jx_dir, odd)
  run_config = json.loads((odd / "config.json").read_text())
  run_config["model"]["activation"] = "relu"
  run_config["model"]["embed_norm"] = True
  (odd / "config.json").write_text(json.dumps(run_config))
  with pytest.raises(ConvertError, match=r"GPT2LMHeadModel needs embed_norm=True \(needs False\)"):
    to_hf(str(odd), str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists()


def test_cli_round_trip(zoo, tmp_path, capsys):
  _, hf_dir, _, _, _ = zoo("bloom")
  jx, back = str(tmp_path / "jx"), str(tmp_path / "back")
  result = run_cli("jaxllm.convert", "from-hf", hf_dir, jx, devices=4)
  assert result.returncode == 0, result.stderr
  assert os.path.isdir(os.path.join(jx, "checkpoints", "0", "state"))
  result = run_cli("jaxllm.convert", "to-hf", jx, back, "--step", "0", "--max-shard-size", "1GB")
  assert result.returncode == 0, result.stderr
  assert "BloomForCausalLM" in result.stdout
  assert sorted(os.listdir(back)) == ["README.md", "config.json", "generation_config.json",
                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  assert "Not trained with jaxllm" in open(os.path.join(back, "README.md"), encoding="utf-8").read()
  original, exported = read_safetensors(hf_dir), read_safetensors(back)
  assert sorted(original) == sorted(exported)
  assert all(np.array_equal(original[k], exported[k]) for k in original)
  capsys.readouterr()
  assert convert_main(["to-hf", jx, back]) == 2  # exists: refused before anything is loaded
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1


def test_train_init_from_converted_model(zoo, tmp_path):
  """train --config.init_from=DIR takes DIR's architecture and tokenizer and starts from its weights:
  with a zero learning rate the trained workdir exports back to the original HF tensors (training
  only the MLPs, so the checkpoint keeps the rest apart as frozen parameters)."""
  import json  # pylint: disable=import-outside-toplevel
  from jaxllm import train  # pylint: disable=import-outside-toplevel
  from tests.helpers import make_tiny_config  # pylint: disable=import-outside-toplevel
  _, hf_dir, jx_dir, model_cfg, _ = zoo("llama_gqa")
  config = make_tiny_config(tmp_path, init_from=jx_dir, **{
      "train.steps": 2, "train.log_every": 1, "train.eval_every": 2, "train.checkpoint_every": 2,
      "train.trainable": "/mlp/", "data.seq_len": 16, "optim.lr": 0.0, "optim.min_lr": 0.0, "model.dropout_rate": 0.0})
  workdir = str(tmp_path / "run")
  metrics = train.run(config, workdir)
  assert np.isfinite(metrics["loss"])
  run_config = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert run_config["model"]["d_model"] == 48 and run_config["model"]["position"] == "rotary"
  assert run_config["model"]["num_kv_heads"] == model_cfg.num_kv_heads == 2
  assert len(transformers.AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))) == 300
  out = str(tmp_path / "exported")
  to_hf(workdir, out, step=2)
  original, exported = read_safetensors(hf_dir), read_safetensors(out)
  assert sorted(original) == sorted(exported)
  assert all(np.array_equal(original[k], exported[k]) for k in original)


def test_import_is_tensor_by_tensor_and_lands_sharded(tmp_path):
  """Host memory during import stays near one tensor (not the model), each tensor is read once,
  and every parameter arrives split over the 8 devices as its logical axes say."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  from jaxllm.convert import get_architecture  # pylint: disable=import-outside-toplevel
  from jaxllm.convert import importer  # pylint: disable=import-outside-toplevel
  from jaxllm.convert.source import TensorSource  # pylint: disable=import-outside-toplevel
  config = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                                    intermediate_size=256, vocab_size=64, max_position_embeddings=32)
  model = random_hf_model(config)
  model.save_pretrained(str(tmp_path))
  sizes = [p.numel() * 4 for p in model.state_dict().values()]
  assert sum(sizes) > 30 * max(sizes)
  model_cfg = importer.ModelConfig.from_config(importer.model_section(importer.read_hf_config(str(tmp_path))))
  mesh = importer.default_mesh()
  layout = importer.target_layout(model_cfg, mesh)
  # The first import also compiles the on-device stacking of the scanned layers (one small
  # program per parameter shape, Python-side objects that do not grow with the model): warm up.
  importer.load_hf_params(str(tmp_path), get_architecture("LlamaForCausalLM"), model_cfg, mesh, layout)
  reads = []
  original_get = TensorSource.get
  TensorSource.get = lambda self, name: reads.append(name) or original_get(self, name)
  tracemalloc.start()
  try:
    params = importer.load_hf_params(str(tmp_path), get_architecture("LlamaForCausalLM"), model_cfg, mesh,
                                     layout)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
    TensorSource.get = original_get
  assert sorted(reads) == sorted(model.state_dict()) and len(set(reads)) == len(reads)
  # Measured: 0.48 MB peak for a 5.3 MB model whose largest tensor is 0.13 MB (read + transposed copy).
  assert peak < 6 * max(sizes) < sum(sizes) / 6, (peak, max(sizes), sum(sizes))
  wi = params["layers"]["mlp"]["wi_gate"]["kernel"]  # [layers, embed, mlp]: embed split over fsdp=8
  assert wi.sharding.mesh.shape["fsdp"] == 8 and tuple(wi.sharding.spec)[:2] == (None, "fsdp")
  assert {s.data.shape for s in wi.addressable_shards} == {(8, 16, 256)}
  np.testing.assert_array_equal(np.asarray(wi[3]), model.state_dict()["model.layers.3.mlp.gate_proj.weight"].numpy().T)


def test_hub_style_gpt2_names_and_buffers(zoo, tmp_path):
  """GPT-2 files on the hub were saved from GPT2Model: names lack `transformer.` and the causal-mask
  buffers `h.N.attn.bias` sit among the weights; with no `architectures` in config.json the
  model_type decides. All import to the same parameters."""
  import json  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  _, hf_dir, _, model_cfg, params = zoo("gpt2")
  hub = tmp_path / "hub"
  hub.mkdir()
  hf_config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  del hf_config["architectures"]  # old hub configs may lack it; model_type decides then
  (hub / "config.json").write_text(json.dumps(hf_config))
  tensors = {k.removeprefix("transformer."): v for k, v in read_safetensors(hf_dir).items()}
  for i in range(model_cfg.num_layers):
    tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))
  save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
  from_hf(str(hub), str(tmp_path / "jx"))
  _, hub_params, _ = load_model_dir(str(tmp_path / "jx"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), hub_params, params)


def test_bfloat16_checkpoint_round_trip(tmp_path):
  """bf16 HF weights become exact float32 jaxllm weights and come back bit for bit with --dtype bfloat16."""
  model = random_hf_model(hf_configs()["llama_gqa"]).to(torch.bfloat16)
  model.save_pretrained(str(tmp_path / "hf"))
  from_hf(str(tmp_path / "hf"), str(tmp_path / "jx"))
  cfg, params, _ = load_model_dir(str(tmp_path / "jx"))
  assert cfg.param_dtype == "float32" and params["embed"]["embedding"].dtype == jnp.float32
  to_hf(str(tmp_path / "jx"), str(tmp_path / "back"), dtype="bfloat16")
  original, exported = read_safetensors(str(tmp_path / "hf")), read_safetensors(str(tmp_path / "back"))
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key


def test_export_takes_the_runs_data_tokenizer_when_the_dir_has_none(zoo, tmp_path):
  """A run trained with data.tokenizer=PATH has no tokenizer/ of its own; to-hf ships PATH's."""
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  _, hf_dir, jx_dir, _, _ = zoo("gpt2")
  run = tmp_path / "run"
  shutil.copytree(jx_dir, run)
  shutil.rmtree(run / "tokenizer")
  run_config = json.loads((run / "config.json").read_text())
  run_config["data"]["tokenizer"] = hf_dir
  (run / "config.json").write_text(json.dumps(run_config))
  to_hf(str(run), str(tmp_path / "hf"))
  assert len(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))) == 300
