"""The defense/detector protocol.

A defense is one module that exposes a `Defense` built from pure functions, like optax's
`GradientTransformation(init, update)`:

  state = defense.fit(ctx, data, key)          # on clean training/validation data only
  scores = defense.score(state, ctx, x, key)   # [N] float, higher = more adversarial
  classes = defense.predict(state, ctx, x, key)  # [N] int, optional corrected class

`ctx` (a `Context`) is everything a defense may see of the protected system: pure functions of the
victim M (`logits_fn`, `features_fn`, `mc_logits_fn`), of the part extractor K (`parts_fn`), the
class->parts matrix, and of auxiliary models trained for a defense (MRR's `defenders`). `data`
is a dict with 'image' (float32 [N,H,W,C] in [0,1]) and 'label'
(int32 [N]). `state` is a pytree of arrays (a dict) so it can be saved with `save_state` and
reloaded for evaluation to resume. Hyper-parameters are keyword arguments of a factory function
`make(**params) -> Defense`, registered in `unmask_jax.defenses.DEFENSES`.

Adding a defense = one new file with a `make` function + one registry line.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from unmask_jax.data import pipeline

Array = Any
State = dict


class Context(NamedTuple):
  """What a defense may use. Fields a defense does not need may be None.

  Attributes:
    logits_fn: x [N,H,W,C] in [0,1] -> logits [N, num_classes] (eval mode, deterministic).
    features_fn: x -> penultimate (last hidden) activations [N, D].
    mc_logits_fn: (x, key) -> logits with dropout active (one stochastic pass).
    head_fn: features [N, D] -> logits (M's last layer(s); dropout off).
    parts_fn: x -> multi-hot part sets [N, NUM_PARTS] from the part extractor K.
    parts_matrix: float [num_classes, NUM_PARTS]: parts expected for each class of M.
    num_classes: number of classes of M.
    class_names: names of M's classes.
    defenders: feature functions x -> [N, D] of MRR defender modules (`models.defender`), for
      the `mrr` detector; empty unless the evaluation was given trained defenders.
  """
  logits_fn: Optional[Callable] = None
  features_fn: Optional[Callable] = None
  mc_logits_fn: Optional[Callable] = None
  head_fn: Optional[Callable] = None
  parts_fn: Optional[Callable] = None
  parts_matrix: Optional[Array] = None
  num_classes: int = 0
  class_names: tuple = ()
  defenders: tuple = ()


class Defense(NamedTuple):
  """A detector and/or corrector: fit -> state; score (higher = adversarial); optional predict."""
  name: str
  fit: Callable[[Context, dict, Array], State]
  score: Callable[[State, Context, Array, Array], Array]
  predict: Optional[Callable[[State, Context, Array, Array], Array]] = None


class NotFittedError(RuntimeError):
  pass


def require_fitted(state: State | None, name: str) -> State:
  """Raises a clear error when a defense is scored before `fit`."""
  if state is None or not isinstance(state, dict) or not state:
    raise NotFittedError(f'Defense {name!r} was scored before it was fitted: call fit(ctx, data, key) '
                         'on clean training data first.')
  return state


def check_feature_dim(expected: int, got: int, name: str) -> None:
  if expected != got:
    raise ValueError(f'Defense {name!r} was fitted on {expected}-dimensional features but is scored '
                     f'on {got}-dimensional ones: was it fitted with another model?')


def num_classes_of(ctx: Context, labels: np.ndarray) -> int:
  """M's number of classes, or more if the labels go beyond it."""
  return max(int(ctx.num_classes or 0), int(np.max(labels)) + 1)


def check_all_classes_present(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
  """Per-class counts of `labels`; an error if a class has none.

  A class with no training examples has no density (KDE), mean (KL) or centre and threshold
  (MRR); scoring an input predicted as it would be undefined, so refuse instead of returning inf.
  """
  counts = np.bincount(labels, minlength=num_classes)
  if np.any(counts == 0):
    raise ValueError(f'{name}: no training examples for class(es) {np.flatnonzero(counts == 0)}; '
                     'fit on data that covers every class of M.')
  return counts


def as_partial(fn: Callable, name: str) -> jax.tree_util.Partial:
  """Wraps a context function as a `Partial` so it can be an argument of a jitted function.

  A `Partial` is a pytree: its bound arrays (e.g. model weights) are traced leaves and the Python
  function is static, so passing it into `jax.jit` neither retraces per call nor bakes the weights
  in as constants.
  """
  if fn is None:
    raise ValueError(f'The defense needs ctx.{name}, but the context does not provide it.')
  return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


def map_chunks(fn: Callable, x, chunk: int) -> dict[str, np.ndarray]:
  """Applies `fn(x_chunk, chunk_index) -> dict of [chunk, ...] arrays` over fixed-size chunks.

  The last chunk is padded (by `pipeline.batches`, repeating row 0) so a jitted `fn` sees one shape
  only; padded rows are dropped from the concatenated numpy outputs.
  """
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1, got {chunk}')
  x = np.asarray(x)
  outs: list[dict] = []
  for i, batch in enumerate(pipeline.batches({'x': x}, chunk, remainder='pad')):
    out = fn(batch['x'], i)
    outs.append({k: np.asarray(v)[batch['valid']] for k, v in out.items()})
  if not outs:
    raise ValueError('Cannot score an empty batch of images.')
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def check_images(x, name: str) -> None:
  """Raises ValueError unless `x` is a rank-4 [N, H, W, C] float batch in [0, 1]."""
  try:
    pipeline.validate_images(x)
  except ValueError as e:
    raise ValueError(f'Defense {name!r}: {e}') from None


def save_state(path: str, state: State) -> None:
  """Writes a flat dict of arrays atomically (write to a temp file, then rename)."""
  tmp = f'{path}.tmp.npz'
  np.savez(tmp, **{k: np.asarray(v) for k, v in state.items()})
  os.replace(tmp, path)


def load_state(path: str) -> State:
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}
