"""Gaussian-KDE closeness detector on M's last hidden activations (Feinman et al. 2017; Tuna et al.
2021 §3.5.1, eq. 9):

  score(x) = -log p(z(x) | c_pred(x)),
  log p(z|c) = logsumexp_{i: y_i = c}(-||z - z_i||^2 / (2 h^2)) - log n_c - (d/2) log(2 pi h^2).

Computed on device by a jitted scan over fixed-size chunks of training points with an online
logsumexp, for fixed-size chunks of queries, so memory is O(query_chunk * train_chunk).
(scikit-learn's KernelDensity uses tree approximations that are off by tens of nats in 128-d.)
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.defenses import base
from unmask_jax.defenses.closeness import check_data, features_and_predictions


@functools.partial(jax.jit, static_argnames=('train_chunk',))
def _class_logsumexp(zq, cq, train_z, train_sq, train_y, inv_two_h2, train_chunk):
  """logsumexp_{i: y_i = c_q}(-||z_q - z_i||^2 * inv_two_h2[h]) for each bandwidth: [H, q].

  A scan over train_chunk-sized blocks keeps a running (max, sum) per query, so the [H, q, t]
  block of kernel values is the only large intermediate. Squared distances use
  |z|^2 + |z_i|^2 - 2 z.z_i (one matmul per block, the fast path on every backend); the features
  are centred beforehand, which keeps the float32 cancellation error far below the 1e-3 tolerance.
  """
  d = zq.shape[-1]
  q_sq = jnp.sum(jnp.square(zq), axis=-1)
  blocks = (train_z.reshape(-1, train_chunk, d), train_sq.reshape(-1, train_chunk),
            train_y.reshape(-1, train_chunk))

  def body(carry, block):
    m, s = carry
    z_t, sq_t, y_t = block
    d2 = jnp.maximum(q_sq[:, None] + sq_t[None, :] - 2.0 * zq @ z_t.T, 0.0)  # [q, t]
    logits = -inv_two_h2[:, None, None] * d2[None]  # [H, q, t]
    # Only training points of the query's class count; padding rows have label -1.
    logits = jnp.where((y_t[None, :] == cq[:, None])[None], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    # Before any point of the class is seen m_new = -inf; shift by 0 then to avoid inf - inf.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1)
    return (m_new, s), None

  h = inv_two_h2.shape[0]
  init = (jnp.full((h, zq.shape[0]), -jnp.inf), jnp.zeros((h, zq.shape[0])))
  (m, s), _ = jax.lax.scan(body, init, blocks)
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  return jnp.log(s) + shift


def kde_log_density(z, classes, train_z, train_y, bandwidths, *, chunk: int = 256,
                    train_chunk: int = 2048) -> np.ndarray:
  """Exact per-class Gaussian KDE log densities (Feinman et al. 2017).

    log p(z|c) = logsumexp_{i: y_i = c}(-||z - z_i||^2 / (2 h^2)) - log n_c - (d/2) log(2 pi h^2)

  i.e. the log of the mean over class c's n_c training points of an isotropic Gaussian N(z_i, h^2 I)
  density at z.

  Args:
    z: [N, D] query activations.
    classes: [N] class whose KDE scores each query (the predicted class at test time).
    train_z: [M, D] training activations; train_y: [M] their true labels.
    bandwidths: scalar h or [H] array of bandwidths (evaluated in one pass).
    chunk: queries per jitted call; train_chunk: training points per scan step.

  Returns:
    [N] (scalar h) or [H, N] float32 log densities; -inf where class c has no training points.
  """
  z = np.asarray(z, np.float32)
  train_z = np.asarray(train_z, np.float32)
  train_y = np.asarray(train_y, np.int32)
  scalar = np.ndim(bandwidths) == 0
  h = np.atleast_1d(np.asarray(bandwidths, np.float64))
  if np.any(~np.isfinite(h)) or np.any(h <= 0):
    raise ValueError(f'KDE bandwidths must be finite and > 0, got {h}')
  d = z.shape[1]
  classes = np.asarray(classes, np.int32)
  # Centre on the training mean: distances are unchanged, float32 cancellation error shrinks.
  center = train_z.mean(axis=0)
  train_c, zc = train_z - center, z - center
  inv = jnp.asarray(1.0 / (2.0 * h * h), jnp.float32)
  lse = np.full((len(h), len(z)), -np.inf)  # stays -inf for a class without training points
  log_n = np.zeros(len(z))
  # One class at a time: each query meets only its class's training points, not all of them
  # (C times less work than masking a full distance matrix).
  for c in np.unique(classes):
    q = np.flatnonzero(classes == c)
    t = train_c[train_y == c]
    if not len(t):
      continue
    log_n[q] = np.log(len(t))
    # Pad to whole blocks (rows labelled -1 are masked out); block sizes round up to 64 training
    # points and a power of two of queries, so few distinct shapes are ever compiled.
    t_chunk = min(train_chunk, -(-len(t) // 64) * 64)
    pad = -len(t) % t_chunk
    t_z = jnp.asarray(np.concatenate([t, np.zeros((pad, d), np.float32)]))
    t_y = jnp.asarray(np.concatenate([np.zeros(len(t), np.int32), np.full(pad, -1, np.int32)]))
    t_sq = jnp.sum(jnp.square(t_z), axis=-1)
    q_chunk = min(chunk, max(16, 1 << int(np.ceil(np.log2(len(q))))))
    for start in range(0, len(q), q_chunk):
      idx = q[start:start + q_chunk]
      zb = zc[idx]
      k = len(zb)
      if k < q_chunk:  # Pad the last block so the jitted function keeps one shape.
        zb = np.concatenate([zb, np.repeat(zb[:1], q_chunk - k, 0)])
      out = _class_logsumexp(zb, jnp.zeros(q_chunk, jnp.int32), t_z, t_sq, t_y, inv, t_chunk)
      lse[:, idx] = np.asarray(out)[:, :k]
  log_p = lse - log_n[None] - 0.5 * d * np.log(2.0 * np.pi * h * h)[:, None]
  log_p = log_p.astype(np.float32)
  return log_p[0] if scalar else log_p


def select_bandwidth(train_z, train_y, key, *, grid=None, holdout: float = 0.2,
                     max_holdout: int = 2000, chunk: int = 256,
                     train_chunk: int = 2048) -> tuple[float, np.ndarray, np.ndarray]:
  """Chooses h maximising the mean held-out log-likelihood of clean activations.

  A random `holdout` share (at most `max_holdout` points) of the clean training activations is held
  out; each held-out point is scored by its TRUE class's KDE built on the remaining points; h* =
  argmax_h mean log p(z|y). The default grid is sigma * 2^(k/2), k = -12..4, with sigma the RMS
  per-dimension standard deviation of the activations (in high dimension the likelihood-optimal h
  is of order the per-dimension nearest-neighbour spread, below sigma).

  Returns:
    (h*, grid, mean held-out log-likelihood per grid value).
  """
  train_z = np.asarray(train_z, np.float32)
  train_y = np.asarray(train_y, np.int32)
  n = len(train_z)
  n_hold = min(max_holdout, int(round(holdout * n)))
  if n_hold < 1 or n - n_hold < 2:
    raise ValueError(f'Need more clean training points to choose a KDE bandwidth (got {n}); '
                     'pass bandwidth=... explicitly.')
  if grid is None:
    sigma = float(np.sqrt(np.mean(np.var(train_z, axis=0))))
    if not sigma > 0:
      raise ValueError('Training activations are constant: cannot choose a KDE bandwidth.')
    grid = sigma * 2.0 ** (np.arange(-12, 5) / 2.0)
  grid = np.asarray(grid, np.float64)
  perm = np.asarray(jax.random.permutation(key, n))
  hold, rest = perm[:n_hold], perm[n_hold:]
  ll = kde_log_density(train_z[hold], train_y[hold], train_z[rest], train_y[rest], grid,
                       chunk=chunk, train_chunk=train_chunk)
  # Held-out points whose class has no point left in `rest` have no density under any h.
  ok = np.all(np.isfinite(ll), axis=0)
  if not ok.any():
    raise ValueError('No held-out point has a class with remaining training points.')
  mean_ll = ll[:, ok].astype(np.float64).mean(axis=1)
  best = int(np.argmax(mean_ll))
  if best in (0, len(grid) - 1):
    warnings.warn(f'KDE bandwidth {grid[best]:.4g} is at the edge of the search grid '
                  f'[{grid[0]:.4g}, {grid[-1]:.4g}]; consider a wider grid.', stacklevel=2)
  return float(grid[best]), grid, mean_ll


def _block(train_chunk: int, m: int) -> int:
  """The largest divisor of the (padded) training count m that is <= train_chunk."""
  for b in range(min(train_chunk, m), 0, -1):
    if m % b == 0:
      return b
  return 1


def kde_log_density_jnp(z, classes, state, train_chunk: int = 2048):
  """`kde_log_density` as a pure, differentiable jnp function of z [N, D] (for `apply`, attacks).

  Every query meets every (padded) training point, masked to its class's, in a scan over
  `train_chunk`-sized blocks with an online logsumexp; `state` holds the centred training
  features, their labels (-1 = padding), the per-class counts and the bandwidth. Matches the
  float64 brute force to 1e-3 relative like the host version (tested).
  """
  h = state['bandwidth'].astype(jnp.float32)
  center, train_z, train_y = state['center'], state['features_centered'], state['labels_padded']
  zc = z.astype(jnp.float32) - center
  d = zc.shape[-1]
  lse = _class_logsumexp(zc, classes.astype(jnp.int32), train_z,
                         jnp.sum(jnp.square(train_z), axis=-1), train_y,
                         jnp.reshape(1.0 / (2.0 * h * h), (1,)),
                         train_chunk=_block(train_chunk, train_z.shape[0]))[0]
  log_n = jnp.log(state['class_counts'].astype(jnp.float32))[classes]
  return lse - log_n - 0.5 * d * jnp.log(2.0 * jnp.pi * h * h)


def make(*, bandwidth: float | None = None, chunk: int = 256, train_chunk: int = 2048,
             holdout: float = 0.2) -> base.Defense:
  """Gaussian-KDE detector on last hidden activations (Feinman et al. 2017; Tuna et al. 2021).

  score(x) = -log p(z(x) | c_pred(x)) with the exact per-class KDE of `kde_log_density`; higher =
  farther from the predicted class's training manifold = more adversarial. The score is a smooth
  function of x (given M's predicted class), so the surrogate for attacks is the score itself
  (Carlini & Wagner 2017, "Adversarial examples are not easily detected", broke it that way).

  Args:
    bandwidth: kernel width h (> 0). Papers: MNIST 1.20 / 1.70, Fashion-MNIST 1.00, CIFAR 0.26,
      SVHN 1.00. None = chosen at fit time by held-out log-likelihood (`select_bandwidth`).
    chunk: queries per jitted call. train_chunk: training points per scan step.
    holdout: share of the clean fit data held out to choose the bandwidth (when it is None).
  """
  if bandwidth is not None and not bandwidth > 0:
    raise ValueError(f'KDE bandwidth must be > 0, got {bandwidth}')
  if chunk < 1 or train_chunk < 1:
    raise ValueError(f'chunk and train_chunk must be >= 1, got {chunk}, {train_chunk}')
  name = 'kde'

  def fit(ctx, data, key):
    x, y = check_data(data, name)
    counts = base.check_all_classes_present(y, base.num_classes_of(ctx, y), name)
    z, _ = features_and_predictions(ctx, x, chunk)
    center = z.mean(axis=0)
    t_chunk = min(train_chunk, -(-len(z) // 64) * 64)
    pad = -len(z) % t_chunk
    state = {'features': z, 'labels': y, 'class_counts': counts.astype(np.int32),
             'center': center.astype(np.float32),
             'features_centered': np.concatenate([z - center, np.zeros((pad, z.shape[1]), np.float32)]),
             'labels_padded': np.concatenate([y, np.full(pad, -1, np.int32)])}
    if bandwidth is None:
      h, grid, mean_ll = select_bandwidth(z, y, key, holdout=holdout, chunk=chunk,
                                          train_chunk=train_chunk)
      state.update(bandwidth_grid=grid.astype(np.float32),
                   heldout_loglik=mean_ll.astype(np.float32))
    else:
      h = float(bandwidth)
    state['bandwidth'] = np.asarray(h, np.float32)
    return state

  def apply(state, ctx, x, key):
    del key  # Deterministic.
    z = ctx.features_fn(x)
    z = z.reshape(z.shape[0], -1)
    base.check_feature_dim(state['center'].shape[0], z.shape[1], name)
    pred = jnp.argmax(ctx.logits_fn(x), axis=-1)
    return base.Decision(-kde_log_density_jnp(z, pred, state, train_chunk))

  def surrogate(state, ctx, x, key):
    return base.Surrogate(apply(state, ctx, x, key).score)

  return base.Defense(name, fit, apply, surrogate, chunk=chunk)


__all__ = ['kde_log_density', 'kde_log_density_jnp', 'make', 'select_bandwidth']
