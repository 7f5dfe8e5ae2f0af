"""MRR defender module (Rouhani et al. 2018, Rouhani et al., "CuRTAIL" / modular robust redundancy).

A defender is a copy of the victim's architecture up to the penultimate layer (its `features`),
trained from its own random initialisation, whose features are L2-normalised onto the unit sphere:

  z(x) = f(x) / ||f(x)||_2,   logits = W z + b,

plus one learnable centre c_k per class. It is trained with cross-entropy + lambda * center loss
(`center_loss`, lambda = 0.01 in Rouhani et al. 2018), which makes each class a tight cluster around its
centre; the detector (`defenses/mrr.py`) then measures how far an input's z lies from the centre
of the class the VICTIM predicted. Defenders never see adversarial examples.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unmask_jax.models import base as model_base


def l2_normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  """z / max(||z||_2, eps) along the last axis (eps keeps an all-zero ReLU output finite)."""
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)


def center_loss(z: jax.Array, labels: jax.Array, centers: jax.Array) -> jax.Array:
  """Per-example center loss of Rouhani et al. 2018: pull to the own centre, push the nearest other away.

    L_i = ||z_i - c_{y_i}||^2 - min_{k != y_i} ||z_i - c_k||^2 + (1/K) sum_k (||c_k||^2 - 1)^2

  The first term tightens each class; the second moves the nearest wrong centre away from the
  sample (so clusters separate); the last keeps the centres near the unit sphere on which z lives,
  which also bounds the push term (all distances are <= ~4). Returns [N].
  """
  d2 = jnp.sum(jnp.square(z[:, None, :] - centers[None]), axis=-1)      # [N, K]
  own = jnp.take_along_axis(d2, labels[:, None], axis=1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, centers.shape[0], dtype=bool), jnp.inf, d2)
  nearest = jnp.min(others, axis=1)
  nearest = jnp.where(jnp.isfinite(nearest), nearest, 0.0)             # one class: no push
  unit = jnp.mean(jnp.square(jnp.sum(jnp.square(centers), axis=-1) - 1.0))
  return own - nearest + unit


class Defender(model_base.Classifier):
  """One MRR defender: `base`'s trunk, L2-normalised features, a linear head and class centres.

  Args:
    num_classes, in_channels, rngs: as for every classifier.
    base: registry name of the victim's architecture (e.g. 'cnn_small').
    base_kwargs: its options (the victim's `model.kwargs`), so the trunk is the same network.
  """

  def __init__(self, *, num_classes: int, in_channels: int = 3, base: str = 'cnn_small',
               base_kwargs: dict | None = None, rngs: nnx.Rngs):
    from unmask_jax import models
    self.trunk = models.create(base, num_classes=num_classes, in_channels=in_channels, rngs=rngs,
                               **dict(base_kwargs or {}))
    self.in_channels = in_channels
    self.num_classes = num_classes
    self.feature_dim = self.trunk.feature_dim
    self.fc = model_base.dense(self.feature_dim, num_classes, rngs=rngs)
    # Random unit vectors: distinct starting centres (all-zero centres would tie the push term).
    c = jax.random.normal(rngs.params(), (num_classes, self.feature_dim))
    self.centers = nnx.Param(l2_normalize(c))

  def features(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return l2_normalize(self.trunk.features(x, dropout_key=dropout_key))

  def head(self, feats: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    del dropout_key
    return self.fc(feats)

  def center_loss(self, feats: jax.Array, labels: jax.Array) -> jax.Array:
    return center_loss(feats, labels, self.centers[...])


def mrr_defender(*, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs,
                 base: str = 'cnn_small', base_kwargs: dict[str, Any] | None = None) -> Defender:
  """An MRR defender over the architecture `base` (see `Defender`)."""
  if base == 'mrr_defender':
    raise ValueError('an MRR defender needs the victim architecture as base, not mrr_defender')
  return Defender(num_classes=num_classes, in_channels=in_channels, base=base,
                  base_kwargs=base_kwargs, rngs=rngs)
