"""UnMask: detection and defense by robust building-block (part) knowledge.

Freitas, Chen, Wang & Chau, "UnMask: Adversarial Detection and Defense Through Robust Feature
Alignment", IEEE Big Data 2020 (arXiv:2002.09576).

Given an image x, the part extractor K gives the set of parts it sees, f_a = K(x), and the
victim M predicts class y_hat. With V the class->parts matrix (Table I):

  detection:  s = J(V[y_hat], f_a),  J(A, B) = |A ∩ B| / |A ∪ B|,  score d = 1 - s
              (x is flagged adversarial when d >= t; a ROC sweeps t).
  defense:    y_um = argmax_c J(V[c], f_a) over the classes of the class set.

Ties and the empty set (choices the paper leaves open, documented here):
  * J(A, B) = 0 when A ∪ B = ∅ (no evidence is not agreement). Classes always have parts, so
    this only matters for degenerate inputs.
  * When several classes share the best Jaccard score, UnMask keeps M's prediction if it is one
    of them (the parts do not contradict M), else it takes the tied class with the most matched
    parts |V[c] ∩ f_a|, and then the lowest class index.
  * When K extracts no part at all, every class scores 0, so the prediction falls back to M's
    prediction and the detection score is d = 1 (maximally suspicious).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unmask_jax.defenses import base


def jaccard(a, b):
  """Pairwise Jaccard similarity of multi-hot sets a [N, P] and b [C, P] -> [N, C].

  J = |a ∩ b| / |a ∪ b|, with J = 0 where the union is empty.
  """
  a = (jnp.asarray(a) > 0).astype(jnp.float32)
  b = (jnp.asarray(b) > 0).astype(jnp.float32)
  inter = a @ b.T
  union = a.sum(-1, keepdims=True) + b.sum(-1)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


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


@jax.jit
def _score_and_predict(logits_fn, parts_fn, parts_matrix, x):
  predicted = jnp.argmax(logits_fn(x), axis=-1)
  extracted = parts_fn(x)
  return detection_scores(extracted, predicted, parts_matrix), rectify(extracted, predicted, parts_matrix)


def _check_ctx(ctx: base.Context):
  if ctx.parts_fn is None or ctx.parts_matrix is None or ctx.logits_fn is None:
    raise ValueError('UnMask needs ctx.logits_fn (M), ctx.parts_fn (K) and ctx.parts_matrix.')


def _run(state, ctx, x, chunk):
  state = base.require_fitted(state, 'unmask')
  _check_ctx(ctx)
  base.check_images(x, 'unmask')
  lf, pf = base.as_partial(ctx.logits_fn, 'logits_fn'), base.as_partial(ctx.parts_fn, 'parts_fn')
  v = state['parts_matrix']
  # Fixed-size chunks: one compilation whatever the number of images, bounded memory.
  return base.map_chunks(lambda xb, _: dict(zip(('score', 'pred'), _score_and_predict(lf, pf, v, xb))),
                         x, chunk)


def make(*, chunk: int = 128) -> base.Defense:
  """UnMask as a registry defense: nothing is learned beyond K's own extraction thresholds."""

  def fit(ctx, data, key):
    del data, key
    _check_ctx(ctx)
    return {'parts_matrix': jnp.asarray(ctx.parts_matrix, jnp.float32)}

  def score(state, ctx, x, key):
    del key
    return _run(state, ctx, x, chunk)['score']

  def predict(state, ctx, x, key):
    del key
    return _run(state, ctx, x, chunk)['pred']

  return base.Defense('unmask', fit, score, predict)
