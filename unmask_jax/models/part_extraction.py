"""From K's per-pixel part logits to a part set: the extraction rule and its metrics.

UnMask's K was a Mask R-CNN (instance masks with confidences). Here K is a semantic segmenter
(an encoder-decoder predicting background + one class per part at every pixel): parts, not
instances, are what UnMask compares, a segmenter is far cheaper to train and run on a CPU, and it
is differentiable end to end, which adaptive (white-box) attacks on UnMask need.

Extraction rule: part p is extracted from an image when at least `min_area` pixels have p as
their arg-max class with probability >= `min_conf`. Both thresholds are chosen on the validation
split (maximising micro-F1 of part presence) and saved beside K's checkpoint. (The original code
kept every Mask R-CNN detection, i.e. a confidence threshold of 0 — a known defect.)
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def extract_parts(logits, min_area: float, min_conf: float):
  """logits [N, H, W, P+1] -> multi-hot float [N, P] (class 0 = background is never a part)."""
  probs = jax.nn.softmax(logits, axis=-1)
  num = logits.shape[-1]
  winner = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num, dtype=jnp.float32)
  confident = winner * (probs >= min_conf)
  area = confident.sum(axis=(1, 2))[:, 1:]
  return (area >= min_area).astype(jnp.float32)


def presence_prf(pred, true) -> dict:
  """Micro precision / recall / F1 of part presence over all (image, part) pairs."""
  pred = np.asarray(pred) > 0
  true = np.asarray(true) > 0
  tp = float(np.sum(pred & true))
  fp = float(np.sum(pred & ~true))
  fn = float(np.sum(~pred & true))
  p = tp / max(tp + fp, 1.0)
  r = tp / max(tp + fn, 1.0)
  f1 = 2 * p * r / max(p + r, 1e-12)
  return {'precision': p, 'recall': r, 'f1': f1}


def area_conf_stats(logits, conf_grid):
  """Per image and part, the count of arg-max pixels at each confidence level: [N, len(grid), P]."""
  probs = jax.nn.softmax(logits, axis=-1)
  num = logits.shape[-1]
  winner = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num, dtype=jnp.float32)
  pw = (probs * winner).max(-1)                           # prob of the winning class
  out = [(winner * (pw >= c)[..., None]).sum(axis=(1, 2))[:, 1:] for c in conf_grid]
  return jnp.stack(out, axis=1)


def choose_thresholds(areas: np.ndarray, true_parts: np.ndarray, conf_grid, area_grid) -> dict:
  """Grid search of (min_area, min_conf) maximising presence micro-F1 on validation statistics.

  Args:
    areas: [N, len(conf_grid), P] from `area_conf_stats` on the validation split.
    true_parts: [N, P] ground-truth presence.
  """
  best = None
  for (ci, c), a in itertools.product(enumerate(conf_grid), area_grid):
    m = presence_prf(areas[:, ci] >= a, true_parts)
    if best is None or m['f1'] > best['f1'] + 1e-12:
      best = {'min_conf': float(c), 'min_area': float(a), **m}
  return best


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
  """Per-class IoU from a confusion matrix [C, C] (rows true, cols pred); NaN if class unseen."""
  tp = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, tp / union, np.nan)


def confusion(logits, mask, num_classes: int, valid=None):
  """Pixel confusion matrix [C, C] of arg-max predictions vs true mask (rows true)."""
  pred = jnp.argmax(logits, axis=-1).reshape(-1)
  true = mask.reshape(-1).astype(jnp.int32)
  w = jnp.ones_like(pred, jnp.float32)
  if valid is not None:
    w = jnp.repeat(valid.astype(jnp.float32), mask.shape[1] * mask.shape[2])
  return jnp.zeros((num_classes, num_classes), jnp.float32).at[true, pred].add(w)
