"""Fixed-shape batching of in-memory datasets, and input validation.

Every batch has exactly `batch_size` rows so jitted steps compile once. The last partial batch
is either dropped (training) or padded by repeating row 0 (evaluation); padded rows are marked
with `valid = False` and must be excluded from metrics.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def num_batches(n: int, batch_size: int, remainder: str = 'pad') -> int:
  if remainder == 'drop':
    return n // batch_size
  return -(-n // batch_size)


def batches(arrays: dict[str, np.ndarray], batch_size: int, *, seed: int | None = None,
            epoch: int = 0, remainder: str = 'pad', start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields dicts of fixed-shape numpy batches plus a boolean 'valid' row mask.

  Args:
    arrays: same-length arrays (e.g. 'image', 'label').
    batch_size: rows per batch.
    seed: if given, rows are shuffled by `np.random.default_rng([seed, epoch])`.
    epoch: mixed into the shuffle so each epoch has its own order (and a resumed run repeats it).
    remainder: 'pad' (repeat row 0, valid=False) or 'drop' the last partial batch.
    start: index of the first batch to yield (to resume mid-epoch).
  """
  if remainder not in ('pad', 'drop'):
    raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  n = len(next(iter(arrays.values())))
  if any(len(v) != n for v in arrays.values()):
    raise ValueError(f'arrays have different lengths: { {k: len(v) for k, v in arrays.items()} }')
  order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
  for b in range(start, num_batches(n, batch_size, remainder)):
    idx = order[b * batch_size:(b + 1) * batch_size]
    valid = np.ones(batch_size, bool)
    if len(idx) < batch_size:
      valid[len(idx):] = False
      idx = np.concatenate([idx, np.full(batch_size - len(idx), order[0])])
    out = {k: v[idx] for k, v in arrays.items()}
    out['valid'] = valid
    yield out


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1] (the only pixel convention models and attacks see)."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def validate_images(x, *, channels: int | None = None, name: str = 'images') -> None:
  """Raises ValueError unless x is a finite float batch [N, H, W, C] with values in [0, 1]."""
  x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f'{name} must have rank 4 [N, H, W, C], got shape {x.shape}')
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f'{name} must have {channels} channel(s) (NHWC), got shape {x.shape}')
  if x.dtype == np.uint8:
    raise ValueError(f'{name} are uint8; convert with data.pipeline.to_float (pixels in [0, 1])')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} contain NaN or infinite values')
  lo, hi = float(x.min()), float(x.max())
  if lo < 0.0 or hi > 1.0:
    hint = ' (looks like 0..255: divide by 255)' if hi > 1.5 else ''
    raise ValueError(f'{name} must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]{hint}')


def validate_labels(y, num_classes: int, name: str = 'labels') -> None:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{name} must be a 1-D integer array, got {y.dtype} {y.shape}')
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f'{name} must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]')
