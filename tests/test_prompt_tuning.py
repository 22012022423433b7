"""Prompt tuning: the frozen split, text init, training, prompt-only checkpoints, PEFT interop."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import model_dir, peft
from jaxllm.config import ConfigError, default_config, validate
from jaxllm.data import chat, sft
from jaxllm.models import GPT, ModelConfig, stacking
from jaxllm.tokenizer import train_bpe
from tests.test_sft import make_records

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, D_MODEL, LAYERS, HEADS, MAX_LEN = 320, 32, 2, 2, 64


def gpt2_to_jaxllm(hf_model) -> dict:
  """A transformers GPT-2's weights as a jaxllm param tree (Conv1D weights are [in, out])."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
  head_dim = D_MODEL // HEADS
  norm = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}  # noqa: E731
  params = {"embed": {"embedding": sd["transformer.wte.weight"]},
            "pos_embed": {"embedding": sd["transformer.wpe.weight"]},
            "final_norm": norm("transformer.ln_f")}
  for i in range(LAYERS):
    p = f"transformer.h.{i}."
    qkv_w = np.split(sd[p + "attn.c_attn.weight"], 3, axis=1)
    qkv_b = np.split(sd[p + "attn.c_attn.bias"], 3)
    attn = {name: {"kernel": w.reshape(D_MODEL, HEADS, head_dim), "bias": b.reshape(HEADS, head_dim)}
            for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b)}
    attn["out"] = {"kernel": sd[p + "attn.c_proj.weight"].reshape(HEADS, head_dim, D_MODEL),
                   "bias": sd[p + "attn.c_proj.bias"]}
    params[f"layer_{i}"] = {
        "attn_norm": norm(p + "ln_1"), "mlp_norm": norm(p + "ln_2"), "attn": attn,
        "mlp": {"wi": {"kernel": sd[p + "mlp.c_fc.weight"], "bias": sd[p + "mlp.c_fc.bias"]},
                "wo": {"kernel": sd[p + "mlp.c_proj.weight"], "bias": sd[p + "mlp.c_proj.bias"]}}}
  return params


def model_section(**extra) -> dict:
  return dict(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, d_ff=4 * D_MODEL,
              max_seq_len=MAX_LEN, position="learned", norm="layernorm", activation="gelu_tanh",
              use_bias=True, tie_embeddings=True, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A random tiny transformers GPT-2, its tokenizer, and the same weights as a jaxllm model dir."""
  root = tmp_path_factory.mktemp("base")
  texts = [" ".join(r.values()) for r in make_records(100)] + [chat.ALPACA_PREAMBLE_INPUT]
  tokenizer = train_bpe(texts, 300)
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=MAX_LEN, n_embd=D_MODEL,
                                      n_layer=LAYERS, n_head=HEADS, activation_function="gelu_new",
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0, initializer_range=0.3)
  hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
  params = gpt2_to_jaxllm(hf_model)  # unrolled layer_i keys, as checkpoints before scan_layers
  run_config = default_config()
  run_config.model.update(model_section())
  base_dir = os.path.join(root, "base")
  model_dir.save_model_dir(base_dir, run_config.to_dict(), params, tokenizer)
  return {"dir": base_dir, "hf": hf_model, "params": params, "tokenizer": tokenizer, "root": root}


def jax_logits(model_cfg, params, ids):
  params = stacking.like(params, model_cfg.scan_layers)
  return np.asarray(GPT(model_cfg).apply({"params": params}, jnp.asarray(ids)))


def test_text_init_truncates_and_cycles(base):
  tok = base["tokenizer"]
  ids = tok("tell me about cats", add_special_tokens=False)["input_ids"]
  n = len(ids)
  assert n > 2 and len(set(ids)) > 2
  assert peft.prompt_init_ids(tok, "tell me about cats", 2) == ids[:2]
  cycled = peft.prompt_init_ids(tok, "tell me about cats", 2 * n + 3)
  assert cycled == ids + ids + ids[:3]
  params = dict(base["params"], prompt={"embedding": np.zeros((2 * n + 3, D_MODEL), np.float32)})
  out = peft.with_prompt_from_ids(params, cycled)
  np.testing.assert_array_equal(out["prompt"]["embedding"], base["params"]["embed"]["embedding"][cycled])
  with pytest.raises(ValueError, match="has no tokens"):
    peft.prompt_init_ids(tok, "", 4)


def test_prompt_tuned_model_matches_the_base_fed_the_prompt_as_embeddings(base):
  """Virtual tokens: positions shifted, their logits dropped; equal to GPT-2 given inputs_embeds."""
  cfg = ModelConfig(**model_section(num_virtual_tokens=3))
  prompt = np.random.default_rng(0).normal(0, 0.5, (3, D_MODEL)).astype(np.float32)
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9))
  logits = jax_logits(cfg, dict(base["params"], prompt={"embedding": prompt}), ids)
  assert logits.shape == (2, 9, VOCAB)
  hf = base["hf"]
  with torch.no_grad():
    embeds = hf.transformer.wte(torch.tensor(ids))
    embeds = torch.cat([torch.tensor(prompt).expand(2, 3, D_MODEL), embeds], 1)
    want = hf(inputs_embeds=embeds).logits[:, 3:].numpy()
  np.testing.assert_allclose(logits, want, atol=1e-4)


def prompt_config(tmp_path, base, data_path, **overrides):
  from tests.helpers import apply_overrides, make_tiny_config
  config = make_tiny_config(tmp_path)
  config.model.update(model_section(num_virtual_tokens=4))
  config.update(task="sft", init_from=base["dir"])
  config.data.update(path=data_path, tokenizer=os.path.join(base["dir"], "tokenizer"), seq_len=48,
                     template="human_assistant", val_fraction=0.0, pad_multiple=48)  # one shape
  config.train.update(trainable=peft.PROMPT_PATTERN, prompt_init_text="tell me about", steps=4,
                      batch_size=8, log_every=2, checkpoint_every=2, eval_steps=0)
  config.optim.update(lr=0.1, warmup_steps=0, min_lr=0.1, weight_decay=0.0)
  return apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def sft_file(base):
  path = os.path.join(base["root"], "sft.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in make_records(64, seed=3))
  return path


def test_only_the_prompt_trains_frozen_stays_bit_identical(tmp_path, base, sft_file):
  from jaxllm.sharding import make_global_batch, make_mesh
  from jaxllm.state import make_setup
  from jaxllm.train import compile_steps
  config = prompt_config(tmp_path, base, sft_file)
  model_cfg = validate(config, jax.device_count())
  mesh = make_mesh(config.mesh)
  setup = make_setup(config, model_cfg, mesh)
  assert peft.count_params(setup.abstract_state.params) == 4 * D_MODEL
  opt_leaves = [x for x in jax.tree.leaves(setup.abstract_state.opt_state) if x.ndim]
  assert opt_leaves and all(x.shape == (4, D_MODEL) for x in opt_leaves)  # Adam state: prompt only
  params = peft.initial_params(config, setup, base["tokenizer"], jax.random.key(0))
  state = setup.init_fn(jax.random.key(0), params)
  frozen_before = jax.device_get(state.frozen)
  # The base was saved with unrolled layers (as before model.scan_layers): restacked on read.
  np.testing.assert_array_equal(frozen_before["layers"]["mlp"]["wo"]["kernel"][1],
                                base["params"]["layer_1"]["mlp"]["wo"]["kernel"])
  tok = base["tokenizer"]
  examples = [sft.encode_record(r, sft.get_template("human_assistant"), tok, 48)
              for r in make_records(8, seed=3)]
  batch = make_global_batch(sft.padded_batch(examples, 48), mesh)
  jit_train, _ = compile_steps(setup, config, mesh)
  losses = []
  for _ in range(25):
    state, metrics = jit_train(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5, losses[::5]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)
  assert not np.array_equal(jax.device_get(state.params["prompt"]["embedding"]),
                            np.asarray(params["prompt"]["embedding"]))


def test_prompt_run_checkpoints_only_the_prompt_resumes_and_exports_to_peft(tmp_path, base, sft_file,
                                                                             capsys):
  from peft import PeftModel
  from jaxllm import train
  from jaxllm.convert.__main__ import main as convert_main
  workdir = os.path.join(tmp_path, "run")
  train.run(prompt_config(tmp_path, base, sft_file, **{"train.memory_report": True}), workdir)
  out = capsys.readouterr().out
  assert f"parameters: {4 * D_MODEL:,} trainable of" in out and "full fine-tuning:" in out
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as ckpt:
    tree = ckpt.metadata(state_dir).item_metadata.tree
  assert set(tree["params"]) == {"prompt"} and not tree.get("frozen")
  # Resume: more steps on the same workdir; the frozen part is re-read from init_from.
  train.run(prompt_config(tmp_path, base, sft_file, **{"train.steps": 6, "train.sample_prompt": "list",
                                                       "train.sample_tokens": 3}), workdir)
  out = capsys.readouterr().out
  assert "start at step 4 of 6" in out and "Human: list\n\nAssistant: " in out  # generated after the prompt

  model_cfg, params, tokenizer = model_dir.load_model_dir(workdir)
  assert tokenizer is not None and model_cfg.num_virtual_tokens == 4
  adapter = os.path.join(tmp_path, "adapter")
  assert convert_main(["to-peft", workdir, adapter]) == 0  # SRC DST, like to-hf
  with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
    adapter_config = json.load(f)
  assert adapter_config["peft_type"] == "PROMPT_TUNING" and adapter_config["num_virtual_tokens"] == 4
  peft_model = PeftModel.from_pretrained(base["hf"], adapter).eval()
  ids = np.random.default_rng(2).integers(0, VOCAB, (2, 12))
  with torch.no_grad():
    want = peft_model(input_ids=torch.tensor(ids)).logits[:, 4:].numpy()
  np.testing.assert_allclose(jax_logits(model_cfg, params, ids), want, atol=1e-4)


def test_a_peft_trained_prompt_loads_here(tmp_path, base):
  from peft import PromptTuningConfig, get_peft_model
  from jaxllm.convert_peft import main as convert_main
  hf = transformers.GPT2LMHeadModel(base["hf"].config).eval()
  hf.load_state_dict(base["hf"].state_dict())
  peft_model = get_peft_model(hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
  with torch.no_grad():
    peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 0.3)
  adapter = os.path.join(tmp_path, "from_peft_adapter")
  peft_model.save_pretrained(adapter)
  run_dir = os.path.join(tmp_path, "imported")
  assert convert_main(["from-peft", "--adapter", adapter, "--base", base["dir"], "--out", run_dir]) == 0
  model_cfg, params, _ = model_dir.load_model_dir(run_dir)
  ids = np.random.default_rng(3).integers(0, VOCAB, (2, 10))
  with torch.no_grad():
    want = peft_model.eval()(input_ids=torch.tensor(ids)).logits[:, 5:].numpy()
  np.testing.assert_allclose(jax_logits(model_cfg, params, ids), want, atol=1e-4)
  bad = convert_main(["from-peft", "--adapter", str(tmp_path), "--base", base["dir"], "--out", run_dir])
  assert bad == 2


def test_prompt_tuning_config_errors(tmp_path, base, sft_file):
  config = prompt_config(tmp_path, base, sft_file, **{"data.packing": "document"})
  with pytest.raises(ConfigError, match="cannot be combined with data.packing"):
    validate(config, jax.device_count())
  config = prompt_config(tmp_path, base, sft_file, **{"data.seq_len": 62})
  with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
    validate(config, jax.device_count())
