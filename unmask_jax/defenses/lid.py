"""Local intrinsic dimensionality (LID) detector (Ma et al., "Characterizing Adversarial Subspaces
Using Local Intrinsic Dimensionality", ICLR 2018).

For each named layer l of M (`ctx.intermediates_fn`), the activation z_l(x) (flattened) is compared
with the activations of a fixed reference set of clean training images, and its LID is the
maximum-likelihood estimate of Amsaleg et al. (2015) used by Ma et al. (their eq. 4):

  LID_l(x) = -( (1/k) sum_{i=1..k} log(r_i(x) / r_k(x)) )^{-1}

where r_1(x) <= ... <= r_k(x) are the Euclidean distances from z_l(x) to its k nearest reference
activations. Adversarial regions have a higher local dimensionality than the clean data manifold,
so adversarial examples have higher LIDs (Ma et al., Fig. 1 and Table 1).

Reference set. Ma et al. estimate LID within each minibatch of 100 images (the batch is its own
reference). Here the reference is one fixed random sample of `batch` clean training images drawn at
fit time; their activations are stored in the state, so a query's LID does not depend on which
other images share its batch, and `apply` is a pure function of x alone.

Score. Ma et al. combine the per-layer LIDs with a logistic regression trained on clean, noisy and
adversarial examples. The protocol's `fit` sees clean data only, so the default score needs no
adversarial data:

  score(x) = sum_l (LID_l(x) - mu_l) / sigma_l

with (mu_l, sigma_l) the mean and standard deviation of LID_l over clean fit images that are NOT
in the reference set (up to `stats_size` of them): every layer votes with equal weight, in units of
its clean spread, that x lies off the clean manifold (a logistic regression with equal positive
weights on standardised LIDs). With `make(lr=True)`, `fit_adversarial(state, ctx, x_clean,
x_adv, key)` then fits the paper's logistic regression on a HELD-OUT split (negatives: clean
images and Gaussian-noisy copies with the attack's per-image L2 norm; positives: the adversarial
images; features: the same standardised per-layer LIDs), after which
score(x) = w . ((LID(x) - mu) / sigma) + b (log-odds).

Surrogate. k-NN selection via `lax.top_k` is differentiable with respect to the selected distances
(the neighbour set is piecewise constant in x), so the exact score is differentiable almost
everywhere and is its own surrogate: the gradient is the exact one wherever the neighbour set does
not change (an adaptive attacker following it is the white-box attack on LID of Athalye et al.).
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.defenses import base

# Entries of the state that are Python constants at trace time.
STATIC = ('k', 'layers')
# Squared distances are clamped at this value before the log (a query on a reference point).
MIN_SQ_DISTANCE = 1e-12
# The log-ratio sum is clamped at -this, so k equidistant neighbours give a large, finite LID.
MIN_LOG_RATIO_SUM = 1e-6
_LARGE_REFERENCE = 10 ** 8  # floats (400 MB): warn above this


def lid_from_sq_distances(d2) -> jax.Array:
  """LID MLE from the k smallest squared distances [N, k] (any order along the last axis).

    LID = -( (1/k) sum_i log(r_i / r_k) )^{-1} = -2k / sum_i (log r_i^2 - log r_k^2),

  with r_k the largest of the k distances. Squared distances are clamped at `MIN_SQ_DISTANCE`
  (a duplicate of a reference point has LID -> 0, as in the limit) and the sum at
  -`MIN_LOG_RATIO_SUM` (k equidistant neighbours, the estimator's 1/0, give a large finite LID).
  """
  d2 = jnp.asarray(d2, jnp.float32)
  k = d2.shape[-1]
  log_d2 = jnp.log(jnp.maximum(d2, MIN_SQ_DISTANCE))
  s = jnp.sum(log_d2 - jnp.max(log_d2, axis=-1, keepdims=True), axis=-1)  # <= 0
  return 2.0 * k / jnp.maximum(-s, MIN_LOG_RATIO_SUM)


def knn_sq_distances(z, reference, k: int, reference_sq=None) -> jax.Array:
  """Squared Euclidean distances [N, k] from each row of z [N, D] to its k nearest rows of
  `reference` [R, D], ascending. Differentiable in z (through the selected distances).

  Uses |z|^2 + |r|^2 - 2 z.r (one matmul; centre z and the reference on the reference mean first
  to keep float32 cancellation small, as `lid` does). `reference_sq` = |r|^2 if precomputed.
  """
  z = jnp.asarray(z, jnp.float32)
  reference = jnp.asarray(reference, jnp.float32)
  if reference_sq is None:
    reference_sq = jnp.sum(jnp.square(reference), axis=-1)
  d2 = (jnp.sum(jnp.square(z), axis=-1, keepdims=True) + reference_sq[None, :]
        - 2.0 * jnp.matmul(z, reference.T, precision=jax.lax.Precision.HIGHEST))
  d2 = jnp.maximum(d2, 0.0)
  neg, _ = jax.lax.top_k(-d2, k)  # the k largest -d2 = the k smallest d2, ascending in d2
  return -neg


def lid(z, reference, k: int) -> jax.Array:
  """LID MLE [N] of each row of z [N, D] among `reference` [R, D] (k <= R nearest neighbours).

  Pure jnp; the reference should not contain the queries (a query in it is its own nearest
  neighbour at distance 0; Ma et al.'s code drops that first neighbour instead).
  """
  z = jnp.asarray(z, jnp.float32)
  reference = jnp.asarray(reference, jnp.float32)
  center = jnp.mean(reference, axis=0)
  return lid_from_sq_distances(knn_sq_distances(z - center, reference - center, k))


def _static_of(state) -> tuple[int, tuple[str, ...]]:
  layers = state['layers']
  layers = (layers,) if isinstance(layers, str) else tuple(str(v) for v in np.atleast_1d(layers))
  return int(np.asarray(state['k'])), layers


def layer_lids(state: base.State, ctx: base.Context, x) -> jax.Array:
  """Pure: per-layer LIDs [N, L] of images x against the state's reference activations."""
  k, layers = _static_of(state)
  acts = ctx.intermediates_fn(x)
  out = []
  for name in layers:
    if name not in acts:
      raise ValueError(f'lid: the state was fitted on layer {name!r}, which ctx.intermediates_fn '
                       f'does not return (it has {sorted(acts)}): fitted with another model?')
    z = acts[name]
    z = z.reshape(z.shape[0], -1).astype(jnp.float32)
    ref = state[f'reference.{name}']
    base.check_feature_dim(ref.shape[1], z.shape[1], f'lid[{name}]')
    out.append(lid_from_sq_distances(knn_sq_distances(
        z - state[f'center.{name}'], ref, k, state[f'reference_sq.{name}'])))
  return jnp.stack(out, axis=1)


def standardize(state: base.State, lids) -> jax.Array:
  """(LID_l - mu_l) / sigma_l with the clean statistics of the fit: [N, L]."""
  return (lids - state['lid_mean']) / state['lid_std']


def score_from_lids(state: base.State, lids) -> jax.Array:
  """The detection score [N] from per-layer LIDs [N, L] (see the module docstring)."""
  z = standardize(state, lids)
  if 'lr_coef' in state:  # after fit_adversarial: Ma et al.'s logistic regression (log-odds)
    return z @ state['lr_coef'].astype(jnp.float32) + state['lr_intercept'].astype(jnp.float32)
  return jnp.sum(z, axis=1)


@functools.partial(jax.jit, static_argnums=(0,))
def _lids_chunk(static, arrays, ctx, x):
  return {'lid': layer_lids({**arrays, **dict(static)}, ctx, x)}


def lids_of(state: base.State, ctx: base.Context, x, chunk: int = 128) -> np.ndarray:
  """Per-layer LIDs [N, L] (float32 numpy) of images x, jitted over fixed-size chunks."""
  arrays, static = base.split_state(state, STATIC)
  return base.map_chunks(lambda xb, _: _lids_chunk(static, arrays, ctx, xb), x, chunk)['lid']


@functools.partial(jax.jit, static_argnums=(0,))
def _acts_chunk(layers, ifn, x):
  acts = ifn(x)
  return {name: acts[name].reshape(x.shape[0], -1).astype(jnp.float32) for name in layers}


def layer_names(ctx: base.Context, x) -> list[str]:
  """The names of M's intermediates (`ctx.intermediates_fn`), from shapes only (no compute)."""
  shapes = jax.eval_shape(ctx.intermediates_fn, jnp.asarray(x[:1], jnp.float32))
  if not isinstance(shapes, dict) or not shapes:
    raise ValueError('lid: ctx.intermediates_fn must return a non-empty dict {layer name: '
                     f'activations}}, got {type(shapes).__name__}')
  return list(shapes)


def make(*, k: int = 20, layers: Sequence[str] | None = None, batch: int = 100,
         stats_size: int = 1000, chunk: int = 128, lr: bool = False, C: float = 1.0,
         max_iter: int = 1000, check_disjoint: bool = True) -> base.Defense:
  """LID detector (Ma et al., ICLR 2018); see the module docstring for the estimator and score.

    LID_l(x) = -( (1/k) sum_{i=1..k} log(r_i(x) / r_k(x)) )^{-1},
    score(x) = sum_l (LID_l(x) - mu_l) / sigma_l      (clean-only fit; higher = adversarial)

  Args:
    k: nearest neighbours per estimate (Ma et al.: 20 for MNIST/CIFAR-10 with minibatches of
      100); 2 <= k <= batch.
    layers: names of `ctx.intermediates_fn` outputs to use; None = all of them (Ma et al. use
      every layer, logits included).
    batch: size of the fixed clean reference set (Ma et al.'s minibatch size, 100). The state
      stores batch x (sum of the layers' sizes) float32 activations: pick `layers` for large
      models and images.
    stats_size: at most this many further clean fit images (not in the reference) estimate each
      layer's clean LID mean and std.
    chunk: images per jitted call.
    lr: False (default) = the clean-only score above, and the Defense has no `fit_adversarial`;
      True = Ma et al.'s logistic regression: the Defense gets `fit_adversarial`, so the
      evaluation fits one state per attack on held-out adversarial examples (as for the LR
      combiner) and the score is the LR's log-odds.
    C, max_iter: that logistic regression's inverse L2 strength and solver iterations.
    check_disjoint: after `fit_adversarial`, `decide` refuses images that it was fitted on.
  """
  if not isinstance(k, int) or k < 2:
    raise ValueError(f'lid: k must be an integer >= 2, got {k!r}')
  if not isinstance(batch, int) or batch < k:
    raise ValueError(f'lid: the reference batch must hold at least k = {k} images, got {batch!r}')
  if stats_size < 2 or chunk < 1 or not C > 0 or max_iter < 1:
    raise ValueError(f'lid: need stats_size >= 2, chunk >= 1, C > 0, max_iter >= 1; got '
                     f'{stats_size}, {chunk}, {C}, {max_iter}')
  if isinstance(layers, str):
    layers = (layers,)
  layers = None if layers is None else tuple(layers)
  if layers is not None and (not layers or len(set(layers)) != len(layers)):
    raise ValueError(f'lid: layers must be distinct names, got {layers}')
  name = 'lid(lr)' if lr else 'lid'

  def fit(ctx, data, key):
    base.require(ctx, name, 'intermediates_fn')
    x = data['image']
    base.check_images(x, name)
    x = np.asarray(x, np.float32)
    n = len(x)
    if n < batch + 2:
      raise ValueError(f'lid: need at least batch + 2 = {batch + 2} clean fit images (a reference '
                       f'set and >= 2 others for the clean LID statistics), got {n}')
    available = layer_names(ctx, x)
    chosen = available if layers is None else list(layers)
    unknown = [l for l in chosen if l not in available]
    if unknown:
      raise ValueError(f'lid: unknown layer(s) {unknown}; ctx.intermediates_fn returns '
                       f'{available}')
    perm = np.asarray(jax.random.permutation(key, n))
    ref_idx = np.sort(perm[:batch])
    stat_idx = np.sort(perm[batch:batch + stats_size])
    acts = base.map_chunks(lambda xb, _: _acts_chunk(tuple(chosen), ctx.intermediates_fn, xb),
                           x[ref_idx], chunk)
    total = batch * sum(acts[l].shape[1] for l in chosen)
    if total > _LARGE_REFERENCE:
      warnings.warn(f'lid: the reference activations hold {total:,} floats; pass layers=... to '
                    'keep fewer layers.', stacklevel=2)
    state = {'k': np.asarray(k, np.int32), 'layers': np.asarray(chosen),
             'reference_index': ref_idx.astype(np.int32)}
    for l in chosen:
      z = acts[l].astype(np.float64)
      center = z.mean(axis=0)
      ref = (z - center).astype(np.float32)
      state[f'center.{l}'] = center.astype(np.float32)
      state[f'reference.{l}'] = ref
      state[f'reference_sq.{l}'] = np.sum(np.square(ref.astype(np.float64)),
                                          axis=1).astype(np.float32)
    clean = lids_of(state, ctx, x[stat_idx], chunk).astype(np.float64)
    if not np.all(np.isfinite(clean)):
      raise ValueError('lid: non-finite clean LID estimates; check the activations')
    state['lid_mean'] = clean.mean(axis=0).astype(np.float32)
    state['lid_std'] = np.maximum(clean.std(axis=0), 1e-6).astype(np.float32)
    state['stats_count'] = np.asarray(len(stat_idx), np.int32)
    return state

  def apply(state, ctx, x, key):
    del key  # Deterministic.
    base.require(ctx, name, 'intermediates_fn')
    return base.Decision(score_from_lids(state, layer_lids(state, ctx, x)))

  def surrogate(state, ctx, x, key):
    # Exact: top-k is differentiable w.r.t. the selected distances (module docstring).
    return base.Surrogate(apply(state, ctx, x, key).score)

  def host_check(state, x):
    if check_disjoint and 'fit_fingerprints' in state:
      from unmask_jax.defenses import combiner
      overlap = np.isin(combiner.image_fingerprints(x), state['fit_fingerprints'])
      if overlap.any():
        raise combiner.LeakageError(
            f'lid: {int(overlap.sum())} of {len(overlap)} images were used by fit_adversarial to '
            'fit the logistic regression; score a held-out split of different images.')

  def fit_adversarial(state, ctx, x_clean, x_adv, key):
    """Ma et al.'s logistic regression on standardised per-layer LIDs of a HELD-OUT split.

    Negatives: x_clean and clip(x_clean + s * N(0, I), 0, 1) with s the attack's per-image RMS
    perturbation (`combiner.matched_noise_std`; x_adv[i] must be the attack of x_clean[i]);
    positives: x_adv. Returns the state with 'lr_coef' [L] and 'lr_intercept' (the score becomes
    the log-odds), the fingerprints of the images used, and without any earlier threshold (the
    score changed: calibrate again).
    """
    from sklearn.linear_model import LogisticRegression

    from unmask_jax.defenses import combiner
    base.require_fitted(state, name)
    for arr, what in ((x_clean, 'x_clean'), (x_adv, 'x_adv')):
      base.check_images(arr, f'{name} {what}')
    x_clean = np.asarray(x_clean, np.float32)
    x_adv = np.asarray(x_adv, np.float32)
    if len(x_clean) != len(x_adv):
      raise ValueError(f'lid: fit_adversarial needs paired images, got {len(x_clean)} clean and '
                       f'{len(x_adv)} adversarial')
    std = combiner.matched_noise_std(x_clean, x_adv)[:, None, None, None]
    noise = np.asarray(jax.random.normal(key, x_clean.shape), np.float32)
    x_noisy = np.clip(x_clean + std * noise, 0.0, 1.0)
    pool = np.concatenate([x_clean, x_noisy, x_adv])
    y = np.concatenate([np.zeros(2 * len(x_clean)), np.ones(len(x_adv))]).astype(np.int32)
    clean_state = {s: v for s, v in state.items() if not s.startswith(('lr_', 'threshold'))}
    feats = np.asarray(standardize(clean_state, lids_of(clean_state, ctx, pool, chunk)), np.float64)
    lr = LogisticRegression(C=float(C), max_iter=int(max_iter)).fit(feats, y)
    out = {s: v for s, v in clean_state.items()
           if s not in ('score_scale', 'fit_fingerprints', 'fit_counts')}
    out.update(lr_coef=lr.coef_[0].astype(np.float32),
               lr_intercept=np.asarray(lr.intercept_[0], np.float32),
               fit_fingerprints=np.unique(np.concatenate([combiner.image_fingerprints(x_clean),
                                                          combiner.image_fingerprints(x_adv)])),
               fit_counts=np.asarray([len(x_clean), len(x_noisy), len(x_adv)], np.int32))
    return out

  return base.Defense(name, fit, apply, surrogate, static=STATIC, chunk=chunk,
                      host_check=host_check, fit_adversarial=fit_adversarial if lr else None)


__all__ = ['STATIC', 'knn_sq_distances', 'layer_lids', 'layer_names', 'lid',
           'lid_from_sq_distances', 'lids_of', 'make', 'score_from_lids', 'standardize']
