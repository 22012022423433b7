"""Test setup: 8 simulated CPU devices (so sharding is tested), quiet logs, tiny configs."""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import tempfile  # noqa: E402

# Many tests compile the same tiny programs again and again: in this process (the trainer built
# anew per test) and in the commands they start as subprocesses (train, its killed and resumed
# copies, convert, generate, two-process runs). One persistent XLA cache per test session, shared
# by the xdist workers and their subprocesses, compiles each program once. The size limit turns
# on jax's file lock, so no process reads an entry half written. (test_bench counts lowerings,
# which happen before the cache is asked, so compile-once is still checked.)
XLA_CACHE_DIR = os.path.join(tempfile.gettempdir(), "jaxllm-test-xla-cache-" +
                             os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid())))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  """A config that trains a 2-layer GPT on a small text corpus written to tmp."""
  from tests.helpers import make_tiny_config  # pylint: disable=import-outside-toplevel
  return make_tiny_config


def pytest_sessionfinish(session):
  # The controller (not an xdist worker) removes the session's cache once every worker is done.
  if not hasattr(session.config, "workerinput"):
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(XLA_CACHE_DIR, ignore_errors=True)
