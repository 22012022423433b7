"""A user's commands print only what asks them to act: no notice that transformers has no
PyTorch (jaxllm uses it for tokenizers and configs only), no orbax note on reading a step's state."""

import logging
import subprocess
import sys

from tests.helpers import REPO_ROOT, make_tiny_config

# Without torch: sys.modules["torch"] = None makes importlib's find_spec (and so transformers'
# is_torch_available) say there is none, as in an environment where it is not installed.
_NO_TORCH = "import sys; sys.modules['torch'] = None; "


def _stderr(code: str) -> str:
  result = subprocess.run([sys.executable, "-c", _NO_TORCH + code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=True, env={"PYTHONPATH": REPO_ROOT, "PATH": "/usr/bin:/bin"})
  return result.stderr


def test_no_pytorch_notice_from_transformers_once_jaxllm_is_imported():
  assert "PyTorch was not found" in _stderr("import transformers")  # the notice jaxllm hides
  quiet = _stderr("import jaxllm.tokenizer, transformers; "
                  "transformers.logging.get_logger('transformers').warning('other messages still show')")
  assert "PyTorch was not found" not in quiet
  assert "other messages still show" in quiet


def test_loading_a_trained_model_directory_logs_no_orbax_metadata_note(tmp_path, caplog):
  from jaxllm import model_dir, train  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(tmp_path, **{"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2})
  train.run(config, str(tmp_path / "run"))
  with caplog.at_level(logging.INFO):
    model_dir.load_model_dir(str(tmp_path / "run"))
  assert "_CHECKPOINT_METADATA" not in caplog.text
  assert "_NoStateMetadataNotice" not in str(logging.getLogger("absl").filters)  # removed after the load
