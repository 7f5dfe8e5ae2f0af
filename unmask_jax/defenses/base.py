"""The defense/detector protocol.

A defense is one module that exposes a `Defense` built from pure functions, like optax's
`GradientTransformation(init, update)`:

  state = defense.fit(ctx, data, key)               # host: clean training data only -> arrays
  state = calibrate(defense, state, ctx, x_val, key)  # adds the operating threshold (clean val.)
  d = defense.apply(state, ctx, x, key)             # PURE, jittable: Decision(score, pred)
  s = defense.surrogate(state, ctx, x, key)         # PURE, differentiable in x: Surrogate(...)

`apply` is the exact decision: `score` [N] (higher = more adversarial; flagged iff score >
state['threshold']) and, for defenses that correct, `pred` [N] (the class the defended system
outputs). It computes both at once, so a defense never runs twice for score and prediction.
`surrogate` is a differentiable stand-in of that decision for attacks aimed at the defense
(Athalye, Carlini & Wagner 2018; Tramer et al. 2020): a soft score on the same scale as `score`
(compared with the same threshold) and, for correctors, soft class logits. Randomised defenses
take their randomness from `key` (EOT = average the surrogate over keys); non-differentiable steps
use BPDA (identity on the backward pass). `Defense.decide` runs `apply` jitted over fixed-size
chunks on the host and returns numpy arrays.

`ctx` (a `Context`) is everything a defense may see of the protected system: pure functions of the
victim M, of the part extractor K, the class->parts matrix, auxiliary models (MRR's defenders) and
named intermediate activations (`intermediates_fn`). It is a pytree (its functions are
`jax.tree_util.Partial`s whose leaves are weights), so it is an argument of jitted functions, not a
constant baked into them. `data` is a dict with 'image' (float32 [N,H,W,C] in [0,1]) and 'label'
(int32 [N]). `state` is a flat dict of arrays so it can be saved with `save_state`; entries named
in `Defense.static` are Python constants at trace time (e.g. an iteration count).

Adding a defense = one new file with a `make(**params) -> Defense` function + one registry line
in `unmask_jax/defenses/__init__.py`; `tests/test_defense_protocol.py` then runs it through the
whole protocol, and `attacks.adaptive` can attack it with no further code.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.data import pipeline

Array = Any
State = dict

# The false-positive rate on clean validation images at which `calibrate` sets a defense's
# operating threshold (the "5% FPR" of every table), unless the defense has its own (MRR's SP).
DEFAULT_FPR = 0.05


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['logits_fn', 'features_fn', 'mc_logits_fn', 'head_fn', 'parts_fn',
                                'parts_matrix', 'defenders', 'intermediates_fn'],
                   meta_fields=['num_classes', 'class_names'])
@dataclasses.dataclass(frozen=True)
class Context:
  """What a defense may use. Fields a defense does not need may be None.

  Attributes:
    logits_fn: x [N,H,W,C] in [0,1] -> logits [N, num_classes] (eval mode, deterministic).
    features_fn: x -> penultimate (last hidden) activations [N, D].
    mc_logits_fn: (x, key) -> logits with dropout active (one stochastic pass).
    head_fn: features [N, D] -> logits (M's last layer(s); dropout off).
    parts_fn: x -> multi-hot part sets [N, NUM_PARTS] from the part extractor K (exact rule).
      A differentiable surrogate of K is the `parts_fn.soft` of `models.part_extraction`.
    parts_matrix: float [num_classes, NUM_PARTS]: parts expected for each class of M.
    defenders: feature functions x -> [N, D] of MRR defender modules (`models.defender`), for
      the `mrr` detector; empty unless the evaluation was given trained defenders.
    intermediates_fn: x -> {layer name: activations [N, ...]} of M (named intermediates, e.g. for
      LID); None if the model does not expose them.
    num_classes: number of classes of M (static).
    class_names: names of M's classes (static).
  """
  logits_fn: Optional[Callable] = None
  features_fn: Optional[Callable] = None
  mc_logits_fn: Optional[Callable] = None
  head_fn: Optional[Callable] = None
  parts_fn: Optional[Callable] = None
  parts_matrix: Optional[Array] = None
  defenders: tuple = ()
  intermediates_fn: Optional[Callable] = None
  num_classes: int = 0
  class_names: tuple = ()

  def __post_init__(self):
    # Plain Python functions are not pytrees: wrap them so the context can cross `jax.jit`.
    for f in ('logits_fn', 'features_fn', 'mc_logits_fn', 'head_fn', 'parts_fn', 'intermediates_fn'):
      fn = getattr(self, f)
      if fn is not None and not isinstance(fn, jax.tree_util.Partial):
        object.__setattr__(self, f, jax.tree_util.Partial(fn))
    object.__setattr__(self, 'defenders', tuple(
        d if isinstance(d, jax.tree_util.Partial) else jax.tree_util.Partial(d)
        for d in (self.defenders or ())))
    object.__setattr__(self, 'class_names', tuple(self.class_names or ()))
    object.__setattr__(self, 'num_classes', int(self.num_classes or 0))

  def _replace(self, **changes) -> 'Context':
    return dataclasses.replace(self, **changes)


class Decision(NamedTuple):
  """The exact output of a defense on a batch: score [N] (higher = adversarial), pred [N] or None."""
  score: Array
  pred: Optional[Array] = None


class Surrogate(NamedTuple):
  """A differentiable stand-in of `Decision`: score [N] on the same scale (same threshold) and,
  for correctors, logits [N, C] whose argmax stands in for `Decision.pred`."""
  score: Array
  logits: Optional[Array] = None


class NotFittedError(RuntimeError):
  pass


class Defense(NamedTuple):
  """A detector and/or corrector made of pure functions (see the module docstring).

  Attributes:
    name: printable name.
    fit: (ctx, data, key) -> state, on clean training data (host code).
    apply: (state, ctx, x, key) -> Decision; pure and jittable.
    surrogate: (state, ctx, x, key) -> Surrogate; pure and differentiable in x.
    corrects: whether `apply` returns a corrected class (`Decision.pred`).
    static: state entries that are Python constants when `apply`/`surrogate` are traced.
    chunk: images per jitted call of `decide`.
    host_check: optional (state, x) -> None run by `decide` on the host before applying (e.g. the
      LR combiner's check that it never scores an image it was fitted on).
    fit_adversarial: optional (state, ctx, x_clean, x_adv, key) -> state, for a defense that also
      learns from adversarial examples of a HELD-OUT split (the LR combiner); the evaluation then
      fits one state per attack.
  """
  name: str
  fit: Callable[[Context, dict, Array], State]
  apply: Callable[[State, Context, Array, Array], Decision]
  surrogate: Callable[[State, Context, Array, Array], Surrogate]
  corrects: bool = False
  static: tuple = ()
  chunk: int = 128
  host_check: Optional[Callable[[State, Any], None]] = None
  fit_adversarial: Optional[Callable] = None

  def decide(self, state: State, ctx: Context, x, key) -> dict[str, np.ndarray]:
    """`apply` on the host: {'score': [N], 'pred': [N] if it corrects, 'flagged': [N] if the
    state has a threshold}, numpy. Validates the images, jits once per (defense, shapes)."""
    state = require_fitted(state, self.name)
    check_images(x, self.name)
    if self.host_check is not None:
      self.host_check(state, x)
    arrays, static = split_state(state, self.static)
    key = jax.random.key(0) if key is None else key
    out = map_chunks(
        lambda xb, i: _decide_chunk(self.apply, static, arrays, ctx, xb, jax.random.fold_in(key, i)),
        x, self.chunk)
    if 'threshold' in state:
      out['flagged'] = out['score'] > float(state['threshold'])
    return out

  def score(self, state: State, ctx: Context, x, key) -> np.ndarray:
    """[N] detection scores (higher = more adversarial); see `decide`."""
    return self.decide(state, ctx, x, key)['score']

  def predict(self, state: State, ctx: Context, x, key) -> np.ndarray:
    """[N] corrected classes; an error for a defense that only detects."""
    if not self.corrects:
      raise ValueError(f'{self.name} detects but does not correct: it has no predict.')
    return self.decide(state, ctx, x, key)['pred']


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decide_chunk(apply, static, arrays, ctx, x, key):
  d = apply({**arrays, **dict(static)}, ctx, x, key)
  out = {'score': jnp.asarray(d.score, jnp.float32)}
  if d.pred is not None:
    out['pred'] = jnp.asarray(d.pred, jnp.int32)
  return out


def split_state(state: State, static_names=()) -> tuple[dict, tuple]:
  """(numeric arrays as jnp, hashable ((name, Python value), ...) of the static entries).

  Entries that are neither numeric nor static stay on the host: strings (member names) and 64-bit
  unsigned image hashes (the LR combiner's leakage fingerprints), which JAX would truncate.
  """
  arrays, static = {}, []
  for k, v in state.items():
    if k in static_names:
      v = np.asarray(v)
      static.append((k, v.item() if v.ndim == 0 else tuple(v.tolist())))
      continue
    dtype = np.asarray(v).dtype if not isinstance(v, jax.Array) else v.dtype
    if (np.issubdtype(dtype, np.number) or dtype == np.bool_) and dtype != np.uint64:
      arrays[k] = jnp.asarray(v)
  return arrays, tuple(sorted(static))


def bind(defense: Defense, state: State, ctx: Context):
  """(apply_fn, surrogate_fn): `(x, key) -> Decision / Surrogate` as `Partial`s over the state and
  context (pytree leaves), so they can be passed into a jitted attack without retracing."""
  arrays, static = split_state(require_fitted(state, defense.name), defense.static)
  apply = jax.tree_util.Partial(_with_state(defense.apply, static), arrays, ctx)
  surrogate = jax.tree_util.Partial(_with_state(defense.surrogate, static), arrays, ctx)
  return apply, surrogate


@functools.lru_cache(maxsize=None)
def _with_state(fn, static):
  """`(arrays, ctx, x, key) -> fn(state, ctx, x, key)`: the function and its static entries are
  the `Partial`'s static part, one object per (fn, static) so that jit caches hit across binds."""
  def bound(arrays, ctx, x, key):
    return fn({**arrays, **dict(static)}, ctx, x, key)
  return bound


def calibrate(defense: Defense, state: State, ctx: Context, x_val, key, *,
              fpr: float = DEFAULT_FPR) -> State:
  """Adds the operating point to a fitted state, from CLEAN held-out validation images only.

  threshold: the defense's own if it has one (e.g. MRR's security parameter), else the
    `metrics.threshold_at_fpr(val_scores, fpr)`: at most a fraction `fpr` of the clean validation
    scores exceed it (flagged iff score > threshold).
  score_scale: the standard deviation of the clean validation scores (> 0), the unit in which
    adaptive attacks measure "how far below the threshold" (so one objective serves scores in
    nats, Jaccard distances or ratios).
  """
  from unmask_jax.eval import metrics
  s = defense.decide(state, ctx, x_val, key)['score']
  out = dict(state)
  if 'threshold' not in out:
    out['threshold'] = np.asarray(metrics.threshold_at_fpr(s, fpr), np.float32)
    out['threshold_fpr'] = np.asarray(fpr, np.float32)
  out['score_scale'] = np.asarray(max(float(np.std(s)), 1e-6), np.float32)
  return out


def require_fitted(state: State | None, name: str) -> State:
  """Raises a clear error when a defense is used before `fit`."""
  if state is None or not isinstance(state, dict) or not state:
    raise NotFittedError(f'Defense {name!r} was scored before it was fitted: call fit(ctx, data, key) '
                         'on clean training data first.')
  return state


def require(ctx: Context, name: str, *fields: str) -> None:
  """Raises a clear error if the context lacks a function/array a defense needs."""
  missing = [f for f in fields if getattr(ctx, f) is None or (f == 'defenders' and not ctx.defenders)]
  if missing:
    raise ValueError(f'Defense {name!r} needs ctx.{", ctx.".join(missing)}, but the context does '
                     'not provide it.')


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
  """Writes a flat dict of arrays atomically, with a sha256 per array (`checkpoint.save_npz_verified`)."""
  from unmask_jax.train import checkpoint
  checkpoint.save_npz_verified(path, state)


def load_state(path: str) -> State:
  """Reads a state written by `save_state`; any changed byte is an error naming the file."""
  from unmask_jax.train import checkpoint
  return checkpoint.load_npz_verified(path)
