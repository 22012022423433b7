"""Numerical faults: skip updates whose gradients are not finite, count them, stop when told.

The check runs inside the jitted step (optax.apply_if_finite): a step whose
gradients hold a NaN or inf leaves the parameters and optimizer moments as they
were, and the counters live in the optimizer state, so they are checkpointed and
survive a resume. The loss needs no separate check: the gradient of the softmax
cross-entropy is finite exactly when the logits are, and so is the loss.

The host looks at the counters only when it fetches metrics anyway (every
`train.log_every` steps and before each checkpoint), so there is no per-step sync.
A skipped step never changes the parameters, so no checkpoint holds a state
that came from a NaN; with `nonfinite_policy="stop"` the loop also refuses to
save once a non-finite step has been seen, keeping the last checkpoint before it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import optax

from jaxllm.config_types import TrainConfig

POLICIES = ("skip", "stop")
COUNTERS = ("nonfinite_in_a_row", "nonfinite_total")  # metric names
# apply_if_finite gives up and applies a bad update after this many in a row; the
# loop's own limit (train.max_nonfinite_in_a_row) decides instead, so make it unreachable.
_NEVER = 2 ** 30


class NonFiniteError(RuntimeError):
  """Training produced non-finite gradients more often than the policy allows."""


def guard(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer`, skipping (and counting) every update whose gradients are not all finite."""
  return optax.apply_if_finite(optimizer, max_consecutive_errors=_NEVER)


def counters(opt_state: Any) -> dict[str, jnp.ndarray]:
  """{"nonfinite_in_a_row", "nonfinite_total"} from a guarded optimizer state ({} if unguarded)."""
  in_a_row = optax.tree_utils.tree_get(opt_state, "notfinite_count", None)
  total = optax.tree_utils.tree_get(opt_state, "total_notfinite", None)
  if in_a_row is None or total is None:
    return {}
  return dict(zip(COUNTERS, (in_a_row, total)))


def validate(train_cfg: TrainConfig) -> None:
  from jaxllm.errors import ConfigError  # pylint: disable=import-outside-toplevel
  policy = train_cfg.nonfinite_policy
  if policy not in POLICIES:
    raise ConfigError(f"train.nonfinite_policy={policy!r} is not known; use one of {POLICIES}.")
  if train_cfg.max_nonfinite_in_a_row < 0:
    raise ConfigError(f"train.max_nonfinite_in_a_row={train_cfg.max_nonfinite_in_a_row} must be >= 0 "
                      "(0 = never stop).")


def limit(train_cfg: TrainConfig) -> int:
  """How many non-finite steps in a row stop the run (0 = never)."""
  if train_cfg.nonfinite_policy == "stop":
    return 1
  return int(train_cfg.max_nonfinite_in_a_row)


def violation(fetched: Sequence[dict[str, Any]], first_step: int, train_cfg: TrainConfig) -> str | None:
  """Why the host-side metrics of steps first_step, first_step + 1, ... stop the run (None: they don't)."""
  max_in_a_row = limit(train_cfg)
  if not max_in_a_row:
    return None
  for offset, metrics in enumerate(fetched):
    in_a_row = int(metrics.get("nonfinite_in_a_row", 0))
    if in_a_row >= max_in_a_row:
      step = first_step + offset
      return (f"non-finite loss/gradients in {in_a_row} step(s) in a row (steps {step - in_a_row + 1}-{step}; "
              f"train.nonfinite_policy={train_cfg.nonfinite_policy!r}, "
              f"max_nonfinite_in_a_row={train_cfg.max_nonfinite_in_a_row}); those updates were "
              "skipped and the last checkpoint is intact. Lower optim.lr, raise optim.warmup_steps or check "
              "the data, then rerun to resume.")
  return None
