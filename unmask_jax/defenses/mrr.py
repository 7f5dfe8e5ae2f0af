"""Modular Robust Redundancy (Rouhani et al. 2018, "Towards safe deep learning").

N defender modules (`models.defender`, trained by train_m.py with configs/mrr_defender.py; the
evaluation puts their feature functions in `ctx.defenders`) each checkpoint the victim's
prediction. For defender j with L2-normalised features z_j(x):

  fit (clean training data, true labels y):
    P_j          PCA of z_j keeping 99% of the variance (`variance`),
    mu_{j,c}     mean of P_j z_j over training images of class c,
    d_j(x, c)    = ||P_j z_j(x) - mu_{j,c}||_2,
    tau_{j,c}    = the (100 - SP) percentile of d_j(x_i, y_i) over training images of class c,
  score (victim's predicted class c_hat = argmax M(x)):
    r_j(x)       = d_j(x, c_hat) / tau_{j,c_hat},
    score(x)     = max_{j < N} r_j(x),      flagged iff score(x) > 1 (`threshold`).

So defender j alone flags about SP% of clean training images of each class (the security
parameter SP ~ target false-positive rate), and the N defenders flag if ANY flags (the white-box
rule of Rouhani et al. 2018): an attacker must fool all of them at once, while the false-positive rate grows
with N (Rouhani et al. 2018 Table 2: 2.9% -> 8.4% from N=1 to N=16 at SP 1%). `score` is also a continuous
detection score for ROC curves.

Every step is differentiable given the victim's predicted class; the attack surrogate replaces the
max over defenders by a smooth maximum t * logsumexp_j(r_j / t) >= max_j r_j (`smooth`), so an
attacker pushing it below 1 pushes every defender below its threshold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.defenses import base


@jax.jit
def _features_and_prediction(defender_fns, logits_fn, x):
  return [f(x) for f in defender_fns], jnp.argmax(logits_fn(x), axis=-1)


def _defender_features(ctx: base.Context, n: int, x, chunk: int):
  """([N_images, D] features of each of the first n defenders, victim predictions [N_images])."""
  fns = tuple(base.as_partial(f, f'defenders[{j}]') for j, f in enumerate(ctx.defenders[:n]))
  logits_fn = base.as_partial(ctx.logits_fn, 'logits_fn')

  def run(xb, _):
    feats, pred = _features_and_prediction(fns, logits_fn, jnp.asarray(xb))
    return {'pred': pred, **{f'z{j}': z for j, z in enumerate(feats)}}

  out = base.map_chunks(run, x, chunk)
  return [out[f'z{j}'].astype(np.float64) for j in range(n)], out['pred'].astype(np.int64)


def _check_defenders(ctx: base.Context, n: int, name: str) -> None:
  have = len(ctx.defenders or ())
  if have < n:
    raise ValueError(f'{name} needs {n} defender module(s) in ctx.defenders, got {have}: train '
                     'them with train_m.py --config=configs/mrr_defender.py (one seed each) and '
                     "give the evaluation the directory (class set's mrr_dir).")


def pca(z: np.ndarray, variance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean [D], components [D, k], explained-variance ratios [k]) keeping >= `variance` of it."""
  mean = z.mean(axis=0)
  _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
  ratio = s ** 2 / max(float(np.sum(s ** 2)), 1e-300)
  k = int(np.searchsorted(np.cumsum(ratio), variance - 1e-12) + 1)
  k = min(max(k, 1), len(ratio))
  return mean, vt[:k].T, ratio[:k]


def distances(state: base.State, z: np.ndarray, classes: np.ndarray, j: int) -> np.ndarray:
  """d_j(x, c) of the module docstring for defender j's features z [N, D] and classes [N]."""
  p = (np.asarray(z, np.float64) - state[f'd{j}.mean']) @ state[f'd{j}.components']
  return np.linalg.norm(p - state[f'd{j}.centers'][classes], axis=1)


def make(*, n: int = 4, sp: float = 1.0, variance: float = 0.99, chunk: int = 256,
         smooth: float = 0.05) -> base.Defense:
  """MRR detector over the first `n` defenders in `ctx.defenders` (module docstring).

  Args:
    n: number of defender modules combined (flag if any flags); >= 1.
    sp: security parameter in percent, in (0, 100): each defender's per-class threshold is the
      (100 - sp) percentile of its clean training distances.
    variance: fraction of the feature variance the PCA keeps (Rouhani et al. 2018: 0.99).
    chunk: images per jitted batch.
    smooth: temperature of the surrogate's smooth maximum over defenders (in ratio units).
  """
  if not isinstance(n, int) or n < 1:
    raise ValueError(f'mrr: the number of defenders n must be an integer >= 1, got {n!r}')
  if not 0.0 < sp < 100.0:
    raise ValueError(f'mrr: the security parameter sp is a percentage in (0, 100), got {sp}')
  if not 0.0 < variance <= 1.0:
    raise ValueError(f'mrr: variance must be in (0, 1], got {variance}')
  name = f'mrr(n={n}, sp={sp:g})'

  def fit(ctx, data, key):
    del key  # Deterministic: PCA and percentiles.
    _check_defenders(ctx, n, name)
    x, y = data['image'], np.asarray(data['label'], np.int64)
    base.check_images(x, name)
    num_classes = base.num_classes_of(ctx, y)
    base.check_all_classes_present(y, num_classes, name)
    feats, _ = _defender_features(ctx, n, x, chunk)
    # The defense's own operating point (SP), so `calibrate` keeps it.
    state = {'n': np.asarray(n), 'sp': np.asarray(sp, np.float64),
             'threshold': np.asarray(1.0, np.float64)}
    for j, z in enumerate(feats):
      mean, comps, ratio = pca(z, variance)
      p = (z - mean) @ comps
      centers = np.stack([p[y == c].mean(axis=0) for c in range(num_classes)])
      d = np.linalg.norm(p - centers[y], axis=1)
      thr = np.asarray([np.percentile(d[y == c], 100.0 - sp) for c in range(num_classes)])
      state.update({f'd{j}.mean': mean, f'd{j}.components': comps, f'd{j}.explained': ratio,
                    f'd{j}.centers': centers, f'd{j}.thresholds': np.maximum(thr, 1e-12)})
    return state

  def ratios(state, ctx, x):
    pred = jnp.argmax(ctx.logits_fn(x), axis=-1)
    out = []
    for j, f in enumerate(ctx.defenders[:n]):
      z = f(x).astype(jnp.float32)
      base.check_feature_dim(state[f'd{j}.mean'].shape[0], z.shape[1], name)
      p = (z - state[f'd{j}.mean']) @ state[f'd{j}.components']
      d = jnp.sqrt(jnp.sum(jnp.square(p - state[f'd{j}.centers'][pred]), axis=-1) + 1e-12)
      out.append(d / state[f'd{j}.thresholds'][pred])
    return jnp.stack(out)                                        # [n, N]

  def apply(state, ctx, x, key):
    del key
    _check_defenders(ctx, n, name)
    return base.Decision(jnp.max(ratios(state, ctx, x), axis=0))

  def surrogate(state, ctx, x, key):
    del key
    r = ratios(state, ctx, x)
    return base.Surrogate(smooth * jax.nn.logsumexp(r / smooth, axis=0))

  return base.Defense(name, fit, apply, surrogate, chunk=chunk)


__all__ = ['distances', 'make', 'pca']
