"""The CPU-only compiler switch (jaxllm/cpu_compile.py): the steps' dots run through oneDNN one
dot at a time, with the same losses as XLA's default; it stays off off the CPU and when asked."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from jaxllm import cpu_compile, train
from jaxllm.bench import compile_train_step
from jaxllm.sharding import make_mesh
from tests.helpers import make_tiny_config
from tests.test_train import _metrics

LLAMA = {"model.position": "rotary", "model.norm": "rmsnorm", "model.activation": "swiglu",
         "model.num_kv_heads": 2, "model.tie_embeddings": False}


@pytest.fixture(autouse=True)
def no_persistent_cache():
  """The suite's persistent XLA cache (tests/conftest.py) turns the switch off; these tests are
  about the switch, so they run as a user without that cache does."""
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", previous)


def _losses(tmp_path, name, **overrides):
  config = make_tiny_config(tmp_path, **{"train.steps": 4, "train.log_every": 1, "train.eval_every": 4,
                                         **overrides})
  train.run(config, str(tmp_path / name))
  return [(r["step"], r["loss"], r.get("eval_loss")) for r in _metrics(str(tmp_path / name))]


def test_on_for_cpu_devices_off_elsewhere_and_when_asked(monkeypatch):
  cpus = jax.devices("cpu")
  assert cpu_compile.step_compiler_options(cpus) == cpu_compile.ONEDNN_DOTS
  gpu = dataclasses.make_dataclass("FakeGpu", [("platform", str)])("gpu")
  assert cpu_compile.step_compiler_options([gpu]) == {}
  assert cpu_compile.step_compiler_options([cpus[0], gpu]) == {}
  monkeypatch.setenv("JAXLLM_CPU_ONEDNN", "0")
  assert cpu_compile.step_compiler_options(cpus) == {}
  monkeypatch.delenv("JAXLLM_CPU_ONEDNN")
  jax.config.update("jax_enable_compilation_cache", True)  # the cache dir is set (conftest)
  assert cpu_compile.persistent_cache_on() and cpu_compile.step_compiler_options(cpus) == {}


def test_two_dots_into_one_add_compile_and_run():
  """The pattern that XLA's fusing oneDNN mode cannot compile (it kills the process) is fine one
  dot at a time: every oneDNN fusion holds a single dot, and the sum is right."""
  rng = np.random.default_rng(0)
  a, b, c, d = (rng.standard_normal(s, dtype=np.float32) for s in ((64, 32), (32, 48), (64, 16), (16, 48)))
  f = jax.jit(lambda a, b, c, d: a @ b + c @ d, compiler_options=cpu_compile.ONEDNN_DOTS)
  hlo = f.lower(a, b, c, d).compile().as_text()
  bodies = re.findall(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M)
  onednn = [name for name in re.findall(r"calls=%([\w.]+), .*?__onednn_fusion", hlo)]
  assert len(onednn) == 2, hlo
  assert all(body.count(" dot(") == 1 for name, body in bodies if name in onednn)
  np.testing.assert_allclose(f(a, b, c, d), a.astype(np.float64) @ b + c.astype(np.float64) @ d,
                             rtol=1e-5, atol=1e-5)


def test_llama_trains_with_onednn_dots_as_with_xla_default(tmp_path, monkeypatch):
  """Same losses and eval loss with the switch on (the default) and off: rotary, RMSNorm,
  SwiGLU (the gate x up product of two dots), grouped-query attention, an untied head."""
  on = _losses(tmp_path, "on", **LLAMA)
  monkeypatch.setenv("JAXLLM_CPU_ONEDNN", "0")
  off = _losses(tmp_path, "off", **LLAMA)
  assert [s for s, _, _ in on] == [s for s, _, _ in off] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l, _ in on], [l for _, l, _ in off], rtol=1e-5)
  np.testing.assert_allclose(on[-1][2], off[-1][2], rtol=1e-5)


def test_the_train_step_really_uses_it(tmp_path):
  """The trainer's compiled step (tiny GPT-2, attention_impl auto = cpu on CPU) runs its layer
  matmuls and attention's batched products in oneDNN, one dot per fusion."""
  config = make_tiny_config(tmp_path)  # data parallel over the 8 simulated devices
  _, compiled, _, _ = compile_train_step(config, "none", make_mesh(config.mesh))
  hlo = compiled.as_text()
  bodies = dict(re.findall(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M))
  onednn = [bodies[name] for name in re.findall(r"calls=%([\w.]+), .*?__onednn_fusion", hlo)]
  assert all(body.count(" dot(") == 1 for body in onednn)
  batched = [b for b in onednn if "lhs_batch_dims" in b]
  # Per layer 2 forward (scores, values) and 4 backward products; XLA fuses the one that feeds
  # the softmax backward with it in its own library. The 2 layers run unrolled.
  assert len(batched) >= 2 * 4, len(batched)
  assert len(onednn) - len(batched) >= 2 * 3 * 6, len(onednn)  # q, k, v, out, fc, proj: forward + 2 backward


def test_gpt2_with_onednn_dots_resumes_bit_for_bit_and_trains_as_xla_default(tmp_path, monkeypatch):
  """oneDNN's dots are deterministic from one compile to the next: 2 steps, then a resume to 4,
  give the unbroken 4-step run's losses exactly (the schedule pinned by decay_steps), and those
  equal the run with the switch off to 1e-5."""
  assert cpu_compile.step_compiler_options(jax.devices()[:1]) == cpu_compile.ONEDNN_DOTS
  common = {"train.checkpoint_every": 2, "optim.decay_steps": 4}
  unbroken = _losses(tmp_path, "unbroken", **common)
  _losses(tmp_path, "resumed", **{"train.steps": 2, **common})
  resumed = _losses(tmp_path, "resumed", **common)
  assert [s for s, _, _ in resumed] == [1, 2, 3, 4]
  # The first leg also evaluated at its last step (2); the losses and the final eval match.
  assert [l for _, l, _ in resumed] == [l for _, l, _ in unbroken]
  assert resumed[-1][2] == unbroken[-1][2] is not None
  monkeypatch.setenv("JAXLLM_CPU_ONEDNN", "0")
  off = _losses(tmp_path, "off", **common)
  np.testing.assert_allclose([l for _, l, _ in unbroken], [l for _, l, _ in off], rtol=1e-5)
  np.testing.assert_allclose(unbroken[-1][2], off[-1][2], rtol=1e-5)
