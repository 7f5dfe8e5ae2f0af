"""What the closeness detectors (`kde.py`, `kl.py`) share: M's last hidden activations and its
predicted classes, and the check of their training data (Tuna et al. 2021 §3.5; Feinman et al. 2017).

Both detectors compare the activation z = features_fn(x) with the training activations of the class
M PREDICTS for x (an adversarial example is predicted as a class whose training manifold it does
not lie on); class statistics are fitted on clean training data with the TRUE labels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.defenses import base
from unmask_jax.defenses.base import as_partial, check_images, map_chunks


@jax.jit
def _features_and_prediction(features_fn, logits_fn, x):
  z = features_fn(x).astype(jnp.float32)
  pred = jnp.argmax(logits_fn(x), axis=-1).astype(jnp.int32)
  return {'features': z.reshape(z.shape[0], -1), 'prediction': pred}


def features_and_predictions(ctx: base.Context, x, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """Last hidden activations [N, D] and M's predicted classes [N] (eval mode), in chunks."""
  ffn = as_partial(ctx.features_fn, 'features_fn')
  lfn = as_partial(ctx.logits_fn, 'logits_fn')
  out = map_chunks(lambda xb, _: _features_and_prediction(ffn, lfn, xb), x, chunk)
  return out['features'], out['prediction']


def check_data(data: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
  x, y = data['image'], np.asarray(data['label'])
  check_images(x, name)
  if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError(f'{name}: labels must be non-negative integers [N] matching the images, '
                     f'got {y.dtype} {y.shape} for {len(x)} images')
  return x, y.astype(np.int32)


__all__ = ['check_data', 'features_and_predictions']
