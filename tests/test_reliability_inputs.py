"""Bad input stops a run with one clear line and damages no checkpoint.

Each case goes through `train.run` (what the CLI calls) and must raise one of
`jaxllm.errors.USER_ERRORS`, which the CLI prints as one `error: ...` line with exit status 2;
one case runs the real CLI to check exactly that. Disk problems use a real tmpfs
(mounted read-only, or too small): tests run as root, where chmod does not stop writes.
Bad flags and config keys, for every command, are tested in test_cli_errors.py.
"""

import contextlib
import hashlib
import json
import os
import subprocess

import jax
import pytest

from jaxllm import checkpoint, train
from jaxllm.errors import USER_ERRORS
from jaxllm.config import validate
from jaxllm.sharding import make_mesh
from jaxllm.state import make_setup
from jaxllm.tokenizer import train_bpe
from tests.helpers import make_tiny_config, run_cli, write_corpus


def expect_error(config, workdir, *fragments):
  with pytest.raises(USER_ERRORS) as info:
    train.run(config, str(workdir))
  message = str(info.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message
  return message


def tree_digest(path) -> dict[str, str]:
  """Relative path -> sha256 of every file below `path`."""
  digests = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def save_initial_checkpoint(config, workdir, step=5):
  """A real checkpoint (initial state of `config`'s model) without compiling a train step."""
  setup = make_setup(config, validate(config, jax.device_count()), make_mesh(config.mesh))
  manager = checkpoint.make_manager(str(workdir))
  checkpoint.save(manager, step, setup.init_fn(jax.random.key(0)), {})
  checkpoint.wait(manager)
  manager.close()
  return setup


@contextlib.contextmanager
def tmpfs(path, size: str):
  os.makedirs(path, exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_missing_and_unreadable_data_paths(tmp_path):
  expect_error(make_tiny_config(tmp_path, **{"data.path": str(tmp_path / "nope.jsonl")}), tmp_path / "w",
               "nope.jsonl", "no such file")
  # /proc/self/mem is a file that exists but fails to read (EIO), even for root.
  expect_error(make_tiny_config(tmp_path, **{"data.path": "/proc/self/mem", "data.source": "text"}),
               tmp_path / "w", "/proc/self/mem", "cannot be read")


def test_invalid_json_and_missing_field_name_the_line(tmp_path):
  corpus = write_corpus(str(tmp_path / "corpus.jsonl"), num_docs=30)
  with open(corpus, encoding="utf-8") as f:
    lines = f.readlines()
  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text("".join(lines[:6]) + '{"text": "unterminated\n' + "".join(lines[6:]))
  config = make_tiny_config(tmp_path, **{"data.path": str(bad_json), "data.on_bad_record": "error"})
  expect_error(config, tmp_path / "w", "bad.jsonl line 7", "invalid JSON")
  no_field = tmp_path / "no_field.jsonl"
  no_field.write_text("".join(lines[:3]) + json.dumps({"body": "x"}) + "\n" + "".join(lines[3:]))
  config = make_tiny_config(tmp_path, **{"data.path": str(no_field), "data.on_bad_record": "error"})
  expect_error(config, tmp_path / "w", "no_field.jsonl line 4", "no field 'text'", "body")


def test_tokenizer_larger_than_the_embedding(tmp_path):
  with open(write_corpus(str(tmp_path / "corpus.jsonl")), encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
  tokenizer = train_bpe(texts, 300)
  tokenizer.save_pretrained(str(tmp_path / "tok"))
  config = make_tiny_config(tmp_path, **{"data.tokenizer": str(tmp_path / "tok"), "model.vocab_size": 256})
  expect_error(config, tmp_path / "w", f"tokenizer has {len(tokenizer)} tokens", "model.vocab_size=256")


def test_checkpoint_of_another_architecture_fails_and_stays_intact(tmp_path):
  workdir = tmp_path / "w"
  original = make_tiny_config(tmp_path)
  setup = save_initial_checkpoint(original, workdir)
  before = tree_digest(workdir / "checkpoints")
  for change in ({"model.d_model": 32}, {"model.num_layers": 1}):
    expect_error(make_tiny_config(tmp_path, **change), workdir, "checkpoint step 5", "does not fit",
                 "fresh --workdir")
    assert tree_digest(workdir / "checkpoints") == before
  # ...and the original model still restores from it.
  abstract = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  _, _, step = checkpoint.restore(checkpoint.make_manager(str(workdir)), abstract)
  assert step == 5


def test_workdir_that_is_not_a_directory(tmp_path):
  (tmp_path / "file").write_text("x")
  expect_error(make_tiny_config(tmp_path), tmp_path / "file" / "work", "cannot write there", "Not a directory")


def test_read_only_disk_cli_one_line_and_checkpoint_intact(tmp_path):
  config = make_tiny_config(tmp_path)
  config_file = tmp_path / "config.py"
  config_file.write_text("import ml_collections\n\n\ndef get_config():\n"
                         f"  return ml_collections.ConfigDict({config.to_dict()!r})\n")
  with tmpfs(tmp_path / "disk", "16m") as disk:
    workdir = disk / "w"
    save_initial_checkpoint(config, workdir)
    before = tree_digest(workdir)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = run_cli("jaxllm.train", "--config", str(config_file), "--workdir", str(workdir))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [l for l in lines if l.startswith("error:")] == [lines[-1]], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "cannot write there (Read-only file system)" in lines[-1]
    assert tree_digest(workdir) == before


def test_full_disk_stops_before_writing_and_keeps_the_last_checkpoint(tmp_path):
  # The tiny model's checkpoint (params + two Adam moments) is about 1.1 MB of arrays and takes 1.3-1.8 MB
  # on disk once written; while orbax writes it, it briefly needed more than 2 MB in some runs (a flaky
  # ENOSPC on the first save). 2.3 MB holds one checkpoint and leaves less than the 1.2 MB a second needs.
  config = make_tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2, "train.eval_steps": 0,
                                         "train.peak_flops": 1e12})
  with tmpfs(tmp_path / "disk", "2300k") as disk:
    workdir = disk / "w"
    expect_error(config, workdir, "cannot write checkpoint 4", "MiB are free", "Earlier checkpoints are intact")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # no partial save left behind
    setup = make_setup(config, validate(config, jax.device_count()), make_mesh(config.mesh))
    abstract = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    state, _, step = checkpoint.restore(checkpoint.make_manager(str(workdir)), abstract)
    assert step == 2 and int(state.step) == 2
