"""Shared test fixtures: tiny corpora and configs built on the spot (no downloads)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from jaxllm.config import apply_overrides, default_config  # noqa: F401  (apply_overrides: tests import it here)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORDS = ("the cat sat on a mat while dogs ran far away from big red trees and small "
          "birds sang songs of old kings who ruled wide lands near cold seas").split()


def write_corpus(path: str, num_docs: int = 200, seed: int = 0) -> str:
  """A JSONL corpus of short random-word documents of mixed length."""
  import json  # pylint: disable=import-outside-toplevel
  rng = random.Random(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(num_docs):
      words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 60))]
      f.write(json.dumps({"text": f"doc {i}: " + " ".join(words) + "."}) + "\n")
  return path


def make_tiny_config(tmp_path, **overrides):
  """A 2-layer GPT on a random-word corpus; keyword overrides use dotted keys ("train.steps")."""
  config = default_config()
  corpus = write_corpus(os.path.join(str(tmp_path), "corpus.jsonl"))
  config.data.update(source="jsonl", path=corpus, field="text", seq_len=32, val_fraction=0.1,
                     tokenizer_vocab_size=300)
  config.model.update(vocab_size=384, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_seq_len=32)
  config.train.update(steps=6, batch_size=8, log_every=2, eval_every=3, eval_steps=2,
                      checkpoint_every=3, progress=False, tensorboard=False)
  config.optim.update(lr=3e-3, warmup_steps=2, min_lr=3e-4)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return apply_overrides(config, overrides)


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600,
            devices: int = 1) -> subprocess.CompletedProcess:
  """Runs `python -m module args...` in a subprocess from the repo root; returns the result."""
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
  if env:
    full_env.update(env)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)
