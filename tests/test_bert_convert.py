"""BertForMaskedLM <-> jaxllm: logits equal transformers (token types and padding included), export
gives back every tensor, fill-mask on a converted model ranks as transformers does, clear refusals."""

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
from jaxllm.models import build_model  # noqa: E402
from jaxllm.tokenizer import train_tokenizer  # noqa: E402
from tests.test_tokenizer import prose_documents  # noqa: E402

VOCAB = 384


def tiny_bert_config(**kw):
  # Awkward sizes on purpose: 3 heads of 12, an MLP of 52, 3 token types.
  return transformers.BertConfig(**dict(dict(
      vocab_size=VOCAB, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=52,
      max_position_embeddings=40, type_vocab_size=3, hidden_act="gelu", layer_norm_eps=1e-12,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), **kw))


def randomize(model) -> None:
  """Every weight random, norm weights around 1 (so no weight is left at its init value)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = p.ndim == 1 and name.endswith("weight")
      p.copy_(1 + 0.2 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(HF model, HF dir, jaxllm dir, ModelConfig, params, tokenizer); every weight random."""
  root = tmp_path_factory.mktemp("bert_convert")
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(tiny_bert_config()).eval()
  randomize(model)
  tokenizer = train_tokenizer(prose_documents(30_000), "wordpiece", VOCAB)
  hf_dir, jx_dir = str(root / "hf"), str(root / "jaxllm")
  model.save_pretrained(hf_dir)
  tokenizer.save_pretrained(hf_dir)
  from_hf(hf_dir, jx_dir)
  model_cfg, params, loaded_tokenizer = load_model_dir(jx_dir)
  return model, hf_dir, jx_dir, model_cfg, params, loaded_tokenizer


def test_logits_equal_transformers_with_token_types_and_padding(converted):
  model, _, _, model_cfg, params, _ = converted
  assert model_cfg.family == "bert" and model_cfg.type_vocab_size == 3 and model_cfg.activation == "gelu"
  rng = np.random.RandomState(1)
  ids, types = rng.randint(0, VOCAB, (2, 23)), rng.randint(0, 3, (2, 23))
  real = np.ones((2, 23), np.int64)
  real[1, 17:] = 0   # the second row ends in padding
  ours = jax.jit(build_model(model_cfg).apply)({"params": params}, jnp.asarray(ids),
                                               segment_ids=jnp.asarray(real), token_types=jnp.asarray(types))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                   attention_mask=torch.tensor(real)).logits.numpy()
  ours = np.asarray(ours)
  assert ours.shape == theirs.shape == (2, 23, VOCAB)
  keep = real.astype(bool)  # padded positions' own outputs are unused (HF and jaxllm differ there)
  err = np.max(np.abs(ours[keep] - theirs[keep])) / np.max(np.abs(theirs[keep]))
  assert err < 1e-4, err


def test_export_gives_back_every_tensor_and_loads_in_transformers(converted, tmp_path):
  model, _, jx_dir, _, _, _ = converted
  out = str(tmp_path / "exported")
  arch = to_hf(jx_dir, out)
  assert arch.name == "BertForMaskedLM"
  reloaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  original, exported = model.state_dict(), reloaded.state_dict()
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name].numpy(), tensor.numpy(), err_msg=name)


def fill_mask_beside_transformers(jx_dir, hf_model, tokenizer, top_k, capsys):
  """(the `fill_mask` command's printed [token, prob, ...] fields, transformers' logits at [MASK])."""
  from jaxllm import fill_mask  # pylint: disable=import-outside-toplevel
  text = "The river [MASK] through the city."
  fill_mask.main(["--checkpoint", jx_dir, "--top-k", str(top_k), text])
  fields = capsys.readouterr().out.strip().splitlines()[1].split(":", 1)[1].split()
  ids = tokenizer(text, return_tensors="pt")
  with torch.no_grad():
    logits = hf_model(**ids).logits[0]
  return fields, logits[ids["input_ids"][0].tolist().index(tokenizer.mask_token_id)]


def test_fill_mask_on_a_converted_model_ranks_as_transformers(converted, capsys):
  model, _, jx_dir, _, _, tokenizer = converted
  fields, logits = fill_mask_beside_transformers(jx_dir, model, tokenizer, 4, capsys)
  probs = torch.softmax(logits, -1)
  top = torch.topk(probs, 4)
  assert fields[0::2] == tokenizer.convert_ids_to_tokens(top.indices.tolist())
  np.testing.assert_allclose([float(p) for p in fields[1::2]], top.values.numpy(), atol=1e-3)


def test_unsupported_bert_variants_are_refused_in_one_line(tmp_path):
  model = transformers.BertForMaskedLM(tiny_bert_config(position_embedding_type="relative_key"))
  model.save_pretrained(str(tmp_path / "hf"))
  with pytest.raises(ConvertError, match="position_embedding_type='relative_key' is not supported") as e:
    from_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def encoder_only(tmp_path_factory, converted):
  """A random encoder-only BertModel (with its pooler) and its jaxllm import, through the CLI."""
  from tests.helpers import run_cli  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("bert_encoder")
  torch.manual_seed(1)
  model = transformers.BertModel(tiny_bert_config()).eval()
  randomize(model)
  hf_dir, jx_dir = str(root / "hf"), str(root / "jaxllm")
  model.save_pretrained(hf_dir)
  converted[5].save_pretrained(hf_dir)  # the WordPiece tokenizer of the masked-LM fixture
  result = run_cli("jaxllm.convert", "from-hf", hf_dir, jx_dir, devices=2)
  return model, hf_dir, jx_dir, result


def test_encoder_only_bert_imports_exactly_with_an_initialised_head(encoder_only):
  model, _, jx_dir, result = encoder_only
  assert result.returncode == 0, result.stderr
  notes = [l for l in result.stdout.splitlines() if "has no head" in l]
  assert len(notes) == 1 and "BertModel" in notes[0] and "tied to the word embeddings" in notes[0]
  model_cfg, params, _ = load_model_dir(jx_dir)
  assert model_cfg.family == "bert" and model_cfg.tie_embeddings
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), state["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["wo"]["kernel"][1]),
                                state["encoder.layer.1.output.dense.weight"].T)
  # The head as transformers initialises BertForMaskedLM's: N(0, initializer_range), LayerNorm 1/0, bias 0.
  kernel = np.asarray(params["mlm_dense"]["kernel"])
  assert abs(kernel.std() - 0.02) < 0.005 and abs(kernel.mean()) < 0.005
  np.testing.assert_array_equal(np.asarray(params["mlm_norm"]["scale"]), 1.0)
  np.testing.assert_array_equal(np.asarray(params["mlm_bias"]), 0.0)
  # Encoder outputs equal BertModel's last hidden state.
  ids = np.random.RandomState(2).randint(0, VOCAB, (1, 17))
  jax_model = build_model(model_cfg)
  ours = jax_model.apply({"params": params}, jnp.asarray(ids), method=jax_model.encode)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max())


def test_encoder_only_bert_exports_as_masked_lm_with_the_encoder_bit_for_bit(encoder_only, tmp_path, capsys):
  model, _, jx_dir, _ = encoder_only
  out = str(tmp_path / "exported")
  assert to_hf(jx_dir, out).name == "BertForMaskedLM"
  reloaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  exported = reloaded.state_dict()
  encoder = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
  for name, tensor in encoder.items():
    np.testing.assert_array_equal(exported["bert." + name].numpy(), tensor.numpy(), err_msg=name)
  assert "pipeline_tag: fill-mask" in open(f"{out}/README.md", encoding="utf-8").read()
  assert not os.path.exists(f"{out}/generation_config.json")  # a masked LM does not generate
  # fill_mask on the imported model ranks as transformers does on the exported one.
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  fields, logits = fill_mask_beside_transformers(jx_dir, reloaded, tokenizer, 3, capsys)
  assert fields[0::2] == tokenizer.convert_ids_to_tokens(torch.topk(logits, 3).indices.tolist())


def test_masked_lm_pretraining_continues_from_an_encoder_only_bert(encoder_only, tmp_path):
  from jaxllm import train  # pylint: disable=import-outside-toplevel
  from tests.helpers import make_tiny_config  # pylint: disable=import-outside-toplevel
  _, _, jx_dir, _ = encoder_only
  config = make_tiny_config(tmp_path, task="mlm", init_from=jx_dir, **{
      "model.dropout_rate": 0.0, "train.steps": 12, "train.log_every": 1, "train.eval_every": 12,
      "train.checkpoint_every": 12, "optim.lr": 3e-3, "optim.warmup_steps": 2, "optim.weight_decay": 0.0})
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  import json  # pylint: disable=import-outside-toplevel
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
  losses = [r["loss"] for r in records]
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["family"] == "bert"
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
