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
import math

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


def pixel_margins(logits, min_conf: float):
  """Per pixel and part, how far the pixel is from counting towards that part: [N, H, W, P].

  A pixel counts for part p (class p + 1) when p is its arg-max class AND its probability is at
  least min_conf. Both conditions as margins (> 0 when met):
    m_arg  = z_p - max_{q != p} z_q                           (logit margin over every other class)
    m_conf = (z_p - logsumexp_{q != p} z_q) - logit(min_conf)  (log-odds of p above the bar's)
  and the pixel's margin is min(m_arg, m_conf): > 0 iff the pixel counts.

  The log-odds log(p / (1 - p)) = z_p - logsumexp_{q != p} z_q is used rather than the
  log-probability log p: both are > logit / log of min_conf at the same pixels, but log p
  saturates at 0 (its gradient 1 - p vanishes) on the confidently segmented pixels an attack must
  remove, while the log-odds keep a gradient of order 1 there.
  """
  logits = logits.astype(jnp.float32)
  # Max over the other classes for every class at once: the top-2 logits suffice. Two max
  # reductions (the second with the first arg-max masked out, so a tie gives top-2 = top-1, as
  # lax.top_k does) rather than lax.top_k: on XLA:CPU top_k and its gradient over the class axis
  # made this function's gradient cost 2.4x K's own (200 images: 0.97 s vs K's 0.40 s), the bulk
  # of the adaptive attack on UnMask.
  zmax = jnp.max(logits, -1, keepdims=True)
  first = jnp.arange(logits.shape[-1]) == jnp.argmax(logits, -1)[..., None]
  second = jnp.max(jnp.where(first, -jnp.inf, logits), -1, keepdims=True)
  is_top = logits >= zmax
  other = jnp.where(is_top, second, zmax)
  # logsumexp over q != p: for the (first) arg-max class, a logsumexp with it masked out; for the
  # others, log(S - e^{z_p}) (S = sum_q e^{z_q}), stable there: S - e^{z_p} >= e^{z_max} >= e^{z_p}
  # (a class tied at the maximum too: S - e^{z_p} still holds the first one's e^{z_max}).
  e = jnp.exp(logits - zmax)
  total = e.sum(-1, keepdims=True)
  without_top = jnp.log(jnp.maximum(jnp.sum(jnp.where(first, 0.0, e), -1, keepdims=True),
                                    1e-30))
  rest = jnp.log(jnp.maximum(total - e, 1e-30))
  log_others = zmax + jnp.where(first, without_top, rest)
  if min_conf <= 0:
    m = logits - other          # no confidence bar (the original code's threshold of 0)
  else:
    bar = math.log(min_conf) - math.log1p(-min_conf) if min_conf < 1 else math.inf
    m = jnp.minimum(logits - other, logits - log_others - bar)
  return m[..., 1:]


def part_margins(logits, min_area: float, min_conf: float):
  """Per image and part, the k-th largest pixel margin, k = ceil(min_area): [N, P].

  Part p is extracted (`extract_parts`) iff at least min_area pixels count for it, i.e. iff its
  k-th largest pixel margin is > 0; the margin itself is a differentiable measure of how present
  (> 0) or absent (< 0) a part is, for attacks aimed at UnMask (a soft version of K's rule).
  """
  return top_pixel_margins(logits, min_area, min_conf)[..., -1]


def top_pixel_margins(logits, min_area: float, min_conf: float):
  """Per image and part, the k largest pixel margins, k = ceil(min_area): [N, P, k], descending.

  The last one is `part_margins`. An attack that needs part p present must lift all k of them
  above 0, one that needs it absent must push all k below 0: a hinge on all k (`dense` in
  `defenses.unmask.part_agreement`) gives a gradient through k pixels per part instead of the
  one pixel that the k-th largest margin alone depends on.
  """
  m = pixel_margins(logits, min_conf)
  n, h, w, p = m.shape
  k = max(1, min(h * w, int(math.ceil(min_area))))
  flat = jnp.moveaxis(m.reshape(n, h * w, p), 1, 2)          # [N, P, H*W]
  return jax.lax.top_k(flat, k)[0]


class PartRule:
  """K's extraction rule with its thresholds as static (hashable) settings.

  `jax.tree_util.Partial(PartRule(min_area, min_conf), segment_fn)` is the exact `x -> parts`
  function a `Context` carries; `soft_parts` gives its differentiable surrogate. The thresholds
  are static so that k = ceil(min_area) is a Python int when traced.
  """
  __slots__ = ('min_area', 'min_conf')

  def __init__(self, min_area: float, min_conf: float):
    self.min_area, self.min_conf = float(min_area), float(min_conf)

  def __hash__(self):
    return hash((PartRule, self.min_area, self.min_conf))

  def __eq__(self, other):
    return isinstance(other, PartRule) and (self.min_area, self.min_conf) == (other.min_area, other.min_conf)

  def __repr__(self):
    return f'PartRule(min_area={self.min_area:g}, min_conf={self.min_conf:g})'

  def __call__(self, segment_fn, x):
    return extract_parts(segment_fn(x), self.min_area, self.min_conf)


def part_extractor(segment_fn, min_area: float, min_conf: float) -> jax.tree_util.Partial:
  """K as a pure `x -> multi-hot parts [N, P]` Partial (weights are leaves; thresholds static)."""
  return jax.tree_util.Partial(PartRule(min_area, min_conf), segment_fn)


def margins_of(parts_fn, x):
  """`part_margins` of K at x [N, P]: > 0 exactly where `parts_fn` extracts the part.

  `parts_fn` must be made by `part_extractor`.
  """
  return top_margins_of(parts_fn, x)[..., -1]


def top_margins_of(parts_fn, x):
  """`top_pixel_margins` of K at x [N, P, k]; `parts_fn` must be made by `part_extractor`."""
  rule = getattr(parts_fn, 'func', None)
  if not isinstance(rule, PartRule):
    raise ValueError('This parts_fn has no differentiable surrogate: build it with '
                     'models.part_extraction.part_extractor(segment_fn, min_area, min_conf).')
  (segment_fn,) = parts_fn.args
  return top_pixel_margins(segment_fn(x), rule.min_area, rule.min_conf)


def soft_parts(parts_fn, x, temperature: float = 1.0):
  """Differentiable part presence in (0, 1) [N, P]: sigmoid(part_margins / temperature).

  > 0.5 exactly where `parts_fn` extracts the part (up to ties), so rounding it gives K's rule.
  `parts_fn` must be made by `part_extractor`.
  """
  return jax.nn.sigmoid(margins_of(parts_fn, x) / temperature)


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
