"""Typed config sections: the one home of every default, old config.json files, unknown keys."""

import dataclasses
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from jaxllm.config import ConfigError, default_config, validate
from jaxllm.config_types import (SECTIONS, DataConfig, MeshConfig, MlmConfig, OptimConfig, RunConfig, SftConfig,
                                 SourceConfig, TrainConfig, model_defaults)
from jaxllm.models import ModelConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_config_holds_every_field_with_its_default():
  config = default_config()
  assert set(config.keys()) == {"task", "init_from", "model", *SECTIONS}
  assert (config.task, config.init_from) == (RunConfig.task, RunConfig.init_from)
  for name, section in SECTIONS.items():
    fields = dataclasses.fields(section)
    assert list(config[name].keys()) == sorted(f.name for f in fields), name  # ConfigDict keys sort
    for f in fields:
      default = f.default_factory() if f.default is dataclasses.MISSING else f.default
      value = config[name][f.name]
      value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
      assert value == default and type(value) is type(default), f"{name}.{f.name}"
  assert config.model.to_dict() == model_defaults()
  assert set(config.model.keys()) == {f.name for f in dataclasses.fields(ModelConfig)}
  # And back: the typed view of the defaults is the dataclasses' defaults.
  typed = RunConfig.from_config(config)
  assert typed == RunConfig()
  assert (typed.train, typed.optim, typed.data, typed.sft, typed.mlm, typed.mesh) == (
      TrainConfig(), OptimConfig(), DataConfig(), SftConfig(), MlmConfig(), MeshConfig())
  assert typed.model == ModelConfig(**model_defaults()) and typed.model.vocab_size == 50304


def test_a_section_reads_what_the_configdict_holds():
  config = default_config()
  config.train.steps, config.optim.decay_steps, config.data.packing = 7, 300, "document"
  config.train.eval_data = ["a.txt", "b.txt"]
  config.data.sources = dict(web=dict(path="/web", weight=3.0), code=dict(source="stdlib"))
  typed = RunConfig.from_config(config)
  assert (typed.train.steps, typed.optim.decay_steps, typed.data.packing) == (7, 300, "document")
  assert typed.train.eval_data == ("a.txt", "b.txt")
  assert typed.data.sources == {"web": {"path": "/web", "weight": 3.0}, "code": {"source": "stdlib"}}
  sources = typed.data.resolved_sources()
  assert sources["web"] == SourceConfig(path="/web", weight=3.0) and sources["code"].weight == 1.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.train.steps = 8  # type: ignore[misc]


def test_an_old_config_json_missing_keys_loads_with_the_defaults(tmp_path):
  """A run's config.json written before a key existed (here: several) still loads."""
  saved = json.loads(json.dumps(default_config().to_dict()))
  for section, key in (("train", "loss_chunk_size"), ("train", "max_nonfinite_in_a_row"),
                       ("optim", "decay_embeddings"), ("data", "on_bad_record"), ("data", "row_shuffle")):
    del saved[section][key]
  del saved["sft"]
  saved["train"]["steps"] = 420
  typed = RunConfig.from_config(saved)
  assert typed.train.steps == 420 and typed.train.loss_chunk_size == 0 and typed.train.max_nonfinite_in_a_row == 10
  assert typed.optim.decay_embeddings is False and typed.data.on_bad_record == "skip" and typed.data.row_shuffle == 0
  assert typed.sft == SftConfig()
  assert TrainConfig.from_config({}) == TrainConfig() and DataConfig.from_config(None) == DataConfig()
  # The library reads it as it reads a fresh config (validate, the fault limit, the schedule).
  from jaxllm import faults, optim  # pylint: disable=import-outside-toplevel
  validate(typed, 1)
  assert faults.limit(typed.train) == 10
  schedule = optim.learning_rate_schedule(typed.optim, typed.train.steps)
  assert float(schedule(typed.optim.warmup_steps)) == pytest.approx(typed.optim.lr)


def test_an_unknown_key_is_one_clear_error():
  config = default_config()
  config.train.stepz = 5  # a recipe file's typo (the ConfigDict is not locked while a recipe builds it)
  with pytest.raises(ConfigError) as e:
    RunConfig.from_config(config)
  assert str(e.value) == "train.stepz is not a config key; did you mean train.steps?"
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="optim.warmup is not a config key; did you mean optim.warmup_steps"):
    OptimConfig.from_config({"warmup": 10})
  with pytest.raises(ConfigError, match="mesh.xyz is not a config key; known keys: data, fsdp, tensor"):
    MeshConfig.from_config({"xyz": 1})
  config = default_config()
  config.trainer = ml_collections.ConfigDict(dict(steps=1))
  with pytest.raises(ConfigError, match="^trainer is not a config key"):
    validate(config, 1)
  # A bad model value is a ConfigError too (ModelConfig raises ValueError).
  config = default_config()
  config.model.norm = "batchnorm"
  with pytest.raises(ConfigError, match="model.norm='batchnorm'"):
    RunConfig.from_config(config)


def test_read_back_configs_tolerate_unknown_keys():
  """A config.json read back (generate, convert, the resume check) may come from a newer version:
  strict=False ignores the keys this one does not know; ModelConfig always does (an init_from
  directory's architecture keys are copied over the recipe's as they are)."""
  saved = default_config().to_dict()
  saved["train"]["a_newer_key"] = 1
  saved["model"]["a_newer_model_key"] = 2
  saved["a_newer_section"] = {}
  typed = RunConfig.from_config(saved, strict=False)
  assert typed.train == TrainConfig()
  with pytest.raises(ConfigError, match="train.a_newer_key"):
    RunConfig.from_config({"train": saved["train"]})
  del saved["train"]["a_newer_key"], saved["a_newer_section"]
  assert RunConfig.from_config(saved).model == RunConfig().model  # unknown model keys: ignored


def test_every_recipe_builds_its_typed_config():
  """Every configs/*.py sets only keys the sections know."""
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, "configs"))
                 if f.endswith(".py") and f != "__init__.py")
  code = ("import importlib, sys\nfrom jaxllm.config_types import RunConfig\n"
          "for name in sys.argv[1:]:\n"
          "  RunConfig.from_config(importlib.import_module('configs.' + name).get_config())\n")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(names) >= 10


def test_a_recipe_typo_fails_the_train_command_with_one_line(tmp_path):
  recipe = tmp_path / "typo.py"
  recipe.write_text("from jaxllm.config import default_config\n\n"
                    "def get_config():\n  c = default_config()\n  c.train.log_evry = 5\n  return c\n")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "jaxllm.train", "--config", str(recipe),
                           "--workdir", str(tmp_path / "run")], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == \
      "error: train.log_evry is not a config key; did you mean train.log_every?"
  assert not os.path.exists(tmp_path / "run" / "config.json")
