"""Weights & Biases: the offline run holds metrics.jsonl's scalars and the resolved config, a resumed
run continues the same W&B run, and without the wandb package a W&B run is refused before it starts."""

import glob
import json
import os
import struct
import sys
import time

import pytest

from jaxllm import train
from jaxllm.errors import ConfigError
from jaxllm.metrics import read_records
from tests.helpers import make_tiny_config

_BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of CRC'd record chunks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_file(path: str) -> list:
  """The protobuf Records of an offline run's .wandb file (wandb >= 0.18 ships no Python reader)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as f:
    data = f.read()
  ident, magic, version = struct.unpack("<4sHB", data[:7])
  assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a .wandb file of the known format"
  records, pos, pending = [], 7, b""
  while pos + 7 <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < 7:  # a block's tail too short for a chunk header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:
      pos += left
      continue
    if pos + 7 + length > len(data):
      break  # a record still being written
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
    if kind in (_FULL, _LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
  return records


def offline_run(wandb_dir, run_id: str, index: int) -> tuple[dict, dict[int, dict], list[int]]:
  """(config, {step: logged scalars}, exit codes) of the index-th offline run directory of `run_id`."""
  paths = sorted(glob.glob(os.path.join(str(wandb_dir), "wandb", f"offline-run-*-{run_id}")))
  assert len(paths) > index, f"no offline run directory number {index} for {run_id}: {paths}"
  file = os.path.join(paths[index], f"run-{run_id}.wandb")
  # wandb-core writes the file in the background: finish() may return a moment before the
  # run's last records (the exit record) land, so wait for that one.
  deadline = time.monotonic() + 30
  records = read_wandb_file(file)
  while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
    time.sleep(0.1)
    records = read_wandb_file(file)
  config, history, exit_codes = {}, {}, []
  for record in records:
    kind = record.WhichOneof("record_type")
    if kind == "run":
      assert record.run.run_id == run_id
      config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.run.config.update}
    elif kind == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
      history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    elif kind == "exit":
      exit_codes.append(record.exit.exit_code)
  return config, history, exit_codes


def test_an_offline_run_holds_the_metrics_and_config_and_a_resume_continues_it(tmp_path, monkeypatch):
  """The run, its resume and a rerun that crashes: one W&B run id, each part finished with its status."""
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = str(tmp_path / "run")
  config = make_tiny_config(tmp_path, **{"train.steps": 2, "train.log_every": 1, "train.eval_every": 2,
                                         "train.checkpoint_every": 2, "train.wandb_project": "jaxllm-test",
                                         "train.wandb_tags": "tiny, test"})
  train.run(config, workdir)
  with open(os.path.join(workdir, "wandb.json"), encoding="utf-8") as f:
    run_id = json.load(f)["run_id"]
  logged_config, history, exit_codes = offline_run(tmp_path, run_id, 0)
  assert exit_codes == [0]
  assert logged_config["train"]["wandb_project"] == "jaxllm-test"
  assert logged_config["model"] == config.model.to_dict()
  records = read_records(os.path.join(workdir, "metrics.jsonl"))
  assert sorted(history) == [r["step"] for r in records] == [1, 2]
  for record in records:  # the same scalars, the same values
    assert history[record["step"]] == pytest.approx({k: v for k, v in record.items() if k != "step"})
  assert "eval_loss" in history[2]

  config.train.steps = 3  # the rerun resumes from the checkpoint at step 2 and logs step 3
  train.run(config, workdir)
  with open(os.path.join(workdir, "wandb.json"), encoding="utf-8") as f:
    assert json.load(f)["run_id"] == run_id
  runs = sorted(glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*")))
  assert [r.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]
  logged_config, resumed, exit_codes = offline_run(tmp_path, run_id, 1)
  assert logged_config["train"]["steps"] == 3 and exit_codes == [0]
  assert sorted(resumed) == [3]
  assert resumed[3]["loss"] == pytest.approx(read_records(os.path.join(workdir, "metrics.jsonl"))[-1]["loss"])

  def crash(*args):
    raise RuntimeError("the loop broke")
  monkeypatch.setattr(train, "train_loop", crash)
  config.train.steps = 4
  with pytest.raises(RuntimeError, match="the loop broke"):
    train.run(config, workdir)
  assert offline_run(tmp_path, run_id, 2)[2] == [1]  # finished as failed


def test_without_the_wandb_package_the_run_is_refused_before_the_workdir_is_touched(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then finds no wandb, as when not installed
  config = make_tiny_config(tmp_path, **{"train.wandb_project": "jaxllm-test"})
  with pytest.raises(ConfigError, match=r"pip install 'jaxllm\[wandb\]'"):
    train.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")

