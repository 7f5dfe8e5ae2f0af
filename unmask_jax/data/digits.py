"""Digits: scikit-learn's bundled 8x8 handwritten digits, the embedded *real* dataset.

1797 images (UCI optical recognition of handwritten digits, test part) ship inside
scikit-learn, so this loads with no download. Pixel counts 0..16 become uint8 0..255 by
round(v * 255 / 16); images are [N, 8, 8, 1]. The split is stratified and deterministic: for
each class, its examples are permuted by `np.random.default_rng([seed, class])` and cut
60/20/20 into train/validation/test; each split keeps the original file order.
"""
from __future__ import annotations

import functools

import numpy as np

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
_FRACTIONS = {'train': (0.0, 0.6), 'validation': (0.6, 0.8), 'test': (0.8, 1.0)}


@functools.lru_cache(maxsize=1)
def _all() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
  return images, d.target.astype(np.int32)


def split_indices(labels: np.ndarray, split: str, seed: int) -> np.ndarray:
  """Sorted indices of `split`, stratified per class (60/20/20 of each class, rounded)."""
  lo, hi = _FRACTIONS[split]
  out = []
  for c in np.unique(labels):
    idx = np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))
    n = len(idx)
    out.append(idx[int(round(lo * n)):int(round(hi * n))])
  return np.sort(np.concatenate(out))


def load(split: str, *, data_dir: str | None = None, seed: int = 0):
  """Returns a split of the digits as an `ArrayDataset` (data_dir is unused: data is embedded).

  Args:
    split: 'train', 'validation' or 'test'.
    data_dir: accepted for the common loader signature; nothing is read or written.
    seed: seed of the stratified split.
  """
  del data_dir
  from unmask_jax.data.base import ArrayDataset
  if split not in _FRACTIONS:
    raise ValueError(f'Unknown split {split!r}; valid: {", ".join(_FRACTIONS)}')
  images, labels = _all()
  idx = split_indices(labels, split, seed)
  return ArrayDataset(arrays={'image': images[idx], 'label': labels[idx]},
                      class_names=CLASS_NAMES, name='digits',
                      source=f'digits/sklearn_load_digits/seed{seed}/{split}')
