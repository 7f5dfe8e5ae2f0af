"""Shared by the targeted AutoAttack members (APGD-T, FAB-T): target classes and the run loop.

Both attacks run once per target class (Croce & Hein 2020 target the k classes with the highest
clean logits after the true one, k = 9 in AutoAttack's standard version) and keep, per example,
the first run that succeeds: later runs cannot change an example that is already fooled, so the
loop may stop as soon as every example is, and the result is the same whether it stops or not.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from unmask_jax.attacks import common
from unmask_jax.attacks.common import Array

# AutoAttack's standard number of target classes (the ten CIFAR-10 classes minus the true one).
DEFAULT_TARGETS = 9


def num_classes_of(logits_fn: Callable, x: Array) -> int:
  """The number of classes, from the logits' shape (traced abstractly: no model call)."""
  return jax.eval_shape(logits_fn, x[:1]).shape[-1]


def top_targets(logits: Array, y: Array, k: int) -> Array:
  """The k classes other than y with the highest logits, best first: int32 [k, N].

  For a correctly classified example these are the reference implementation's targets
  (the 2nd .. (k+1)-th highest logits); masking y keeps y out of them for misclassified ones too.
  """
  masked = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf,
                     logits.astype(jnp.float32))
  return jnp.argsort(-masked, axis=-1)[:, :k].T.astype(jnp.int32)


def check_targets(n_targets: Any, num_classes: int) -> int:
  """min(n_targets, num_classes - 1), after checking n_targets is a count >= 1."""
  common.check_steps(n_targets, 'n_targets')
  if num_classes < 2:
    raise ValueError(f'a targeted attack needs at least 2 classes, the model has {num_classes}')
  return min(int(n_targets), num_classes - 1)


def over_runs(body: Callable[[Any, Any], Any], carry: Any, runs: int, steps_per_run: int,
              done: Callable[[Any], Array]) -> Any:
  """`carry = body(j, carry)` for the runs j = 0 .. runs - 1, each a loop of steps_per_run steps.

  Unrolled (a Python loop) when the whole program, runs * steps_per_run steps, is short enough to
  unroll (`common.current_loop_form`); else one `lax.while_loop` over the runs that stops once
  `done(carry)` (every example fooled), so an attack whose runs become no-ops skips them. The runs
  are marked as repeated (`common._repeated`), so the loops inside them are rolled when the total
  is too long to unroll, as for restarts. `j` is a Python int when unrolled, traced otherwise.
  """
  form = common.current_loop_form(runs * steps_per_run)
  with common._repeated(runs):
    if form == 'unrolled':
      for j in range(runs):
        carry = body(j, carry)
      return carry

    def cond_fn(state):
      j, c = state
      return (j < runs) & ~done(c)

    def body_fn(state):
      j, c = state
      return j + 1, body(j, c)

    return jax.lax.while_loop(cond_fn, body_fn, (jnp.asarray(0, jnp.int32), carry))[1]
