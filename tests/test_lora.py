"""LoRA: the layer, training on the frozen split, PEFT adapters both ways, merged export, int8 bases.

Tiny random Hugging Face models of each family are made on the spot (no downloads) and imported
with `convert from-hf`; PEFT (torch CPU) is the reference for the adapted logits.
"""

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxllm import model_dir
from jaxllm.config import ConfigError
from jaxllm.convert import from_hf
from jaxllm.models import ModelConfig, abstract_params, build_model, stacking
from jaxllm.models.lora import LORA_A, LORA_B

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from tests.test_prompt_tuning import base, sft_file  # noqa: E402,F401  (fixtures: a GPT-2 base with a tokenizer)

VOCAB, D_MODEL, LAYERS, HEADS = 96, 32, 2, 4

# family -> (HF config, the HF modules PEFT adapts, as a regex over full module names)
HF_FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2), r".*\.(c_attn|c_proj|c_fc)"),
    "llama": (lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False, initializer_range=0.2),
        r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
    "bloom": (lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, n_layer=LAYERS, n_head=HEADS, initializer_range=0.2),
        r".*\.(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)"),
    "bert": (lambda: transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.2), r".*encoder.*\.(query|key|value|dense)"),
}


def hf_model(family: str, hf_dir: str | None = None):
  """A random tiny HF model of `family` (the same weights every call), saved to hf_dir if given."""
  config, _ = HF_FAMILIES[family]
  torch.manual_seed(0)
  cls = transformers.BertForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
  model = (cls(config()) if family == "bert" else cls.from_config(config())).eval()
  if hf_dir:
    model.save_pretrained(hf_dir)
  return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """family -> jaxllm model directory imported from the tiny HF model (made lazily)."""
  root = tmp_path_factory.mktemp("lora_bases")
  made = {}

  def get(family):
    if family not in made:
      hf_dir, out = os.path.join(root, f"{family}_hf"), os.path.join(root, family)
      hf_model(family, hf_dir)
      from_hf(hf_dir, out)
      made[family] = out
    return made[family]
  return get


def jax_logits(run_dir: str, ids: np.ndarray) -> np.ndarray:
  cfg, params, _ = model_dir.load_model_dir(run_dir)
  return np.asarray(jax.jit(build_model(cfg).apply)({"params": params}, jnp.asarray(ids)))


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.numpy()


def random_lora_run(base_dir: str, run_dir: str, seed: int, **lora) -> ModelConfig:
  """A LoRA run directory on `base_dir` holding random adapters (B non-zero), as training leaves one."""
  run_config = model_dir.checkpoint.read_run_config(base_dir)
  run_config["model"].update(dict(lora_rank=4, lora_alpha=8.0), **lora)
  run_config["init_from"] = base_dir
  run_config.setdefault("train", {})["trainable"] = ""
  cfg = ModelConfig.from_config(run_config["model"])
  flat = traverse_util.flatten_dict(abstract_params(cfg))
  rng = np.random.default_rng(seed)
  adapters = {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in flat.items() if k[-1] in (LORA_A, LORA_B)}
  model_dir.save_model_dir(run_dir, run_config, traverse_util.unflatten_dict(adapters))
  return cfg


def _no_peft_warnings(record) -> None:
  messages = [str(w.message) for w in record]
  assert not [m for m in messages if any(s in m.lower() for s in ("missing", "unexpected", "fan_in_fan_out",
                                                                  "adapter", "lora"))], messages


IDS = np.random.default_rng(7).integers(0, VOCAB, (2, 12))


def load_in_peft(family: str, adapter: str):
  """PeftModel.from_pretrained on a fresh base, failing on any warning about the adapter."""
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    model = peft_lib.PeftModel.from_pretrained(hf_model(family), adapter).eval()
  _no_peft_warnings(record)
  return model


@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom", "bert"])
def test_a_peft_adapter_loads_here_and_goes_back_to_peft(tmp_path, bases, family):
  """PEFT -> jaxllm (from-peft) -> PEFT (to-peft): the logits agree with PeftModel's each way."""
  from jaxllm.convert.__main__ import main as convert_main
  base_dir = bases(family)
  _, hf_targets = HF_FAMILIES[family]
  if family == "gpt2":  # only the MLP's c_proj, not the attention's of the same name
    hf_targets = r".*\.(attn\.c_attn|mlp\.c_proj)"
  model = peft_lib.get_peft_model(hf_model(family), peft_lib.LoraConfig(
      r=3, lora_alpha=5, target_modules=hf_targets, fan_in_fan_out=family == "gpt2"))
  with torch.no_grad():  # trained-looking adapters (PEFT starts B at zero)
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.normal_(0, 0.4)
  peft_dir, imported, exported = (os.path.join(tmp_path, n) for n in ("peft", "imported", "exported"))
  model.save_pretrained(peft_dir)
  want = torch_logits(model.eval(), IDS)
  assert np.abs(want - torch_logits(hf_model(family), IDS)).max() > 1e-2  # the adapter matters
  assert convert_main(["from-peft", peft_dir, imported, "--base", base_dir]) == 0
  got = jax_logits(imported, IDS)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert convert_main(["to-peft", imported, exported]) == 0
  with open(os.path.join(exported, "adapter_config.json"), encoding="utf-8") as f:
    adapter_config = json.load(f)
  assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 3
  np.testing.assert_allclose(torch_logits(load_in_peft(family, exported), IDS), got, atol=1e-4)


def test_gpt2_fused_adapters_export_exactly_and_come_back_bit_for_bit(tmp_path, bases):
  """to-peft writes the adapted parts of c_attn as one block adapter of rank r x parts, and the
  MLP's c_proj apart from the attention's; from-peft splits c_attn back into rank-r q/k/v."""
  from jaxllm.convert.__main__ import main as convert_main
  base_dir = bases("gpt2")
  partial, adapter = os.path.join(tmp_path, "partial"), os.path.join(tmp_path, "partial_adapter")
  random_lora_run(base_dir, partial, seed=1, lora_targets=r"attn/(query|value)$|mlp/wo$")
  assert convert_main(["to-peft", partial, adapter]) == 0
  np.testing.assert_allclose(torch_logits(load_in_peft("gpt2", adapter), IDS), jax_logits(partial, IDS), atol=1e-4)

  run, adapter, back = (os.path.join(tmp_path, n) for n in ("run", "adapter", "back"))
  random_lora_run(base_dir, run, seed=2)
  assert convert_main(["to-peft", run, adapter]) == 0
  with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
    assert json.load(f)["rank_pattern"] == {r"attn\.c_attn": 12}
  assert convert_main(["from-peft", adapter, back, "--base", base_dir]) == 0
  cfg, params, _ = model_dir.load_model_dir(run)
  cfg_back, params_back, _ = model_dir.load_model_dir(back)
  assert (cfg_back.lora_rank, cfg_back.lora_alpha) == (4, 8.0)
  flat, flat_back = (traverse_util.flatten_dict(p, sep="/") for p in (params, params_back))
  assert set(flat) == set(flat_back)
  for key, value in flat.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_back[key]), err_msg=key)


def test_peft_adapter_errors(tmp_path, bases):
  from jaxllm.convert.__main__ import main as convert_main
  base_dir = bases("bert")
  # "dense" also names BERT's MLM-head transform, which jaxllm has no adapter for.
  model = peft_lib.get_peft_model(hf_model("bert"), peft_lib.LoraConfig(r=2, target_modules=["dense"]))
  bad = os.path.join(tmp_path, "bad")
  model.save_pretrained(bad)
  with pytest.raises(ValueError, match="cls.predictions.transform.dense, which jaxllm's BertForMaskedLM cannot adapt"):
    from jaxllm.convert_peft import import_adapter
    import_adapter(bad, base_dir, os.path.join(tmp_path, "out"))
  # A GPT-2 adapter on the BERT base: shapes or modules do not fit.
  gpt2 = peft_lib.get_peft_model(hf_model("gpt2"), peft_lib.LoraConfig(r=2, target_modules=["c_fc"],
                                                                       fan_in_fan_out=True))
  gpt2.save_pretrained(os.path.join(tmp_path, "gpt2_adapter"))
  assert convert_main(["from-peft", os.path.join(tmp_path, "gpt2_adapter"), os.path.join(tmp_path, "o2"),
                       "--base", base_dir]) == 2
  assert convert_main(["to-peft", base_dir, os.path.join(tmp_path, "o3")]) == 2  # not a LoRA run


def test_merged_export_equals_merge_and_unload_and_greedy_generation_matches(tmp_path, bases):
  from jaxllm.convert.__main__ import main as convert_main
  from jaxllm.generate import SamplingConfig, generate
  base_dir = bases("llama")
  run, adapter, merged = (os.path.join(tmp_path, n) for n in ("run", "adapter", "merged"))
  random_lora_run(base_dir, run, seed=3)
  assert convert_main(["to-hf", run, merged]) == 2  # adapters need --merge-lora (or to-peft)
  assert convert_main(["to-hf", run, merged, "--merge-lora"]) == 0
  assert convert_main(["to-peft", run, adapter]) == 0
  peft_model = load_in_peft("llama", adapter)
  with torch.no_grad():
    prompt = torch.tensor(IDS[:1, :5])
    want_tokens = peft_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, 5:].tolist()
  reference = peft_model.merge_and_unload()
  exported = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
  ref_sd, got_sd = reference.state_dict(), exported.state_dict()
  for name, tensor in ref_sd.items():
    np.testing.assert_allclose(got_sd[name].numpy(), tensor.numpy(), atol=1e-5, err_msg=name)
  np.testing.assert_allclose(torch_logits(exported, IDS), torch_logits(reference, IDS), atol=1e-4)
  cfg, params, _ = model_dir.load_model_dir(run)  # the unmerged adapter, decoded with the KV cache
  [completion] = generate(cfg, params, [IDS[0, :5].tolist()], SamplingConfig(max_new_tokens=8, temperature=0.0))
  assert completion.tokens == want_tokens


def test_bad_lora_and_int8_settings_are_refused():
  from jaxllm.models.lora import check_targets
  cfg = ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, lora_rank=2,
                    lora_targets="attn/qkv")
  with pytest.raises(ConfigError, match=r"lora_targets='attn/qkv' matches no linear layer.*layers/attn/query"):
    check_targets(traverse_util.flatten_dict(abstract_params(cfg)), cfg)
  with pytest.raises(ValueError, match="not a regular expression"):
    dataclasses.replace(cfg, lora_targets="attn/(")
  from jaxllm.config import default_config, validate
  config = default_config()
  for overrides, message in (({"train.frozen_quant": "int4"}, "is not one of"),
                             ({"train.frozen_quant": "int8"}, "nothing is frozen"),
                             ({"train.frozen_quant": "int8", "model.lora_rank": 4}, "set init_from"),
                             ({"model.lora_rank": -1}, "must be >= 0")):
    from tests.helpers import apply_overrides
    with pytest.raises(ConfigError, match=message):
      validate(apply_overrides(config.copy_and_resolve_references(), overrides), 1)


# ------------------------------------------------------------------------------ training

def lora_config(tmp_path, base_dir, **overrides):
  """A LoRA run on `base_dir` (its architecture adopted, as the trainer does), 8 x 16 tokens a step."""
  from jaxllm.train import adopt_init_from_architecture
  from tests.helpers import apply_overrides, make_tiny_config
  config = make_tiny_config(tmp_path, **{"init_from": base_dir, "model.lora_rank": 4, "model.lora_alpha": 8.0,
                                         "data.seq_len": 16})
  config.optim.update(lr=3e-2, warmup_steps=0, min_lr=3e-2, weight_decay=0.0)
  adopt_init_from_architecture(config)
  return apply_overrides(config, overrides)


def start_state(config, params=None):
  """(setup, mesh, initial params): the base from init_from and fresh adapters, unless `params`."""
  from jaxllm import peft
  from jaxllm.config import validate
  from jaxllm.sharding import make_mesh
  from jaxllm.state import make_setup
  model_cfg = validate(config, jax.device_count())
  mesh = make_mesh(config.mesh)
  setup = make_setup(config, model_cfg, mesh)
  if params is None:
    params = peft.initial_params(config, setup, None, jax.random.key(0))
  return setup, mesh, params


def token_batch(mesh, seed=0):
  """Packed rows: two documents each (segment ids, positions restarting), as data.packing='document' makes."""
  from jaxllm.sharding import make_global_batch
  ids = np.random.default_rng(seed).integers(0, VOCAB, (8, 17)).astype(np.int32)
  segments = np.repeat([[1] * 10 + [2] * 6], 8, 0).astype(np.int32)
  positions = np.repeat([list(range(10)) + list(range(6))], 8, 0).astype(np.int32)
  return make_global_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments,
                            "positions": positions, "weights": np.ones((8, 16), np.float32)}, mesh)


def test_lora_trains_only_adapters_from_the_exact_base_same_loss_scanned_unrolled_sharded(tmp_path, bases):
  """Step 0 is the base exactly; only A/B train (the base stays bit-identical); a scanned model with
  gradient accumulation and remat on a data x fsdp x tensor mesh trains exactly as an unrolled one on
  a data-only mesh. The adapters take their kernels' shardings (rank axis whole)."""
  from jaxllm.state import compile_steps
  base_dir = bases("llama")
  runs = {}
  for name, overrides in (("scanned", {"mesh.fsdp": 2, "mesh.tensor": 2, "train.grad_accum": 2,
                                       "model.remat": "full"}),
                          ("unrolled", {"model.scan_layers": False})):
    config = lora_config(tmp_path, base_dir, **overrides)
    # The unrolled run starts from the scanned run's values (adapters included), unstacked.
    setup, mesh, params = start_state(config, stacking.unstack_layers(runs["scanned"]["initial"])
                                      if name == "unrolled" else None)
    state = setup.init_fn(jax.random.key(0), params)
    runs[name] = {"initial": jax.device_get(params), "state": state, "mesh": mesh, "setup": setup,
                  "config": config}
  scanned = runs["scanned"]
  trainable = traverse_util.flatten_dict(scanned["state"].params, sep="/")
  assert trainable and all(k.rsplit("/", 1)[1] in (LORA_A, LORA_B) for k in trainable)
  assert len(trainable) == 2 * 7  # q, k, v, out, wi_gate, wi_up, wo
  assert not np.asarray(trainable["layers/attn/query/lora_b"]).any()
  assert np.asarray(trainable["layers/attn/query/lora_a"]).std() > 0.05  # kaiming-uniform, bound 1/sqrt(32)
  spec = lambda key: tuple(trainable[key].sharding.spec)  # noqa: E731
  assert spec("layers/attn/query/lora_a") == (None, "fsdp", None)       # [layers, embed, rank]
  assert spec("layers/attn/query/lora_b") == (None, None, "tensor", None)  # [layers, rank, heads, head_dim]
  assert spec("layers/mlp/wo/lora_a")[1] == "tensor" and spec("layers/mlp/wo/lora_b") == (None, None, "fsdp")
  opt_shapes = {x.shape for x in jax.tree.leaves(scanned["state"].opt_state) if x.ndim}
  assert opt_shapes <= {v.shape for v in trainable.values()}  # Adam state for the adapters only

  # Step 0 equals the base model exactly.
  base_cfg, base_params, _ = model_dir.load_model_dir(base_dir)
  ids = IDS
  from jaxllm.optim import merge_params
  merged = merge_params(*jax.device_get((scanned["state"].params, scanned["state"].frozen)))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(build_model(scanned["setup"].model_cfg).apply)({"params": merged}, ids)),
      np.asarray(jax.jit(build_model(base_cfg).apply)({"params": base_params}, ids)))

  losses = {}
  for name, run in runs.items():
    jit_train, _ = compile_steps(run["setup"], run["config"], run["mesh"])
    state, batch, losses[name] = run["state"], token_batch(run["mesh"]), []
    frozen_before = jax.device_get(state.frozen)
    for _ in range(4):
      state, metrics = jit_train(state, batch, jax.random.key(1))
      losses[name].append(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)
  np.testing.assert_allclose(losses["scanned"], losses["unrolled"], rtol=2e-5)
  assert losses["scanned"][-1] < losses["scanned"][0] - 0.1, losses


def test_int8_kernels_hold_a_quarter_of_the_bytes_and_keep_the_loss_within_a_percent(bases):
  """Per-output-channel int8 of the blocks' kernels (train.frozen_quant; the trainer's path runs in
  the end-to-end test below): the layer's (x q) * scale stays close to the float model."""
  from jaxllm.losses import cross_entropy
  from jaxllm.models.lora import KERNEL_SCALE, quantize_tree
  cfg, params, _ = model_dir.load_model_dir(bases("gpt2"))
  flat = traverse_util.flatten_dict(jax.device_get(params))
  quantized = quantize_tree(flat)
  kernels = [k for k in flat if k[-1] == "kernel" and k[-3] in ("attn", "mlp")]
  assert len(kernels) == 6 and all(quantized[k].dtype == jnp.int8 for k in kernels)  # q k v out wi wo
  assert quantized[("embed", "embedding")].dtype == jnp.float32  # only the blocks' linear kernels
  assert sum(quantized[k].nbytes for k in kernels) * 4 == sum(flat[k].nbytes for k in kernels)
  scale = quantized[("layers", "attn", "query", KERNEL_SCALE)]
  assert scale.shape == (LAYERS, 1, HEADS, D_MODEL // HEADS)  # one per output channel, per layer
  query = ("layers", "attn", "query", "kernel")
  error = np.abs(quantized[query] * scale - flat[query])
  assert (error <= scale / 2 + 1e-7).all()  # rounding: at most half a step of its channel
  apply = jax.jit(build_model(cfg).apply)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 17)))
  losses = []
  for tree in (flat, quantized):
    logits = apply({"params": traverse_util.unflatten_dict(tree)}, ids[:, :-1])
    loss, weight = cross_entropy(logits, ids[:, 1:], jnp.ones((4, 16)))
    losses.append(float(loss / weight))
  assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 1e-2 * losses[0], losses


def test_lora_with_a_prompt_on_an_int8_base_checkpoints_adapters_only_resumes_and_generates(
    tmp_path, base, sft_file, capsys):
  """The trainer end to end: LoRA and prompt tuning at once (padded SFT), int8 frozen base; the
  checkpoint holds only the prompt and the adapters; resume re-reads (and re-quantizes) the base;
  `generate --checkpoint RUN` decodes with the unmerged adapters."""
  from jaxllm import train
  from jaxllm.convert.__main__ import main as convert_main
  from jaxllm.generate.__main__ import main as generate_main
  from jaxllm.models.lora import LORA_PATTERN
  from tests.test_prompt_tuning import prompt_config
  workdir = os.path.join(tmp_path, "run")
  overrides = {"model.lora_rank": 2, "model.lora_dropout": 0.1, "train.trainable": "^prompt/|" + LORA_PATTERN,
               "train.frozen_quant": "int8"}
  train.run(prompt_config(tmp_path, base, sft_file, **overrides), workdir)
  out = capsys.readouterr().out
  # prompt 4 x 32; per layer rank 2 x (32 + 32) for q, k, v, out, (32 + 128) + (128 + 32) for the MLP
  trainable = 4 * 32 + 2 * 2 * (4 * 64 + 160 + 160)
  assert f"parameters: {trainable:,} trainable of" in out, out
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as ckpt:
    tree = ckpt.metadata(os.path.join(workdir, "checkpoints", "4", "state")).item_metadata.tree
  leaves = traverse_util.flatten_dict(dict(tree["params"]), sep="/")
  assert not tree.get("frozen") and {k.split("/")[0] for k in leaves} == {"prompt", "layers"}
  assert all(k.startswith("prompt/") or k.endswith(("/lora_a", "/lora_b")) for k in leaves), sorted(leaves)
  train.run(prompt_config(tmp_path, base, sft_file, **overrides, **{"train.steps": 6}), workdir)
  assert "start at step 4 of 6" in capsys.readouterr().out
  assert generate_main(["--checkpoint", workdir, "--prompt", "Human: list", "--max-new-tokens", "4",
                        "--temperature", "0"]) == 0
  assert "Human: list" in capsys.readouterr().out
  # `eval perplexity` loads the run as generate does: the base re-read, the prompt and adapters on it.
  from jaxllm.eval.__main__ import main as eval_main
  text = os.path.join(tmp_path, "held_out.txt")
  with open(text, "w", encoding="utf-8") as f:
    f.write("Human: list three colours\nAssistant: red, green, blue\n" * 4)
  ppl = {}
  for name, model in (("run", workdir), ("base", base["dir"])):
    assert eval_main(["perplexity", "--checkpoint", model, "--data", text, "--seq-len", "16",
                      "--output-path", os.path.join(tmp_path, f"ppl_{name}")]) == 0
    with open(os.path.join(tmp_path, f"ppl_{name}", "perplexity.json"), encoding="utf-8") as f:
      ppl[name] = json.load(f)["perplexity"]
  assert np.isfinite(ppl["run"]) and ppl["run"] != ppl["base"], ppl
  capsys.readouterr()
  assert convert_main(["to-peft", workdir, os.path.join(tmp_path, "adapter")]) == 2
  assert "a PEFT adapter holds one kind" in capsys.readouterr().err
