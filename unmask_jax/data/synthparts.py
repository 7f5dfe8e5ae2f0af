"""SynthParts: the embedded, procedurally generated part dataset (no download needed).

Each image shows one object of a class in `parts.SYNTH_CLASSES` (the classes of the UnMask class
sets). The object is a random subset (>= 2 visible) of its class's robust parts from the
class->parts table, drawn at class-specific layout positions with random position, scale, a
small rotation and jittered colours, over a random background with non-part clutter.

Every part has its own glyph: a shape (8 kinds) x a two-colour pattern (6 kinds) x a hue family.
A part shared by several classes (eye, head, leg, headlight, ...) is drawn with the same glyph in
all of them, so it carries no class information by itself; that is what makes the feature
overlap of a class set matter, as in the paper. Colours are jittered around the part's hue
family (so "random colours" never turn one part into another) while background clutter uses
random saturated thin strokes, so that a segmenter must use shape and texture as well as hue.

Examples are generated from `np.random.default_rng([seed, split, index])`, so they are
deterministic, independent of generation order, and the splits never share an example.
"""
from __future__ import annotations

import colorsys
import dataclasses
import functools
import math

import numpy as np

from unmask_jax.data import parts

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'ring', 'cross', 'semicircle', 'frame')
PATTERNS = ('solid', 'hstripes', 'vstripes', 'checker', 'dots', 'diagonal')
_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}
_MIN_VISIBLE_PIXELS = 5   # a part is "present" only if at least this many mask pixels show it
_MAX_PARTS_SHOWN = 4


def glyph_of(part_index: int) -> tuple[str, str, float]:
  """(shape, pattern, hue) of a part; every part of the vocabulary gets a distinct triple."""
  # (index mod 8, index div 8) is a bijection onto the 48 pairs; the shift 3*shape spreads the
  # patterns so neighbouring ids do not share one.
  s, q = part_index % len(SHAPES), part_index // len(SHAPES)
  if q >= len(PATTERNS):
    raise ValueError(f'only {len(SHAPES) * len(PATTERNS)} distinct glyphs; part index {part_index}')
  shape = SHAPES[s]
  pattern = PATTERNS[(q + 3 * s) % len(PATTERNS)]
  hue = (part_index * 0.6180339887) % 1.0
  return shape, pattern, hue


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  r2 = u * u + v * v
  au, av = np.abs(u), np.abs(v)
  if shape == 'circle':
    return r2 <= 1.0
  if shape == 'square':
    return np.maximum(au, av) <= 0.82
  if shape == 'triangle':
    return (v <= 0.8) & (v >= -1.0 + 2.0 * au)
  if shape == 'diamond':
    return au + av <= 1.0
  if shape == 'ring':
    return (r2 <= 1.0) & (r2 >= 0.3)
  if shape == 'cross':
    return (np.maximum(au, av) <= 0.95) & (np.minimum(au, av) <= 0.35)
  if shape == 'semicircle':
    return (r2 <= 1.0) & (v <= 0.15)
  if shape == 'frame':
    m = np.maximum(au, av)
    return (m <= 0.9) & (m >= 0.5)
  raise ValueError(shape)


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """True where the glyph shows its secondary colour."""
  f = 1.6  # stripes per unit radius: ~3 bands across a glyph, visible at 32x32
  if pattern == 'solid':
    return np.zeros(u.shape, bool)
  if pattern == 'hstripes':
    return np.floor((v + 1) * f) % 2 == 1
  if pattern == 'vstripes':
    return np.floor((u + 1) * f) % 2 == 1
  if pattern == 'checker':
    return (np.floor((u + 1) * f) + np.floor((v + 1) * f)) % 2 == 1
  if pattern == 'dots':
    return (np.mod(u * f, 1) - 0.5) ** 2 + (np.mod(v * f, 1) - 0.5) ** 2 < 0.09
  if pattern == 'diagonal':
    return np.floor((u + v + 2) * f * 0.8) % 2 == 1
  raise ValueError(pattern)


@functools.lru_cache(maxsize=None)
def class_layout(class_name: str) -> dict[str, tuple[float, float]]:
  """Fixed, class-specific positions of each of the class's parts in the object frame [-1, 1]^2."""
  names = parts.CLASS_PARTS[class_name]
  rng = np.random.default_rng([7919, sum(map(ord, class_name)), len(class_name)])
  pos: list[np.ndarray] = []
  min_dist = 0.55
  while len(pos) < len(names):
    for _ in range(2000):
      p = rng.uniform(-0.8, 0.8, size=2)
      if all(np.linalg.norm(p - q) >= min_dist for q in pos):
        pos.append(p)
        break
    else:  # too crowded: relax and start over
      pos, min_dist = [], min_dist * 0.9
  return {n: (float(p[0]), float(p[1])) for n, p in zip(names, pos)}


def _hsv(h, s, v) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h % 1.0, np.clip(s, 0, 1), np.clip(v, 0, 1)), np.float32)


def _background(rng: np.random.Generator, size: int, yy, xx) -> np.ndarray:
  """Smooth two-colour gradient plus low-frequency blobs and thin random strokes (clutter)."""
  c0 = _hsv(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.9))
  c1 = _hsv(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.9))
  a = rng.uniform(0, 2 * math.pi)
  t = ((np.cos(a) * xx + np.sin(a) * yy) / size + 1) / 2
  img = c0 * (1 - t[..., None]) + c1 * t[..., None]
  for _ in range(rng.integers(1, 4)):  # soft blobs
    cx, cy = rng.uniform(0, size, 2)
    rad = rng.uniform(0.1, 0.3) * size
    w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad * rad))[..., None] * rng.uniform(0.2, 0.5)
    img = img * (1 - w) + _hsv(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.2, 1)) * w
  for _ in range(rng.integers(1, 4)):  # thin strokes with saturated random colours
    x0, y0 = rng.uniform(0, size, 2)
    a = rng.uniform(0, math.pi)
    dist = np.abs(-(xx - x0) * np.sin(a) + (yy - y0) * np.cos(a))
    along = np.abs((xx - x0) * np.cos(a) + (yy - y0) * np.sin(a))
    line = (dist < 0.6) & (along < rng.uniform(0.2, 0.6) * size)
    img[line] = _hsv(rng.uniform(), rng.uniform(0.5, 1), rng.uniform(0.5, 1))
  return img


def render_example(rng: np.random.Generator, class_name: str, size: int = 32):
  """Draws one example.

  Returns:
    image: uint8 [size, size, 3]; mask: uint8 [size, size] with 0 = background and
    `part_index + 1` for each part; presence: uint8 [NUM_PARTS], 1 where the part shows at
    least `_MIN_VISIBLE_PIXELS` pixels in the mask (so presence and mask always agree).
  """
  if size < 24:
    raise ValueError(f'SynthParts image size {size} is too small to hold distinguishable parts; '
                     'use at least 24 (default 32).')
  layout = class_layout(class_name)
  names = list(layout)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  for _ in range(100):  # resample until at least two parts are visible (or the class has < 2)
    img = _background(rng, size, yy, xx)
    mask = np.zeros((size, size), np.uint8)
    half = size / 2
    radius = rng.uniform(0.62, 0.85) * half          # object half-extent in pixels
    glyph_r = radius * rng.uniform(0.33, 0.4)
    reach = 0.8 * radius + glyph_r
    cx, cy = rng.uniform(min(reach, half), max(size - reach, half), size=2)
    theta = rng.uniform(-1, 1) * math.radians(15)
    ct, st = math.cos(theta), math.sin(theta)
    # A faint body behind the parts, with the same statistics for every class.
    body_col = _hsv(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.35, 0.85))
    bu = ((xx - cx) * ct + (yy - cy) * st) / (radius * rng.uniform(0.9, 1.1))
    bv = (-(xx - cx) * st + (yy - cy) * ct) / (radius * rng.uniform(0.9, 1.1))
    img[bu * bu + bv * bv <= 1.0] = body_col
    k = int(rng.integers(2, min(_MAX_PARTS_SHOWN, len(names)) + 1)) if len(names) > 2 else len(names)
    chosen = rng.choice(len(names), size=k, replace=False)
    for j in chosen:
      name = names[j]
      pid = parts.part_id(name)
      shape, pattern, hue = glyph_of(pid)
      ox, oy = layout[name]
      px = cx + radius * (ox * ct - oy * st)
      py = cy + radius * (ox * st + oy * ct)
      r = glyph_r * rng.uniform(0.9, 1.1)
      a = theta + rng.uniform(-1, 1) * math.radians(8)
      x0, x1 = max(int(px - r - 1), 0), min(int(px + r + 2), size)
      y0, y1 = max(int(py - r - 1), 0), min(int(py + r + 2), size)
      if x0 >= x1 or y0 >= y1:
        continue
      dx, dy = xx[y0:y1, x0:x1] - px, yy[y0:y1, x0:x1] - py
      u = (dx * math.cos(a) + dy * math.sin(a)) / r
      v = (-dx * math.sin(a) + dy * math.cos(a)) / r
      inside = _shape_mask(shape, u, v)
      sat, val = rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
      h = hue + rng.uniform(-0.03, 0.03)
      primary, secondary = _hsv(h, sat, val), _hsv(h, sat * 0.5, val * 0.35)
      colour = np.where(_pattern(pattern, u, v)[..., None], secondary, primary)
      region = img[y0:y1, x0:x1]
      region[inside] = colour[inside]
      mask[y0:y1, x0:x1][inside] = pid + 1
    counts = np.bincount(mask.ravel(), minlength=parts.NUM_PARTS + 1)[1:]
    visible = counts >= _MIN_VISIBLE_PIXELS
    mask[np.isin(mask, np.flatnonzero(~visible) + 1)] = 0  # slivers are not parts
    if visible.sum() >= min(2, len(names)):
      image = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
      return image, mask, visible.astype(np.uint8)
  raise RuntimeError(f'could not draw a {class_name} with two visible parts at size {size}')


def generate_split(split: str, n_per_class: int, *, seed: int = 0, size: int = 32,
                   classes: tuple[str, ...] = parts.SYNTH_CLASSES):
  """Yields (key, example dict) for a split, classes interleaved, deterministic in `seed`."""
  if split not in _SPLIT_IDS:
    raise ValueError(f'Unknown split {split!r}; valid: {", ".join(_SPLIT_IDS)}')
  for i in range(n_per_class * len(classes)):
    label = i % len(classes)
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
    image, mask, presence = render_example(rng, classes[label], size)
    yield i, {'image': image, 'mask': mask, 'parts': presence, 'label': label}


@dataclasses.dataclass(frozen=True)
class SynthPartsSpec:
  """Size and seed of a SynthParts build (a tfds BuilderConfig is made from it)."""
  size: int = 32
  seed: int = 0
  train_per_class: int = 1000
  validation_per_class: int = 200
  test_per_class: int = 200

  @property
  def name(self) -> str:
    return (f's{self.size}_seed{self.seed}_n{self.train_per_class}-'
            f'{self.validation_per_class}-{self.test_per_class}')

  def per_class(self, split: str) -> int:
    return {'train': self.train_per_class, 'validation': self.validation_per_class,
            'test': self.test_per_class}[split]


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets builder (array_record files, read back with `as_data_source`; no TensorFlow).

import tensorflow_datasets as tfds  # noqa: E402  (kept below the pure-numpy renderer on purpose)

from unmask_jax.data import tfds_io  # noqa: E402


class SynthPartsConfig(tfds.core.BuilderConfig):
  """BuilderConfig wrapping a `SynthPartsSpec`."""

  def __init__(self, spec: SynthPartsSpec):
    super().__init__(name=spec.name, description=f'SynthParts {spec}')
    self.spec = spec


class SynthParts(tfds.core.GeneratorBasedBuilder):
  """tfds builder of SynthParts; see the module docstring."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [SynthPartsConfig(SynthPartsSpec())]

  def _info(self):
    s = self.builder_config.spec.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds_io.part_features(s, parts.SYNTH_CLASSES),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: everything is generated
    spec = self.builder_config.spec
    return {split: generate_split(split, spec.per_class(split), seed=spec.seed, size=spec.size)
            for split in _SPLIT_IDS}

  def _generate_examples(self):  # pragma: no cover - generators come from _split_generators
    raise NotImplementedError


def builder(data_dir: str, **spec_kwargs) -> SynthParts:
  spec = SynthPartsSpec(**spec_kwargs)
  # tfds refuses a custom config that shares a name with a registered one: pass the name then.
  known = {c.name for c in SynthParts.BUILDER_CONFIGS}
  config = spec.name if spec.name in known else SynthPartsConfig(spec)
  return SynthParts(data_dir=data_dir, config=config, file_format='array_record')


def load(split: str, *, data_dir: str, **spec_kwargs):
  """Builds SynthParts if needed (seconds) and returns a split as an `ArrayDataset`."""
  from unmask_jax.data.base import ArrayDataset
  from unmask_jax.data.tfds_io import quiet, read_all
  with quiet():
    b = builder(data_dir, **spec_kwargs)
  if split not in _SPLIT_IDS:
    raise ValueError(f'Unknown split {split!r}; valid: {", ".join(_SPLIT_IDS)}')
  arrays = read_all(b, split, keys=('image', 'mask', 'parts', 'label'))
  return ArrayDataset(arrays=arrays, class_names=parts.SYNTH_CLASSES, name='synthparts',
                      source=f'synthparts/{b.builder_config.name}/{split}')
