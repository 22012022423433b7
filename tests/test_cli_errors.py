"""Every command handles bad input the same way: one `error:` line, exit status 2, no traceback.

Each case runs the real command in a subprocess with one thing wrong: an unknown flag, a
flag value of the wrong type, an unknown or ill-typed config key (`--config.KEY=VALUE` for
the commands that take a config file, `--data KEY=VALUE` for the tokenizer) or a path that
does not exist. All of them fail before any model is built or compiled.
"""

import os
import subprocess
import sys

import pytest

from jaxllm import checkpoint, config, errors, sampling, sharding
from jaxllm.convert import ConvertError
from jaxllm.data import sources
from tests.helpers import REPO_ROOT, run_cli

CONFIG = "configs/bench_gpt_cpu.py"
MISSING = "{tmp}/missing"  # a path under the test's tmp_path that does not exist

# (module, arguments, a fragment the error line must contain: the offending flag, key or path)
CASES = {
    "train-bad-flag": ("jaxllm.train", ["--config", CONFIG, "--workdir", "{tmp}/w", "--stepz=3"], "stepz"),
    "train-unknown-key": ("jaxllm.train", ["--config", CONFIG, "--workdir", "{tmp}/w",
                                           "--config.model.scan_layerz=1"], "config.model.scan_layerz"),
    "train-ill-typed-key": ("jaxllm.train", ["--config", CONFIG, "--workdir", "{tmp}/w",
                                             "--config.train.steps=many"], "--config.train.steps=many"),
    "train-missing-config": ("jaxllm.train", ["--config", MISSING + ".py", "--workdir", "{tmp}/w"],
                             MISSING + ".py"),
    "train-no-workdir": ("jaxllm.train", ["--config", CONFIG], "--workdir is required"),
    "bench-bad-flag": ("jaxllm.bench", ["--config", CONFIG, "--stepz=3"], "stepz"),
    "bench-ill-typed-flag": ("jaxllm.bench", ["--config", CONFIG, "--steps=many"], "--steps=many"),
    "bench-unknown-key": ("jaxllm.bench", ["--config", CONFIG, "--config.model.scan_layerz=1"],
                          "config.model.scan_layerz"),
    "bench-unknown-section": ("jaxllm.bench", ["--config", CONFIG, "--config.modell.d_model=8"],
                              "config.modell.d_model"),
    "bench-ill-typed-key": ("jaxllm.bench", ["--config", CONFIG, "--config.model.d_model=wide"],
                            "--config.model.d_model=wide"),
    "bench-missing-config": ("jaxllm.bench", ["--config", MISSING + ".py"], MISSING + ".py"),
    "bench-no-config": ("jaxllm.bench", [], "--config is required"),
    "generate-bad-flag": ("jaxllm.generate", ["--checkpoint", MISSING, "--prompt", "x", "--tempreature", "0"],
                          "--tempreature"),
    "generate-ill-typed-flag": ("jaxllm.generate", ["--checkpoint", MISSING, "--prompt", "x", "--top-k", "some"],
                                "--top-k"),
    "generate-missing-checkpoint": ("jaxllm.generate", ["--checkpoint", MISSING, "--prompt", "x"], MISSING),
    "generate-missing-prompt-file": ("jaxllm.generate", ["--checkpoint", MISSING, "--prompt-file",
                                                         MISSING + ".txt"], MISSING + ".txt"),
    "convert-bad-subcommand": ("jaxllm.convert", ["from-hff", MISSING, "{tmp}/out"], "from-hff"),
    "convert-bad-flag": ("jaxllm.convert", ["from-hf", MISSING, "{tmp}/out", "--param-dtype", "int8"],
                         "--param-dtype"),
    "convert-missing-argument": ("jaxllm.convert", ["to-hf", MISSING], "hf_dir"),
    "convert-ill-typed-flag": ("jaxllm.convert", ["to-hf", MISSING, "{tmp}/out", "--step", "last"], "--step"),
    "convert-from-hf-missing-path": ("jaxllm.convert", ["from-hf", MISSING, "{tmp}/out"], MISSING),
    "convert-to-hf-missing-path": ("jaxllm.convert", ["to-hf", MISSING, "{tmp}/out"], MISSING),
    "convert-to-peft-bad-flag": ("jaxllm.convert", ["to-peft", "--run", MISSING, "--out", "{tmp}/out",
                                                    "--bogus"], "--bogus"),
    "convert-to-peft-missing-path": ("jaxllm.convert", ["to-peft", "--run", MISSING, "--out", "{tmp}/out"],
                                     MISSING),
    "convert-from-peft-missing-path": ("jaxllm.convert", ["from-peft", "--adapter", MISSING, "--base",
                                                          MISSING, "--out", "{tmp}/out"], MISSING),
    "convert-to-peft-positional-missing-path": ("jaxllm.convert", ["to-peft", MISSING, "{tmp}/out"], MISSING),
    "convert-to-peft-no-destination": ("jaxllm.convert", ["to-peft", MISSING], "DST is missing"),
    "convert_peft-missing-path": ("jaxllm.convert_peft", ["to-peft", "--run", MISSING, "--out", "{tmp}/out"],
                                  MISSING),
    "tokenizer-bad-flag": ("jaxllm.tokenizer", ["train", "--vocab-size", "300", "--out", "{tmp}/tok",
                                                "--sorce", "text"], "--sorce"),
    "tokenizer-ill-typed-flag": ("jaxllm.tokenizer", ["train", "--vocab-size", "lots", "--out", "{tmp}/tok"],
                                 "--vocab-size"),
    "tokenizer-unknown-key": ("jaxllm.tokenizer", ["train", "--vocab-size", "300", "--out", "{tmp}/tok",
                                                   "--data", "feild=body"], "data.feild"),
    "tokenizer-ill-typed-key": ("jaxllm.tokenizer", ["train", "--vocab-size", "300", "--out", "{tmp}/tok",
                                                     "--data", "max_chars=true"], "data.max_chars"),
    "tokenizer-missing-data": ("jaxllm.tokenizer", ["train", "--vocab-size", "300", "--out", "{tmp}/tok",
                                                    "--source", "text", "--path", MISSING + ".txt"],
                               MISSING + ".txt"),
    "tokenizer-analyze-missing-tokenizer": ("jaxllm.tokenizer", ["analyze", MISSING], MISSING),
    "tokenizer-analyze-not-a-tokenizer": ("jaxllm.tokenizer", ["analyze", "{tmp}"], "not a Hugging Face"),
    "fill_mask-bad-flag": ("jaxllm.fill_mask", ["--checkpoint", MISSING, "--topk", "3", "a [MASK]"], "--topk"),
    "fill_mask-ill-typed-flag": ("jaxllm.fill_mask", ["--checkpoint", MISSING, "--top-k", "few", "a [MASK]"],
                                 "--top-k"),
    "fill_mask-missing-argument": ("jaxllm.fill_mask", ["a [MASK]"], "--checkpoint"),
    "fill_mask-missing-checkpoint": ("jaxllm.fill_mask", ["--checkpoint", MISSING, "a [MASK]"], MISSING),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path):
  module, args, fragment = CASES[case]
  args = [a.format(tmp=tmp_path) for a in args]
  fragment = fragment.format(tmp=tmp_path)
  result = run_cli(module, *args, timeout=120)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
  assert [line for line in lines if line.startswith("error:")] == [lines[-1]], result.stderr[-2000:]
  assert fragment in lines[-1], lines[-1]
  assert not (tmp_path / "out").exists() and not (tmp_path / "tok").exists()


def test_one_error_hierarchy():
  """The errors each module raises are the one class in jaxllm.errors, and still the builtin
  type they used to be, so existing `except ValueError` / `except RuntimeError` keep working."""
  assert config.ConfigError is sharding.ConfigError is errors.ConfigError
  assert sources.DataError is errors.DataError and checkpoint.CheckpointError is errors.CheckpointError
  assert sampling.GenerationError is errors.GenerationError and ConvertError is errors.ConvertError
  for cls, builtin in ((errors.ConfigError, ValueError), (errors.DataError, ValueError),
                       (errors.CheckpointError, RuntimeError), (errors.GenerationError, ValueError),
                       (errors.ConvertError, ValueError)):
    assert issubclass(cls, errors.UserError) and issubclass(cls, builtin)
    assert issubclass(cls, errors.USER_ERRORS)
  assert issubclass(FileNotFoundError, errors.USER_ERRORS)
  assert not issubclass(TypeError, errors.USER_ERRORS)  # a bug keeps its traceback


def test_no_command_imports_another():
  commands = ["jaxllm.bench", "jaxllm.generate.__main__", "jaxllm.fill_mask", "jaxllm.convert.__main__",
              "jaxllm.convert_peft", "jaxllm.tokenizer"]
  code = (f"import importlib, sys\nfor m in {commands!r}:\n  importlib.import_module(m)\n"
          "print(sorted(m for m in sys.modules if m == 'jaxllm.train'))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"

