"""Gaussian-KDE closeness detector on M's last hidden activations (Feinman et al. 2017; Tuna et al.
2021 §3.5.1, eq. 9):

  score(x) = -log p(z(x) | c_pred(x)),
  log p(z|c) = logsumexp_{i: y_i = c}(-||z - z_i||^2 / (2 h^2)) - log n_c - (d/2) log(2 pi h^2).

Exact (float32 on device, 1e-3 relative to a float64 brute force): one matmul per block of training
points and a running log-sum-exp. `kde_log_density` (fitting, benchmarks) groups the queries by
class on the host and scores the whole batch in one jitted call, each query against its class's
points only; `kde_log_density_jnp` (the defense's `apply` and attack surrogate) is a pure,
differentiable function of the features that masks every training point to the query's class.
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

# Kernel values [H, slots, queries, train block] per jitted call at most (float32: 32 MiB).
_CALL_ELEMS = 1 << 23
# Full float32 matmuls on every backend (TPU/GPU default to bfloat16/TF32 passes for float32).
_HIGHEST = jax.lax.Precision.HIGHEST


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
    d2 = jnp.maximum(q_sq[:, None] + sq_t[None, :]
                     - 2.0 * jnp.dot(zq, z_t.T, precision=_HIGHEST), 0.0)  # [q, t]
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


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _slot_size(q_counts: np.ndarray, chunk: int) -> int:
  """Queries per slot: the multiple of 16 (at most `chunk`) that pads the per-class query counts
  least, counting a slot's fixed cost (its gathered training block) as 16 queries."""
  if chunk <= 16:
    return chunk
  top = min(chunk, _round_up(int(q_counts.max()), 16))
  sizes = np.arange(16, top + 1, 16)
  slots = -(-q_counts[None, :] // sizes[:, None])  # [sizes, classes]
  cost = (slots * (sizes[:, None] + 16)).sum(axis=1)
  return int(sizes[np.argmin(cost)])


def _gather(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """x[rows] written into a fresh 64-byte-aligned buffer: the CPU backend then takes it as a jit
  argument without a copy (an unaligned NumPy array is copied again on the way in)."""
  n = rows.size * x.shape[1]
  buf = np.empty(n + 16, np.float32)
  off = (-buf.ctypes.data % 64) // 4
  out = buf[off:off + n].reshape(rows.shape + x.shape[1:])
  np.take(x, rows, axis=0, out=out, mode='clip')  # 'raise' would buffer the output
  return out


@functools.partial(jax.jit, static_argnames=('t_chunk',))
def _slot_log_density(q, t, counts, inv_two_h2, log_norm, t_chunk):
  """Exact log densities of blocks ("slots") of queries that share a class: [H, S, Q].

  q [S, Q, D]: slot s's queries; t [S, T, D]: the training points of slot s's class, the first
  counts[s] >= 1 valid and the rest padding (any finite rows); inv_two_h2, log_norm [H]: 1/(2h^2)
  and (d/2) log(2 pi h^2) per bandwidth.

  Accuracy in float32: each slot is centred on its class's training mean (distances unchanged),
  and the kernel exponent is written as
    -||q - t||^2 / (2h^2) = -|q|^2/(2h^2) + (2 q.t - |t|^2)/(2h^2),
  so the log-sum-exp over t runs over g_t = (2 q.t - |t|^2)/(2h^2), one matmul per block of
  t_chunk training points, and the per-query -|q|^2/(2h^2) is added after it. This rounds like
  the direct |q|^2 + |t|^2 - 2 q.t: a point's exponent is off by at most about
  D * 2^-24 * (|q|^2 + |t|^2)/(2h^2) nats (float32 accumulation of the D-term dot product, with
  the centred norms: that is what the centring buys), and the log-sum-exp by at most the largest
  such error among the points that carry its mass (on the benchmark's features: 9e-3 nats at most,
  3e-4 relative to |log p| where an exponent near -230 meets the +261 of the normalisation; the
  tests and the benchmark check 1e-3).
  Padding points get |t|^2 = +inf (kernel value 0), so the [H, S, Q, t] block needs no mask; a
  running (max, sum) log-sum-exp spans the blocks.
  """
  s_n, t_n, _ = t.shape
  valid = jnp.arange(t_n)[None, :] < counts[:, None]  # [S, T]
  count = counts.astype(jnp.float32)
  center = jnp.einsum('st,std->sd', valid.astype(jnp.float32), t, precision=_HIGHEST)
  center = center / count[:, None]
  qc = q - center[:, None, :]
  single = inv_two_h2.shape[0] == 1
  # One bandwidth: its scale is folded into the [S, Q, D] queries and [S, t] norms (no [S, Q, t]
  # multiply). Several: one shared matmul, scaled per bandwidth.
  scale = inv_two_h2[0] if single else 1.0

  def exponents(t_block, valid_block):
    z = t_block - center[:, None, :]  # [S, t, D]
    t_sq = jnp.where(valid_block, scale * jnp.sum(jnp.square(z), axis=-1), jnp.inf)
    g = jnp.einsum('sqd,std->sqt', (2.0 * scale) * qc, z, precision=_HIGHEST) - t_sq[:, None, :]
    return g[None] if single else inv_two_h2[:, None, None, None] * g[None]  # [H, S, Q, t]

  # Block 0 holds at least one valid point of every slot, so the running max is finite from it on.
  first = exponents(t[:, :t_chunk], valid[:, :t_chunk])
  m = jnp.max(first, axis=-1)
  s = jnp.sum(jnp.exp(first - m[..., None]), axis=-1)
  n_blocks = t_n // t_chunk
  if n_blocks > 1:
    def body(carry, xs):
      m, s = carry
      g = exponents(*xs)
      m_new = jnp.maximum(m, jnp.max(g, axis=-1))
      s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(g - m_new[..., None]), axis=-1)
      return (m_new, s), None

    rest = (jnp.swapaxes(t[:, t_chunk:].reshape(s_n, n_blocks - 1, t_chunk, -1), 0, 1),
            jnp.swapaxes(valid[:, t_chunk:].reshape(s_n, n_blocks - 1, t_chunk), 0, 1))
    (m, s), _ = jax.lax.scan(body, (m, s), rest)
  q_sq = jnp.sum(jnp.square(qc), axis=-1)  # [S, Q]
  return (jnp.log(s) + m - inv_two_h2[:, None, None] * q_sq[None]
          - jnp.log(count)[None, :, None] - log_norm[:, None, None])


def kde_log_density(z, classes, train_z, train_y, bandwidths, *, chunk: int = 256,
                    train_chunk: int = 2048) -> np.ndarray:
  """Exact per-class Gaussian KDE log densities (Feinman et al. 2017).

    log p(z|c) = logsumexp_{i: y_i = c}(-||z - z_i||^2 / (2 h^2)) - log n_c - (d/2) log(2 pi h^2)

  i.e. the log of the mean over class c's n_c training points of an isotropic Gaussian N(z_i, h^2 I)
  density at z.

  The queries are grouped by class on the host into "slots" of at most `chunk` queries of one
  class, each with its class's training points (index arithmetic and one gather), and a single
  jitted call scores all slots (more only past _CALL_ELEMS kernel values): each query meets only
  its class's points, with one dispatch for the whole batch.

  Args:
    z: [N, D] query activations.
    classes: [N] class whose KDE scores each query (the predicted class at test time).
    train_z: [M, D] training activations; train_y: [M] their true labels.
    bandwidths: scalar h or [H] array of bandwidths (evaluated in one pass).
    chunk: at most this many queries per slot (a multiple of 16 chosen to pad the per-class query
      counts least); train_chunk: training points per scan step.

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
  if chunk < 1 or train_chunk < 1:
    raise ValueError(f'chunk and train_chunk must be >= 1, got {chunk}, {train_chunk}')
  n, d = z.shape
  classes = np.asarray(classes, np.int64).reshape(n)
  log_p = np.full((len(h), n), -np.inf, np.float32)  # stays -inf for a class without points
  t_counts = np.bincount(train_y, minlength=1) if len(train_y) else np.zeros(1, np.int64)
  ok = (classes >= 0) & (classes < len(t_counts))
  ok[ok] = t_counts[classes[ok]] > 0
  if not ok.any():
    return log_p[0] if scalar else log_p
  # Queries sorted by class, cut into slots of q_size queries of one class (the last one of a
  # class padded by repeating its last query).
  q_order = np.flatnonzero(ok)
  q_order = q_order[np.argsort(classes[q_order], kind='stable')]
  cls, q_first, q_counts = np.unique(classes[q_order], return_index=True, return_counts=True)
  q_size = _slot_size(q_counts, chunk)
  per_class = -(-q_counts // q_size)
  slot_cls = np.repeat(cls, per_class)
  part = np.arange(len(slot_cls)) - np.repeat(np.cumsum(per_class) - per_class, per_class)
  q_start = np.repeat(q_first, per_class) + part * q_size
  q_len = np.minimum(q_size, np.repeat(q_counts, per_class) - part * q_size)
  k = np.arange(q_size)
  q_rows = q_order[q_start[:, None] + np.minimum(k[None, :], q_len[:, None] - 1)]  # [S, Q]
  # Where each query of q_order lands in the flattened [S * Q] output.
  q_pos = (np.arange(len(slot_cls))[:, None] * q_size + k[None, :])[k[None, :] < q_len[:, None]]
  # Each slot's training rows: its class's points (train_y sorted), padded to whole blocks.
  t_order = np.argsort(train_y, kind='stable')
  t_first = np.cumsum(t_counts) - t_counts
  counts = t_counts[slot_cls].astype(np.int32)
  t_chunk = min(train_chunk, _round_up(int(counts.max()), 64))
  t_size = _round_up(int(counts.max()), t_chunk)
  t_rows = t_order[t_first[slot_cls][:, None]
                   + np.minimum(np.arange(t_size)[None, :], counts[:, None] - 1)]  # [S, T]
  # Slots per call: the [H, S, Q, t_chunk] kernel block stays under _CALL_ELEMS values. A batch
  # that needs several calls pads the last one with copies of slot 0 (one compiled shape).
  n_slots = len(slot_cls)
  per_call = max(1, _CALL_ELEMS // (len(h) * q_size * t_chunk))
  if n_slots > per_call:
    pad = -n_slots % per_call
    q_rows, t_rows, counts = (np.concatenate([a, np.repeat(a[:1], pad, 0)])
                              for a in (q_rows, t_rows, counts))
  else:
    per_call = n_slots
  inv = (1.0 / (2.0 * h * h)).astype(np.float32)
  log_norm = (0.5 * d * np.log(2.0 * np.pi * h * h)).astype(np.float32)
  outs = [_slot_log_density(_gather(z, q_rows[i:i + per_call]),
                            _gather(train_z, t_rows[i:i + per_call]),
                            counts[i:i + per_call], inv, log_norm, t_chunk=t_chunk)
          for i in range(0, len(q_rows), per_call)]  # dispatched asynchronously, gathered below
  flat = np.concatenate([np.asarray(o).reshape(len(h), -1) for o in outs], axis=1)
  log_p[:, q_order] = flat[:, q_pos]
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
