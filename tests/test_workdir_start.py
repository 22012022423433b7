"""A failed start leaves the workdir as it was, and no loader takes a checkpoint of another model.

The quickstart's case: rerunning a workdir with another `model.num_layers` must stop
before config.json is rewritten, and a model directory whose config.json and
checkpoint disagree is refused by generate, convert and init_from with one line that
names the first parameter that differs.
"""

import os

import pytest

from jaxllm import checkpoint, model_dir, train
from jaxllm.config import ConfigError
from jaxllm.data.sources import DataError
from jaxllm.models import ModelConfig, abstract_params
from tests.helpers import make_tiny_config, run_cli
from tests.test_reliability_inputs import tree_digest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("start")
  workdir = str(tmp / "run")
  train.run(make_tiny_config(tmp, **{"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2,
                                     "train.sample_prompt": ""}), workdir)
  return tmp, workdir


@pytest.mark.parametrize("change,named", [({"model.num_layers": 1}, "model.num_layers=1"),
                                          ({"model.d_model": 32}, "model.d_model=32"),
                                          ({"data.seq_len": 16}, "data.seq_len=16"),
                                          ({"model.activation": "relu"}, "model.activation='relu'")])
def test_a_rerun_with_another_model_changes_nothing(trained, change, named):
  tmp, workdir = trained
  before = tree_digest(workdir)
  with pytest.raises(ConfigError) as info:
    train.run(make_tiny_config(tmp, **{"train.steps": 4, **change}), workdir)
  assert named in str(info.value) and "fresh --workdir" in str(info.value)
  assert tree_digest(workdir) == before


def test_a_rerun_that_only_trains_longer_is_allowed(trained, tmp_path):
  _, workdir = trained
  before = checkpoint.read_run_config(workdir)
  copy = str(tmp_path / "copy")
  os.system(f"cp -r {workdir} {copy}")
  train.run(make_tiny_config(trained[0], **{"train.steps": 3, "train.checkpoint_every": 3,
                                            "train.sample_prompt": "", "optim.lr": 1e-3}), copy)
  after = checkpoint.read_run_config(copy)
  assert after["train"]["steps"] == 3 and after["optim"]["lr"] == 1e-3
  assert after["model"] == before["model"]


def test_a_failed_fresh_start_leaves_no_workdir(tmp_path):
  # The tokenizer is trained, then the validation split turns out too short: nothing may stay,
  # or the rerun of the fixed command would reuse a tokenizer it did not ask for.
  workdir = tmp_path / "fresh"
  config = make_tiny_config(tmp_path, **{"data.val_fraction": 0.001, "train.eval_steps": 50})
  with pytest.raises(DataError, match="validation split is shorter"):
    train.run(config, str(workdir))
  assert not workdir.exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(DataError):
    train.run(config, str(existing))
  assert sorted(os.listdir(existing)) == ["notes.txt"]


def lying_model_dir(workdir, tmp_path, **model_changes):
  """A copy of a run whose config.json describes another model than its checkpoint holds."""
  fake = str(tmp_path / "fake")
  os.system(f"cp -r {workdir} {fake}")
  config = checkpoint.read_run_config(fake)
  config["model"].update(model_changes)
  checkpoint.write_json(os.path.join(fake, "config.json"), config)
  return fake


@pytest.mark.parametrize("changes,named", [({"num_layers": 1}, "there but (1, "),
                                           ({"num_layers": 3}, "there but (3, "),
                                           ({"num_layers": 1, "scan_layers": False}, "there but (1, "),
                                           ({"d_ff": 64}, "mlp")])
def test_loaders_refuse_a_checkpoint_of_another_model(trained, tmp_path, changes, named):
  _, workdir = trained
  fake = lying_model_dir(workdir, tmp_path, **changes)
  with pytest.raises(checkpoint.CheckpointError) as info:
    model_dir.load_model_dir(fake)
  assert named in str(info.value) and "does not fit this model" in str(info.value), info.value
  # init_from a base whose config.json lies is refused too.
  model_cfg = ModelConfig.from_config(checkpoint.read_run_config(fake)["model"])
  with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
    checkpoint.load_params(fake, abstract_params(model_cfg))


def test_generate_and_convert_refuse_it_with_one_line(trained, tmp_path):
  _, workdir = trained
  fake = lying_model_dir(workdir, tmp_path, num_layers=1)
  for args in (("jaxllm.generate", "--checkpoint", fake, "--prompt", "the cat"),
               ("jaxllm.convert", "to-hf", fake, str(tmp_path / "hf"))):
    result = run_cli(*args, timeout=300)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("error:") and "layers/" in lines[-1] and "(1, " in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "hf") or not os.listdir(tmp_path / "hf")
