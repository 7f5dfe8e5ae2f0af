"""Detection stage (row 3): KDE, MC dropout and UnMask's Jaccard scores against the usual tools.

  KDE          kde.kde_log_density (exact, one jitted call: the queries grouped by class, a
               matmul and a log-sum-exp per class) vs scikit-learn KernelDensity (one tree per
               class, fit + score_samples) and vs a NumPy float64 brute force (two separate
               interleaved comparisons), which is also the exactness reference (max |error| in
               nats). Features are M's 128-d last hidden activations of SynthParts images (train:
               the class statistics; queries: test images scored by their predicted class),
               bandwidth from the library's held-out likelihood rule.
  MC dropout   uncertainty.mc_probabilities (T passes vmapped over keys, one XLA program) vs a
               Python loop of T jitted passes with the same keys (identical results), and vs a
               PyTorch eager loop of T passes of the twin model with dropout on.
  UnMask       unmask.detection_scores + rectify on a batch of part sets (jitted) vs the original
               UnMask code's per-image Python sets and vs NumPy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing, victims
from unmask_jax.data import parts
from unmask_jax.defenses import base, kde, uncertainty, unmask
from unmask_jax.models import functional

NAME = 'detection'


@jax.jit
def _apply(fn, x):
  return fn(x)


def _features(victim, x, chunk=256):
  """M's feature vectors of images `x`, `chunk` at a time (the last chunk padded: one shape)."""
  ffn = functional.features_fn(victim.model)
  return base.map_chunks(lambda v, _: {'z': _apply(ffn, v)}, x, chunk)['z']


def kde_bruteforce_f64(z, classes, train_z, train_y, h: float, chunk: int = 256) -> np.ndarray:
  """log p(z|c) in float64 by direct summation (the exactness reference)."""
  z = np.asarray(z, np.float64)
  tz = np.asarray(train_z, np.float64)
  d = z.shape[1]
  out = np.empty(len(z))
  for c in np.unique(classes):
    pts = tz[train_y == c]
    idx = np.flatnonzero(classes == c)
    for s in range(0, len(idx), chunk):
      q = z[idx[s:s + chunk]]
      d2 = (q * q).sum(1)[:, None] + (pts * pts).sum(1)[None] - 2 * q @ pts.T
      a = -np.maximum(d2, 0) / (2 * h * h)
      m = a.max(1, keepdims=True)
      out[idx[s:s + chunk]] = (np.log(np.exp(a - m).sum(1)) + m[:, 0] - np.log(len(pts))
                               - 0.5 * d * np.log(2 * np.pi * h * h))
  return out


def kde_sklearn(z, classes, train_z, train_y, h: float) -> np.ndarray:
  from sklearn.neighbors import KernelDensity  # pylint: disable=import-outside-toplevel
  out = np.empty(len(z))
  for c in np.unique(classes):
    idx = np.flatnonzero(classes == c)
    kde = KernelDensity(kernel='gaussian', bandwidth=h).fit(train_z[train_y == c])
    out[idx] = kde.score_samples(z[idx])
  return out


def _kde_rows(settings, victim, device):
  n_train, n_query = settings.n(3000, 60), settings.n(600, 12)
  train = victims.images(n_train, split='train')
  test = victims.images(n_query, split='test')
  tz = _features(victim, train['image'])
  ty = train['label']
  qz = _features(victim, test['image'])
  pred = victims.predictions(victim.logits_fn, test['image'])
  h, _, _ = kde.select_bandwidth(tz, ty, jax.random.key(0))
  ours = lambda: kde.kde_log_density(qz, pred, tz, ty, h)
  # Two interleaved comparisons, ours vs scikit-learn and ours vs NumPy, not one of all three:
  # NumPy's multithreaded OpenBLAS leaves its worker threads spinning for a while after each call,
  # which on 2 cores takes a core from whatever runs next (ours ran 3.5x slower right after the
  # NumPy reference). In the NumPy comparison ours still runs right after it (conservative).
  outs, outs_np = {}, {}
  t = timing.compare({'ours': ours, 'sklearn': lambda: kde_sklearn(qz, pred, tz, ty, h)},
                     repeats=settings.repeats, warmup=1, outputs=outs)
  t_np = timing.compare({'ours': ours, 'numpy': lambda: kde_bruteforce_f64(qz, pred, tz, ty, h)},
                        repeats=settings.repeats, warmup=1, outputs=outs_np)
  exact = outs_np['numpy']  # the float64 brute force is the exactness reference
  err_ours = float(np.max(np.abs(outs['ours'] - exact)))
  rel_ours = float(np.max(np.abs(outs['ours'] - exact) / np.maximum(1.0, np.abs(exact))))
  skl_err = np.abs(outs['sklearn'] - exact)
  err_skl = float(np.max(skl_err))
  bad_skl = int(np.sum(skl_err > 1.0))
  work = (f'KDE log p(z|pred), {n_query} queries x {n_train} train points, d={tz.shape[1]}, '
          f'h={h:.3g}')
  check = (f'max |error| vs float64 brute force: ours {err_ours:.1e} (relative {rel_ours:.1e}), '
           f'sklearn {err_skl:.1e} nats '
           f'(|log p| up to {np.max(np.abs(exact)):.0f}; sklearn off by > 1 nat on {bad_skl} of '
           f'{n_query} queries)')
  print(f'    KDE: ours {t["ours"].wall:.4f} s, sklearn {t["sklearn"].wall:.3f} s '
        f'({t["sklearn"].wall / t["ours"].wall:.1f}x); ours {t_np["ours"].wall:.4f} s, numpy f64 '
        f'{t_np["numpy"].wall:.4f} s; {check}', flush=True)
  return [
      timing.Row(NAME, work, 'scikit-learn KernelDensity (per class)', 'kde.kde_log_density',
                 t['sklearn'], t['ours'], check=check, device=device, date=settings.date,
                 extra={'err_ours': err_ours, 'rel_ours': rel_ours, 'err_sklearn': err_skl,
                        'bad_sklearn': bad_skl,
                        'queries': n_query}),
      timing.Row(NAME, work, 'NumPy float64 brute force', 'kde.kde_log_density',
                 t_np['numpy'], t_np['ours'], check=f'ours max |error| {err_ours:.1e} nats',
                 device=device, date=settings.date),
  ]


def _mc_rows(settings, victim, device, torch):
  T = settings.n(50, 3)  # pylint: disable=invalid-name
  batch = settings.n(128, 4)
  x = victims.images(batch)['image']
  mc = functional.mc_logits_fn(victim.model)
  key = jax.random.key(0)
  keys = jax.random.split(key, T)
  one = jax.jit(lambda f, v, k: jax.nn.softmax(f(v, k).astype(jnp.float32), axis=-1))
  xj = jnp.asarray(x)

  def loop():
    return jnp.stack([one(mc, xj, k) for k in keys])

  fns = {'ours': lambda: uncertainty.mc_probabilities(mc, xj, key, T), 'loop': loop}
  if torch is not None:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    tmodel = torch_models.from_nnx(victim.model)
    xt = torch_models.to_torch_images(x, channels_last=True)

    def torch_loop():
      with torch.no_grad():
        return torch.stack([torch.softmax(tmodel(xt, mc_dropout=True), -1) for _ in range(T)])

    fns.update(timing.torch_contenders(torch, torch_loop, 'torch'))
  outs = {}
  t = timing.compare(fns, repeats=settings.repeats, warmup=settings.n(2, 1),
                     alternatives=timing.torch_pair('torch'), outputs=outs)
  ours = np.asarray(outs['ours'])
  diff = float(np.max(np.abs(ours - np.asarray(outs['loop']))))
  work = f'MC dropout T={T}, {victim.name}, batch {batch} 32x32'
  rows = [timing.Row(NAME, work, f'Python loop of {T} jitted passes (JAX, same keys)',
                     'uncertainty.mc_probabilities (vmap)', t['loop'], t['ours'],
                     check=f'max |prob difference| {diff:.1e}', device=device, date=settings.date)]
  if torch is not None:
    ref = outs['torch'].numpy()
    ent = lambda p: float(np.mean(-(p.mean(0) * np.log(p.mean(0) + 1e-12)).sum(-1)))
    ref_t, threads = timing.best_torch(t, 'torch')
    rows.append(timing.Row(NAME, work, f'PyTorch eager loop of {T} passes ({threads} thread'
                           f'{"s" * (threads > 1)})', 'uncertainty.mc_probabilities (vmap)', ref_t,
                           t['ours'],
                           check=f'mean predictive entropy ours {ent(ours):.3f}, ref {ent(ref):.3f}'
                           ' (independent masks)', device=device, date=settings.date))
  else:
    rows.append(timing.Row(NAME, work, timing.NOT_INSTALLED, 'uncertainty.mc_probabilities (vmap)',
                           timing.NOT_INSTALLED, t['ours'], device=device, date=settings.date))
  print(f'    MC dropout: ours {t["ours"].wall:.4f} s, loop {t["loop"].wall:.3f} s'
        + (f', torch {t["torch"].wall:.3f} s' if 'torch' in t else ''), flush=True)
  return rows


def jaccard_python_sets(extracted: np.ndarray, predicted: np.ndarray, class_parts: list[set]):
  """The original UnMask code's computation: per image, Jaccard with each class's part set."""
  scores = np.empty(len(extracted))
  rect = np.empty(len(extracted), np.int64)
  for i, row in enumerate(extracted):
    fa = set(np.flatnonzero(row).tolist())
    sims = [len(fa & v) / len(fa | v) if (fa | v) else 0.0 for v in class_parts]
    scores[i] = 1.0 - sims[predicted[i]]
    best = max(sims)
    tied = [c for c, s in enumerate(sims) if s >= best - 1e-6]
    if predicted[i] in tied:
      rect[i] = predicted[i]
    else:
      rect[i] = max(tied, key=lambda c: (len(fa & class_parts[c]), -c))
  return scores, rect


def jaccard_numpy(extracted, predicted, v):
  a = (extracted > 0).astype(np.float32)
  b = (v > 0).astype(np.float32)
  inter = a @ b.T
  union = a.sum(-1, keepdims=True) + b.sum(-1)[None] - inter
  sims = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
  scores = 1.0 - np.take_along_axis(sims, predicted[:, None], 1)[:, 0]
  tied = sims >= sims.max(1, keepdims=True) - 1e-6
  keep = np.take_along_axis(tied, predicted[:, None], 1)[:, 0]
  fallback = np.argmax(np.where(tied, inter, -1.0), axis=1)
  return scores, np.where(keep, predicted, fallback)


@jax.jit
def _jaccard_jax(extracted, predicted, v):
  return (unmask.detection_scores(extracted, predicted, v), unmask.rectify(extracted, predicted, v))


def _jaccard_rows(settings, device):
  n = settings.n(10000, 64)
  classes = parts.class_set(victims.CLASS_SET)
  v = parts.parts_matrix(classes)
  rng = np.random.default_rng(0)
  # Part sets like K's output: each image shows some of its class's parts plus a few others.
  labels = rng.integers(0, len(classes), n)
  extracted = ((rng.random((n, v.shape[1])) < 0.6) * v[labels]
               + (rng.random((n, v.shape[1])) < 0.03)).clip(0, 1).astype(np.float32)
  predicted = np.where(rng.random(n) < 0.8, labels, rng.integers(0, len(classes), n)).astype(
      np.int32)
  class_parts = [set(np.flatnonzero(r).tolist()) for r in v]
  fns = {'ours': lambda: _jaccard_jax(extracted, predicted, v),
         'python': lambda: jaccard_python_sets(extracted, predicted, class_parts),
         'numpy': lambda: jaccard_numpy(extracted, predicted, v)}
  outs = {}
  t = timing.compare(fns, repeats=settings.repeats, warmup=1, outputs=outs)
  s_ours, r_ours = (np.asarray(a) for a in outs['ours'])
  s_py, r_py = outs['python']
  same = (np.max(np.abs(s_ours - s_py)) < 1e-5) and np.array_equal(r_ours, r_py)
  check = ('scores and rectified classes identical' if same
           else 'CHECK FAILED: results differ from the Python-sets reference')
  work = f'UnMask Jaccard score + rectify, {n} part sets x {v.shape[1]} parts, {len(classes)} classes'
  print(f'    Jaccard: ours {t["ours"].wall:.4f} s, python {t["python"].wall:.3f} s, numpy '
        f'{t["numpy"].wall:.4f} s; {check}', flush=True)
  return [timing.Row(NAME, work, 'Python sets per image (original UnMask code)',
                     'unmask.detection_scores + rectify (jit)', t['python'], t['ours'], check=check,
                     device=device, date=settings.date, extra={'failed': not same}),
          timing.Row(NAME, work, 'NumPy (vectorised)', 'unmask.detection_scores + rectify (jit)',
                     t['numpy'], t['ours'], check=check, device=device, date=settings.date,
                     extra={'failed': not same})]


def run(settings: timing.Settings) -> list[timing.Row]:
  torch = timing.torch_or_none()
  device = timing.device_label()
  victim = victims.cnn_small(trained=not settings.smoke)
  print(f'  M: {victim.name}, {victim.weights}', flush=True)
  return (_kde_rows(settings, victim, device) + _mc_rows(settings, victim, device, torch)
          + _jaccard_rows(settings, device))
