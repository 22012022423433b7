"""`python -m jaxllm.eval perplexity` equals the Hugging Face perplexity guide's strided loop
run by transformers on the same weights (exported with `convert to-hf`), on one device and
on a sharded mesh; bad input is one `error:` line; training logs the same figures for
`train.eval_data`."""

import json
import math
import os

import numpy as np
import pytest

from jaxllm.eval.sliding_window import strided_windows
from tests import eval_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ_LEN = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppl")
  jax_dir, hf_dir = eval_models.build(str(root))
  texts = eval_models.word_texts(6, seed=1, min_words=3, max_words=70)
  with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
    for text in texts[:2]:
      f.write(json.dumps({"text": text}) + "\n")
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_dict({"text": texts[2:4]}).save_to_disk(str(root / "saved"))
  (root / "notes").mkdir()
  for i, text in enumerate(texts[4:]):
    (root / "notes" / f"{i}.txt").write_text("caf\u00e9 " + text, encoding="utf-8")  # 2-byte UTF-8 too
  return {"jax": jax_dir, "hf": hf_dir, "jsonl": str(root / "docs.jsonl"), "notes": str(root / "notes"),
          "saved": str(root / "saved"),
          "texts": texts[:4] + ["caf\u00e9 " + t for t in texts[4:]]}


def guide_loop(hf_dir: str, texts: list[str], seq_len: int, stride: int) -> tuple[float, int]:
  """(NLL sum in nats, scored tokens): the guide's loop over each document read after BOS.
  The guide scales each window's mean loss by a count that is one short for windows after
  the first; summing the token losses instead is the quantity its loop means."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
  nll_sum, count = 0.0, 0
  for text in texts:
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text)["input_ids"]])
    prev_end = 0
    for begin in range(0, ids.size(1), stride):
      end = min(begin + seq_len, ids.size(1))
      trg_len = end - prev_end
      input_ids = ids[:, begin:end]
      target_ids = input_ids.clone()
      target_ids[:, :-trg_len] = -100
      with torch.no_grad():
        logits = hf(input_ids).logits
      labels = target_ids[:, 1:]
      nll_sum += float(torch.nn.functional.cross_entropy(
          logits[0, :-1].double(), labels[0], ignore_index=-100, reduction="sum"))
      count += int((labels != -100).sum())
      prev_end = end
      if end == ids.size(1):
        break
  return nll_sum, count


def run_eval(args, out_dir) -> dict:
  assert eval_models.run_subcommand("perplexity", [*args, "--output-path", str(out_dir)]) == 0
  with open(os.path.join(out_dir, "perplexity.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.parametrize("stride,mesh", [(SEQ_LEN, "-1,1,1"), (12, "2,2,2")])
def test_equals_the_transformers_strided_loop(model, tmp_path, capsys, stride, mesh):
  report = run_eval(["--checkpoint", model["jax"], "--data", model["jsonl"], model["saved"], model["notes"],
                     "--seq-len", str(SEQ_LEN), "--stride", str(stride), "--batch-size", "3",
                     f"--mesh={mesh}"], tmp_path)
  nll_sum, count = guide_loop(model["hf"], model["texts"], SEQ_LEN, stride)
  assert report["num_tokens"] == count
  assert report["num_windows"] > len(model["texts"])  # documents longer than a window
  np.testing.assert_allclose(report["nll"], nll_sum / count, rtol=1e-4)
  np.testing.assert_allclose(report["perplexity"], math.exp(nll_sum / count), rtol=1e-4)
  num_bytes = sum(len(t.encode("utf-8")) for t in model["texts"])
  assert report["num_bytes"] == num_bytes
  np.testing.assert_allclose(report["bits_per_byte"], nll_sum / math.log(2) / num_bytes, rtol=1e-4)
  for name, texts in (("docs", model["texts"][:2]), ("saved", model["texts"][2:4]), ("notes", model["texts"][4:])):
    source_nll, source_count = guide_loop(model["hf"], texts, SEQ_LEN, stride)
    source = report["sources"][name]
    assert (source["num_documents"], source["num_tokens"]) == (2, source_count)
    np.testing.assert_allclose(source["nll"], source_nll / source_count, rtol=1e-4)
  summary = capsys.readouterr().out.strip().splitlines()
  assert len(summary) == 1 and summary[0].startswith(f"perplexity {report['perplexity']:.4f}")


def test_windows_score_every_token_once():
  for num_tokens, seq_len, stride in [(100, 32, 32), (100, 32, 12), (5, 32, 8), (33, 32, 1)]:
    targets = [t for begin, end, n in strided_windows(num_tokens, seq_len, stride) for t in range(end - n, end)]
    if stride < seq_len:  # every token but the first, once
      assert targets == list(range(1, num_tokens))
    else:  # disjoint windows: each window's first token is context only
      assert targets == [t for t in range(1, num_tokens) if t % seq_len]


@pytest.mark.parametrize("extra,message", [
    (["--data", "/nonexistent/file.txt"], "--data /nonexistent/file.txt: no such file"),
    (["--seq-len", "65"], "--seq-len=65 must be between 2 and the model's 64 positions"),
    (["--seq-len", "16", "--stride", "17"], "--stride=17 must be between 1 and --seq-len=16"),
    (["--mesh", "2,2"], "--mesh '2,2': expected three integers"),
])
def test_bad_input_is_one_error_line(model, capsys, extra, message):
  args = ["--checkpoint", model["jax"], "--data", model["jsonl"], *extra]
  assert eval_models.run_subcommand("perplexity", args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_training_logs_eval_data_like_the_command(tmp_path, tiny_config):
  from jaxllm import train  # pylint: disable=import-outside-toplevel
  held_out = tmp_path / "held_out.txt"
  held_out.write_text("\n".join(eval_models.word_texts(3, seed=5)), encoding="utf-8")
  config = tiny_config(tmp_path, **{"train.eval_data": [str(held_out)], "train.steps": 2,
                                    "train.eval_every": 2, "data.val_fraction": 0.0})
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    last = [json.loads(line) for line in f][-1]
  report = run_eval(["--checkpoint", workdir, "--data", str(held_out), "--seq-len", str(config.data.seq_len),
                     "--stride", str(config.data.seq_len // 2), "--mesh=-1,1,1"], tmp_path / "eval")
  np.testing.assert_allclose(last["eval_data/held_out_ppl"], report["perplexity"], rtol=1e-4)
  np.testing.assert_allclose(last["eval_data/held_out_bpb"], report["bits_per_byte"], rtol=1e-4)


def test_the_command_runs_in_a_subprocess(model, tmp_path):
  pytest.importorskip("jaxllm.eval.humaneval", reason="the dispatcher imports every subcommand module")
  from tests.helpers import run_cli  # pylint: disable=import-outside-toplevel
  result = run_cli("jaxllm.eval", "perplexity", "--checkpoint", model["jax"], "--data", model["jsonl"],
                   "--seq-len", str(SEQ_LEN), "--output-path", str(tmp_path), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("perplexity "), result.stdout
  with open(tmp_path / "perplexity.json", encoding="utf-8") as f:
    assert json.load(f)["stride"] == SEQ_LEN // 2
