"""Shared by the targeted AutoAttack members (APGD-T, FAB-T): the target classes.

Both attacks run once per target class (Croce & Hein 2020 target the k classes with the highest
clean logits after the true one, k = 9 in AutoAttack's standard version) and keep, per example,
the first run that succeeds: later runs cannot change an example that is already fooled, so the
loop over the runs (`common.over_runs`) may stop as soon as every example is, and the result is
the same whether it stops or not.
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


def clean_targets(logits_fn: Callable, x: Array, y: Array, *, k: int) -> Array:
  """`top_targets` of the clean logits, [k, N] (a module-level function, so that host-driven
  attacks can run it as a host program: `common.call_on_host`)."""
  return top_targets(logits_fn(x), y, k)


def check_targets(n_targets: Any, num_classes: int) -> int:
  """min(n_targets, num_classes - 1), after checking n_targets is a count >= 1."""
  common.check_steps(n_targets, 'n_targets')
  if num_classes < 2:
    raise ValueError(f'a targeted attack needs at least 2 classes, the model has {num_classes}')
  return min(int(n_targets), num_classes - 1)
