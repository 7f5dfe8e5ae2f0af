"""The in-memory dataset type every loader returns, and class-set selection."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """One split of a dataset held in memory.

  Attributes:
    arrays: 'image' uint8 [N, H, W, C] (pixels 0..255; models see them as floats in [0, 1]),
      'label' int32 [N]; part datasets add 'mask' uint8 [N, H, W] (0 = background, part id + 1)
      and 'parts' uint8 [N, NUM_PARTS] (multi-hot presence).
    class_names: label i is `class_names[i]`.
    name: dataset name in the registry.
    source: a description of what was loaded (builder config, files), used in fingerprints.
  """
  arrays: dict[str, np.ndarray]
  class_names: tuple[str, ...]
  name: str
  source: str = ''

  def __len__(self) -> int:
    return int(self.arrays['label'].shape[0])

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.arrays['image'].shape[1:])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def fingerprint(self) -> str:
    """A short hash of the data itself (labels and a pixel digest), to match stage outputs."""
    h = hashlib.sha1()
    h.update(json.dumps([self.name, list(self.class_names)]).encode())
    h.update(np.ascontiguousarray(self.arrays['label']).tobytes())
    h.update(np.ascontiguousarray(self.arrays['image']).tobytes())
    return h.hexdigest()[:16]

  def take(self, indices) -> 'ArrayDataset':
    return dataclasses.replace(self, arrays={k: v[indices] for k, v in self.arrays.items()})


def select_classes(ds: ArrayDataset, classes: tuple[str, ...] | list[str]) -> ArrayDataset:
  """Keeps the examples of `classes` and relabels them 0..len(classes)-1 in the given order."""
  missing = [c for c in classes if c not in ds.class_names]
  if missing:
    raise KeyError(f'Class(es) {missing} are not in dataset {ds.name!r}; '
                   f'it has: {", ".join(ds.class_names)}')
  old_ids = np.array([ds.class_names.index(c) for c in classes])
  lut = np.full(len(ds.class_names), -1, np.int32)
  lut[old_ids] = np.arange(len(classes), dtype=np.int32)
  keep = np.isin(ds.arrays['label'], old_ids)
  arrays = {k: v[keep] for k, v in ds.arrays.items()}
  arrays['label'] = lut[arrays['label']].astype(np.int32)
  return dataclasses.replace(ds, arrays=arrays, class_names=tuple(classes),
                             source=f'{ds.source}|classes={",".join(classes)}')
