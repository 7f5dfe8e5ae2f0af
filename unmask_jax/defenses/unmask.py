"""UnMask: detection and defense by robust building-block (part) knowledge.

Freitas, Chen, Wang & Chau, "UnMask: Adversarial Detection and Defense Through Robust Feature
Alignment", IEEE Big Data 2020 (arXiv:2002.09576).

Given an image x, the part extractor K gives the set of parts it sees, f_a = K(x), and the
victim M predicts class y_hat. With V the class->parts matrix (Table I):

  detection:  s = J(V[y_hat], f_a),  J(A, B) = |A ∩ B| / |A ∪ B|,  score d = 1 - s
              (x is flagged adversarial when d > t; a ROC sweeps t).
  defense:    y_um = argmax_c J(V[c], f_a) over the classes of the class set.

Ties and the empty set (choices the paper leaves open, documented here):
  * J(A, B) = 0 when A ∪ B = ∅ (no evidence is not agreement). Classes always have parts, so
    this only matters for degenerate inputs.
  * When several classes share the best Jaccard score, UnMask keeps M's prediction if it is one
    of them (the parts do not contradict M), else it takes the tied class with the most matched
    parts |V[c] ∩ f_a|, and then the lowest class index.
  * When K extracts no part at all, every class scores 0, so the prediction falls back to M's
    prediction and the detection score is d = 1 (maximally suspicious).

Surrogate (for adaptive attacks): K's hard rule "at least min_area pixels with p as arg-max at
probability >= min_conf" becomes a soft presence sigmoid(m_p / T), m_p the k-th largest per-pixel
margin (`part_extraction.soft_parts`), and J the soft Jaccard s.v / (|s| + |v| - s.v); the soft
detection score is 1 - J(V[y_hat], s). The corrected class's logits are, by default, a hinge on
K's part margins (`part_agreement`: mean_p min(+-m_p, 1), + for class c's parts), which keeps a
gradient for parts far from K's decision; `class_surrogate='jaccard'` uses J(V[c], s) / tau.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unmask_jax.defenses import base
from unmask_jax.models import part_extraction


def jaccard(a, b):
  """Pairwise Jaccard similarity of multi-hot sets a [N, P] and b [C, P] -> [N, C].

  J = |a ∩ b| / |a ∪ b|, with J = 0 where the union is empty.
  """
  a = (jnp.asarray(a) > 0).astype(jnp.float32)
  b = (jnp.asarray(b) > 0).astype(jnp.float32)
  return soft_jaccard(a, b)


def soft_jaccard(a, b):
  """J(a, b) = a.b / (|a|_1 + |b|_1 - a.b) for soft sets in [0, 1]: [N, P] x [C, P] -> [N, C].

  Equals `jaccard` on 0/1 inputs; 0 where the (soft) union is empty.
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  inter = a @ b.T
  union = a.sum(-1, keepdims=True) + b.sum(-1)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1e-6), 0.0)


def detection_scores(extracted, predicted, parts_matrix):
  """d = 1 - J(V[predicted], K(x)) per example (higher = more adversarial)."""
  sims = jaccard(extracted, parts_matrix)
  return 1.0 - jnp.take_along_axis(sims, predicted[:, None], axis=1)[:, 0]


def rectify(extracted, predicted, parts_matrix):
  """UnMask's defense: the class whose expected parts best match K(x); ties as in the module doc."""
  sims = jaccard(extracted, parts_matrix)                     # [N, C]
  best = sims.max(axis=1, keepdims=True)
  tied = sims >= best - 1e-6
  keep_m = jnp.take_along_axis(tied, predicted[:, None], axis=1)[:, 0]
  matched = (jnp.asarray(extracted) > 0).astype(jnp.float32) @ (jnp.asarray(parts_matrix) > 0).T.astype(jnp.float32)
  # Among tied classes, most matched parts first; argmax then picks the lowest index.
  secondary = jnp.where(tied, matched, -1.0)
  fallback = jnp.argmax(secondary, axis=1)
  return jnp.where(keep_m, predicted, fallback).astype(jnp.int32)


CLASS_SURROGATES = ('parts', 'jaccard')
PIXELS = ('top_k', 'kth')


def part_agreement(margins, parts_matrix, cap: float = 1.0):
  """Per class c: mean_p min(s_cp m_p, cap), s_cp = +1 if part p belongs to class c else -1.

  A hinge on K's part margins m_p [N, P] (> 0 = extracted): it is `cap` exactly when K extracts
  class c's parts and no other part with margin >= cap, and its gradient does not vanish for
  parts far from the decision (a sigmoid of the margin would), so an attack can steer K's parts
  towards a target class's row. [N, P] x [C, P] -> [N, C].

  Given the k largest pixel margins per part, m_pj [N, P, k] (`part_extraction.top_pixel_margins`),
  the hinge is averaged over them: mean_p mean_j min(s_cp m_pj, cap). It reaches `cap` under the
  same condition (all k above cap for c's parts, all k below -cap for the others), and its
  gradient reaches k pixels per part instead of the one that the k-th margin depends on.
  """
  sign = 2.0 * (jnp.asarray(parts_matrix, jnp.float32) > 0) - 1.0       # [C, P]
  if margins.ndim == 3:
    return jnp.mean(jnp.minimum(sign[None, :, :, None] * margins[:, None], cap), axis=(-2, -1))
  return jnp.mean(jnp.minimum(sign[None] * margins[:, None, :], cap), axis=-1)


def make(*, chunk: int = 128, temperature: float = 1.0, tau: float | None = None,
         class_surrogate: str = 'parts', pixels: str = 'top_k') -> base.Defense:
  """UnMask as a registry defense: nothing is learned beyond K's own extraction thresholds.

  Args:
    chunk: images per jitted call.
    temperature: of the surrogate's soft part presence sigmoid(m_p / temperature) (logit units).
    tau: temperature of the surrogate's corrected-class logits (None: 1.0 for 'parts', whose
      logits are in K's logit units, 0.05 for 'jaccard', whose similarities are in [0, 1]).
    class_surrogate: the surrogate's corrected-class logits: 'parts' = `part_agreement` / tau
      (hinge on K's part margins; what an attacker steering K's parts needs) or 'jaccard' = soft
      J(V[c], s) / tau.
    pixels: the part margins of the 'parts' class surrogate: 'top_k' = all k = ceil(min_area)
      largest pixel margins per part (a gradient through k pixels), 'kth' = the k-th alone.
  """
  if tau is None:
    tau = 1.0 if class_surrogate == 'parts' else 0.05
  if not temperature > 0 or not tau > 0:
    raise ValueError(f'temperature and tau must be > 0, got {temperature}, {tau}')
  if class_surrogate not in CLASS_SURROGATES:
    raise ValueError(f'class_surrogate must be one of {CLASS_SURROGATES}, got {class_surrogate!r}')
  if pixels not in PIXELS:
    raise ValueError(f'pixels must be one of {PIXELS}, got {pixels!r}')
  name = 'unmask'

  def fit(ctx, data, key):
    del data, key
    base.require(ctx, name, 'logits_fn', 'parts_fn', 'parts_matrix')
    return {'parts_matrix': jnp.asarray(ctx.parts_matrix, jnp.float32)}

  def apply(state, ctx, x, key):
    del key
    predicted = jnp.argmax(ctx.logits_fn(x), axis=-1)
    extracted = ctx.parts_fn(x)
    v = state['parts_matrix']
    return base.Decision(detection_scores(extracted, predicted, v), rectify(extracted, predicted, v))

  def surrogate(state, ctx, x, key):
    del key
    predicted = jnp.argmax(ctx.logits_fn(x), axis=-1)
    top = part_extraction.top_margins_of(ctx.parts_fn, x)          # [N, P, k]
    margins = top[..., -1]
    sims = soft_jaccard(jax.nn.sigmoid(margins / temperature), state['parts_matrix'])
    score = 1.0 - jnp.take_along_axis(sims, predicted[:, None], axis=1)[:, 0]
    if class_surrogate == 'parts':
      hinge_on = top if pixels == 'top_k' else margins
      return base.Surrogate(score, part_agreement(hinge_on, state['parts_matrix']) / tau)
    return base.Surrogate(score, sims / tau)

  return base.Defense(name, fit, apply, surrogate, corrects=True, chunk=chunk)
