"""The class -> robust-parts table of UnMask (Freitas et al., 2021, Table I) as data.

The table ships with the package (`class_parts.json`, a copy of the original code's
`object_dict`/`object_parts`). Part ids are global over the whole vocabulary so that every
dataset, K and the UnMask defense agree on them: id 0 is background, part `i` of `PART_NAMES`
has mask id `i + 1`.

Note: the table names 45 distinct parts, while the paper's text says 44: the 45th is `handlebar`
(bicycle, motorbike), which the original code's table has commented out. It is kept here because
PASCAL-Part annotates it and no class set uses it; the class sets use 36 of the parts and their
part counts and overlaps (Table II) reproduce exactly.
"""
from __future__ import annotations

import collections
import functools
import json
import pathlib

import numpy as np

_TABLE_PATH = pathlib.Path(__file__).with_name('class_parts.json')


@functools.lru_cache(maxsize=None)
def _table() -> dict:
  with open(_TABLE_PATH) as f:
    return json.load(f)


CLASS_PARTS: dict[str, tuple[str, ...]] = {
    c: tuple(p) for c, p in _table()['class_parts'].items()}
CLASS_SETS: dict[str, tuple[str, ...]] = {
    k: tuple(v) for k, v in _table()['class_sets'].items()}
PART_NAMES: tuple[str, ...] = tuple(sorted({p for ps in CLASS_PARTS.values() for p in ps}))
NUM_PARTS = len(PART_NAMES)
# The six classes SynthParts draws: those used by the paper's class sets, in a fixed order.
SYNTH_CLASSES: tuple[str, ...] = ('person', 'dog', 'bird', 'car', 'train', 'bottle')


def part_id(name: str) -> int:
  """Index of a part in `PART_NAMES` (mask id is this + 1)."""
  try:
    return PART_NAMES.index(name)
  except ValueError:
    raise KeyError(f'Unknown part {name!r}. Valid parts: {", ".join(PART_NAMES)}') from None


def class_set(name: str) -> tuple[str, ...]:
  """The classes of a class set such as 'cs3a' (case-insensitive)."""
  key = name.lower()
  if key not in CLASS_SETS:
    raise KeyError(f'Unknown class set {name!r}. Valid class sets: {", ".join(sorted(CLASS_SETS))}')
  return CLASS_SETS[key]


def parts_matrix(classes: tuple[str, ...] | list[str]) -> np.ndarray:
  """Binary matrix V [len(classes), NUM_PARTS]: V[c, p] = 1 if part p belongs to class c."""
  missing = [c for c in classes if c not in CLASS_PARTS]
  if missing:
    raise KeyError(f'Class(es) {missing} have no entry in the class->parts table. '
                   f'Known classes: {", ".join(sorted(CLASS_PARTS))}')
  v = np.zeros((len(classes), NUM_PARTS), np.float32)
  for i, c in enumerate(classes):
    for p in CLASS_PARTS[c]:
      v[i, part_id(p)] = 1.0
  return v


def overlap(classes: tuple[str, ...] | list[str]) -> tuple[int, float]:
  """(number of distinct parts, feature overlap) of a set of classes.

  Overlap = share of the set's distinct parts that belong to more than one of its classes
  (UnMask Table II: CS3a 29 / 6.89%, CS3b 18 / 50%, CS5a 34 / 23.53%, CS5b 34 / 29.41%).
  """
  counts = collections.Counter(p for c in classes for p in set(CLASS_PARTS[c]))
  n = len(counts)
  return n, sum(v > 1 for v in counts.values()) / n
