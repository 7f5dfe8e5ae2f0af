"""PASCAL-Part (VOC2010 images + part masks) from a user's manual directory.

Expected layout (nothing is downloaded; both archives need a manual download):

  <manual_dir>/JPEGImages/<id>.jpg          VOC2010 images (VOCtrainval_03-May-2010)
  <manual_dir>/Annotations_Part/<id>.mat    PASCAL-Part annotations (trainval.tar.gz)

`manual_dir` defaults to `<data_dir>/downloads/manual/pascal_part`. The converted dataset is
cached in `<data_dir>/pascal_part/<config>/`, where the config name hashes the options and the
directory's listing (file names and sizes): the manual directory must stay in place, and a
changed directory is converted again.

Each .mat holds `anno.objects`, a struct array with per object `class`, `class_ind`, `mask`
(the whole-object silhouette, not used) and `parts`, a struct array of (`part_name`, `mask`).
Fine-grained part names are merged into the robust parts of `parts.PART_NAMES` by
`merge_part_name`, which matches WHOLE names with anchored patterns. The original UnMask code
tested substrings, which turned every `headlight_<n>` into `head` and `handlebar` into `hand`.

Labels: one per image, over `CLASSES` (the VOC classes that have a row in the class->parts
table). An image whose objects belong to more than one VOC class is skipped and counted (the
original code kept an arbitrary one of the labels); `allow_multiclass=True` keeps it and labels
it with the labelled class that covers the most object pixels. Images with no labelled class
(e.g. only boats or chairs, which have no parts) are skipped and counted too.

Masks: all kept part masks of all objects are painted into one label map (0 = background,
part id + 1), largest first, so that a part lying on top of a bigger one (an eye on a head,
a headlight on a side of a car) stays visible. After resizing to `size` x `size` (bilinear
image, nearest-neighbour mask), parts with fewer than `min_part_pixels` pixels are erased from
the mask, and the presence vector `parts` is exactly the set of part ids left in the mask.

Splits: train / validation / test = 80/10/10 by a hash of the image id (`split_of`).

A malformed .mat, a missing or unreadable JPEG, or a mask whose size differs from its image is
skipped and reported (logging.warning, the dataset's stored metadata, `ArrayDataset.source`);
such an example is never given a label.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re

import numpy as np

from unmask_jax.data import parts
from unmask_jax.data.image_folder import (SPLITS, check_split, hash_split, metadata_report,
                                          read_image_rgb, read_split, record_skip,
                                          resize_image, resize_mask, warn_skipped)

# The 20 VOC classes in their standard (alphabetical) order.
VOC_CLASSES: tuple[str, ...] = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')
# Labels: the VOC classes with parts in the class->parts table (boat, chair, diningtable and
# sofa only have silhouettes in PASCAL-Part), in VOC order.
CLASSES: tuple[str, ...] = tuple(c for c in VOC_CLASSES if c in parts.CLASS_PARTS)

_SIDES = {'front': 'front', 'left': 'left', 'right': 'right', 'back': 'back', 'roof': 'top'}
_N = r'(?:_\d+)?'  # PASCAL-Part numbers repeated parts: door_1, wheel_2, cfrontside_3, ...

# (anchored pattern, robust part) for the class-independent names. Every pattern must match
# a whole name; see the module docstring for why substrings are never used.
_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r'head', 'head'),                       # person/animal/bird head, train locomotive head
    (r'[lr]eye', 'eye'),
    (r'[lr]ear', 'ear'),
    (r'[lr]ebrow', 'eyebrow'),
    (r'[lr][lu]arm', 'arm'),                 # lower/upper arm
    (r'[lr]hand', 'hand'),
    (r'[lr]foot', 'foot'),
    # The 18 leg names: side, optional front/back, optional lower/upper:
    # lleg (bird), lfleg (cat, dog), lfuleg / lflleg (cow, horse, sheep), llleg / luleg (person).
    (r'[lr][fb]?[lu]?leg', 'leg'),
    (r'[lr][fb]pa', 'paw'),
    (r'[lr][fb]ho', 'hoof'),
    (r'[lr]horn', 'horn'),
    (r'[lr]wing', 'wing'),
    (r'(?:[fb]|chain)?wheel' + _N, 'wheel'),  # wheel_<n>, fwheel, bwheel, chainwheel
    (r'headlight' + _N, 'headlight'),
    (r'door' + _N, 'door'),
    (r'window' + _N, 'window'),
    (r'engine' + _N, 'engine'),
    (r'(?:left|right)mirror', 'mirror'),
    (r'[fb]liplate|plate', 'licenseplate'),   # front / back licence plate
    (r'(?:nose|mouth|hair|torso|neck|tail|muzzle|beak|body|cap|pot|plant|screen|stern|saddle'
     r'|handlebar)', None),                  # already robust: kept as they are
))
# Sides: cars and buses have frontside/leftside/...; trains have numbered coach sides
# (cfrontside_1, ...), merged into coach_front/left/right/back/top as the original UnMask code
# did, and locomotive head sides (hfrontside, ...), which the original code DROPS (no rule
# matches them): dropped here too, so that K is trained on the original's part vocabulary.
_VEHICLE_SIDE = re.compile(r'(front|left|right|back|roof)side')
_TRAIN_SIDE = re.compile(r'c(front|left|right|back|roof)side' + _N)
_WHOLE_COACH = re.compile(r'coach' + _N)  # a whole carriage, like a whole-object mask: skipped


def merge_part_name(fine: str, obj_class: str) -> str | None:
  """Maps a PASCAL-Part part name to a robust part of `parts.PART_NAMES`, or None to drop it.

  Whole names only: 'headlight_2' -> 'headlight' (never 'head'), 'handlebar' -> 'handlebar'
  (never 'hand'). Returns None for names without a rule (e.g. 'coach_1', whole carriages) and
  for robust parts that are not in the class->parts row of `obj_class` (e.g. a bicycle's
  headlight), so that every kept part is one the UnMask defense expects for that class.
  """
  name = fine.strip().lower()
  robust = None
  if obj_class in ('car', 'bus') and _VEHICLE_SIDE.fullmatch(name):
    side = _SIDES[_VEHICLE_SIDE.fullmatch(name).group(1)]
    robust = 'frontside' if side == 'front' else f'vehicle_{side}'
  elif obj_class == 'train' and _TRAIN_SIDE.fullmatch(name):
    robust = f'coach_{_SIDES[_TRAIN_SIDE.fullmatch(name).group(1)]}'
  elif not _WHOLE_COACH.fullmatch(name):
    for pattern, target in _RULES:
      if pattern.fullmatch(name):
        robust = target or name
        break
  if robust is None or robust not in parts.CLASS_PARTS.get(obj_class, ()):
    return None
  return robust


def split_of(image_id: str) -> str:
  """The split of an image id such as '2008_000003' (80/10/10 by hash)."""
  return hash_split(image_id)


# ---------------------------------------------------------------------------------------------
# Reading one annotation.

class MalformedAnnotation(ValueError):
  """The .mat file does not have the PASCAL-Part layout."""


def _records(x) -> list:
  """The elements of a MATLAB struct array as loaded by scipy (any shape, possibly empty)."""
  x = np.asarray(x)
  if x.dtype.names is None:
    if x.size == 0:
      return []
    raise MalformedAnnotation(f'expected a struct array, got {x.dtype} {x.shape}')
  return list(x.ravel())


def _string(x) -> str:
  x = np.asarray(x).ravel()
  if x.size == 0:
    return ''
  if x.dtype.kind not in 'US':
    raise MalformedAnnotation(f'expected a string, got {x.dtype}')
  return str(x[0])


def _field(rec, name: str):
  if rec.dtype.names is None or name not in rec.dtype.names:
    raise MalformedAnnotation(f'missing field {name!r}')
  return rec[name]


def read_annotation(path: str) -> list[dict]:
  """Parses a PASCAL-Part .mat into [{'class': str, 'parts': [(name, bool mask [H, W])]}].

  Raises:
    MalformedAnnotation (or whatever scipy raises on a corrupt file).
  """
  import scipy.io
  mat = scipy.io.loadmat(path)
  if 'anno' not in mat:
    raise MalformedAnnotation("no variable 'anno'")
  anno = _records(mat['anno'])
  if len(anno) != 1:
    raise MalformedAnnotation(f"'anno' has {len(anno)} elements, expected 1")
  objects = []
  for obj in _records(_field(anno[0], 'objects')):
    cls = _string(_field(obj, 'class'))
    if cls not in VOC_CLASSES:
      raise MalformedAnnotation(f'unknown object class {cls!r}')
    obj_mask = np.asarray(_field(obj, 'mask'))
    object_parts = []
    for p in _records(_field(obj, 'parts')):
      m = np.asarray(_field(p, 'mask'))
      if m.ndim != 2:
        raise MalformedAnnotation(f'part mask of rank {m.ndim}')
      object_parts.append((_string(_field(p, 'part_name')), m != 0))
    objects.append({'class': cls, 'area': int(np.count_nonzero(obj_mask)),
                    'shape': obj_mask.shape, 'parts': object_parts})
  return objects


def object_label(objects: list[dict], allow_multiclass: bool) -> tuple[str | None, str]:
  """(label class or None, reason) for an image's objects; reason names why it is skipped."""
  classes = {o['class'] for o in objects}
  labelled = {c for c in classes if c in CLASSES}
  if not labelled:
    return None, 'no_labelled_class'
  if len(classes) > 1 and not allow_multiclass:
    return None, 'multiclass'
  area = collections.Counter()
  for o in objects:
    if o['class'] in labelled:
      area[o['class']] += o['area']
  # Largest covered area wins; ties go to the earlier class in CLASSES (deterministic).
  return max(sorted(labelled, key=CLASSES.index), key=lambda c: area[c]), ''


def paint_mask(objects: list[dict], shape: tuple[int, int],
               unmapped: collections.Counter | None = None) -> np.ndarray:
  """One label map (0 = background, part id + 1) from all objects' kept parts, largest first."""
  layers = []
  for o in objects:
    for fine, m in o['parts']:
      robust = merge_part_name(fine, o['class'])
      if robust is None:
        if unmapped is not None:
          unmapped[f'{o["class"]}/{fine}'] += 1
        continue
      if m.shape != shape:
        raise MalformedAnnotation(f'part mask {m.shape} does not match image {shape}')
      layers.append((int(m.sum()), parts.part_id(robust) + 1, m))
  out = np.zeros(shape, np.uint8)
  for _, value, m in sorted(layers, key=lambda t: -t[0]):  # stable: ties keep file order
    out[m] = value
  return out


def presence_from_mask(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, np.ndarray]:
  """Erases parts with fewer than `min_pixels` pixels; returns (mask, multi-hot presence)."""
  counts = np.bincount(mask.ravel(), minlength=parts.NUM_PARTS + 1)[1:parts.NUM_PARTS + 1]
  visible = counts >= max(min_pixels, 1)
  mask = np.where(np.isin(mask, np.flatnonzero(~visible) + 1), 0, mask).astype(np.uint8)
  return mask, visible.astype(np.uint8)


def check_manual_dir(manual_dir: str) -> None:
  """Raises FileNotFoundError naming what is missing from the manual directory."""
  need = {'JPEGImages': '*.jpg (VOC2010 images, VOCtrainval_03-May-2010.tar)',
          'Annotations_Part': '*.mat (PASCAL-Part annotations, trainval.tar.gz)'}
  missing = [d for d in need if not os.path.isdir(os.path.join(manual_dir, d))]
  if missing:
    lines = '\n'.join(f'  {os.path.join(manual_dir, d)}/{need[d]}' for d in need)
    raise FileNotFoundError(
        f'PASCAL-Part manual directory {manual_dir!r} is missing {", ".join(missing)}. '
        f'It must contain:\n{lines}\nDownload both archives by hand (nothing is downloaded '
        'automatically), extract them there, or pass manual_dir=... to the loader.')


def _annotation_files(manual_dir: str) -> list[str]:
  folder = os.path.join(manual_dir, 'Annotations_Part')
  return sorted(f for f in os.listdir(folder) if f.endswith('.mat') and not f.startswith('.'))


def _listing_digest(manual_dir: str) -> str:
  """Hash of the annotation and image names and sizes: a changed directory is rebuilt."""
  h = hashlib.sha1()
  for sub, ext in (('Annotations_Part', '.mat'), ('JPEGImages', '.jpg')):
    with os.scandir(os.path.join(manual_dir, sub)) as it:
      for name, size in sorted((e.name, e.stat().st_size) for e in it if e.name.endswith(ext)):
        h.update(f'{sub}/{name}\0{size}\n'.encode())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets builder (array_record, Tensor features: no TensorFlow needed).

import tensorflow_datasets as tfds  # noqa: E402  (the pure functions above need no tfds)

from unmask_jax.data import tfds_io  # noqa: E402


class PascalPartConfig(tfds.core.BuilderConfig):
  """A manual directory and conversion options."""

  def __init__(self, manual_dir: str, size: int, allow_multiclass: bool, min_part_pixels: int):
    manual_dir = os.path.abspath(manual_dir)
    key = json.dumps([manual_dir, size, allow_multiclass, min_part_pixels,
                      _listing_digest(manual_dir)])
    super().__init__(
        name=(f's{size}_{"multi" if allow_multiclass else "single"}_min{min_part_pixels}_'
              f'{hashlib.sha1(key.encode()).hexdigest()[:12]}'),
        description=f'PASCAL-Part from {manual_dir}')
    self.manual_dir = manual_dir
    self.size = size
    self.allow_multiclass = allow_multiclass
    self.min_part_pixels = min_part_pixels


class PascalPart(tfds.core.GeneratorBasedBuilder):
  """tfds builder of PASCAL-Part; see the module docstring."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    s = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds_io.part_features(s, CLASSES),
        supervised_keys=('image', 'label'),
        homepage='http://roozbehm.info/pascal-parts/pascal-parts.html',
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # the manual directory is given by the config, not tfds' manual_dir
    check_manual_dir(self.builder_config.manual_dir)
    # Filled in place while the splits are generated; tfds writes the metadata afterwards.
    self._report: dict = {}
    self._unmapped: dict = {}
    self.info.metadata['skipped'] = self._report
    self.info.metadata['unmapped_part_names'] = self._unmapped
    files = _annotation_files(self.builder_config.manual_dir)
    by_split = {s: [f for f in files if split_of(f[:-4]) == s] for s in SPLITS}
    # tfds refuses to write an empty split; `read_split` reads a missing one as empty.
    return {s: self._generate(s, f) for s, f in by_split.items() if f}

  def _generate(self, split: str, files: list[str]):
    cfg = self.builder_config
    unmapped = collections.Counter()
    for f in files:
      image_id = f[:-4]
      try:
        objects = read_annotation(os.path.join(cfg.manual_dir, 'Annotations_Part', f))
      except Exception as e:  # noqa: BLE001 - any parse failure: skip and report, never guess
        record_skip(self._report, split, 'malformed_annotation', f, f'{type(e).__name__}: {e}')
        continue
      label, reason = object_label(objects, cfg.allow_multiclass)
      if label is None:
        record_skip(self._report, split, reason, image_id, quiet=True)
        continue
      jpg = os.path.join(cfg.manual_dir, 'JPEGImages', image_id + '.jpg')
      if not os.path.exists(jpg):
        record_skip(self._report, split, 'missing_image', image_id + '.jpg')
        continue
      try:
        image = read_image_rgb(jpg)
      except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        record_skip(self._report, split, 'unreadable_image', image_id + '.jpg',
                    f'{type(e).__name__}: {e}')
        continue
      try:
        if any(o['shape'] != image.shape[:2] for o in objects):
          raise MalformedAnnotation(f'object mask size differs from image {image.shape[:2]}')
        image_unmapped = collections.Counter()
        full_mask = paint_mask(objects, image.shape[:2], image_unmapped)
      except MalformedAnnotation as e:
        record_skip(self._report, split, 'malformed_annotation', f, str(e))
        continue
      unmapped.update(image_unmapped)
      self._unmapped[split] = dict(sorted(unmapped.items()))
      mask, presence = presence_from_mask(resize_mask(full_mask, cfg.size), cfg.min_part_pixels)
      yield image_id, {'image': resize_image(image, cfg.size), 'mask': mask, 'parts': presence,
                       'label': CLASSES.index(label)}

  def _generate_examples(self):  # pragma: no cover - generators come from _split_generators
    raise NotImplementedError


def builder(data_dir: str, *, manual_dir: str | None = None, size: int = 150,
            allow_multiclass: bool = False, min_part_pixels: int = 5) -> PascalPart:
  manual_dir = manual_dir or os.path.join(data_dir, 'downloads', 'manual', 'pascal_part')
  check_manual_dir(manual_dir)
  config = PascalPartConfig(manual_dir, size, allow_multiclass, min_part_pixels)
  return PascalPart(data_dir=data_dir, config=config, file_format='array_record')


def load(split: str, *, data_dir: str, manual_dir: str | None = None, size: int = 150,
         allow_multiclass: bool = False, min_part_pixels: int = 5):
  """Builds PASCAL-Part from the manual directory if needed and returns a split.

  Args:
    split: 'train', 'validation' or 'test'.
    data_dir: cache directory (the converted dataset goes to data_dir/pascal_part/...).
    manual_dir: the directory with JPEGImages/ and Annotations_Part/ (default
      data_dir/downloads/manual/pascal_part).
    size: images and masks are resized to size x size.
    allow_multiclass: keep images with objects of several classes (label = largest class).
    min_part_pixels: parts smaller than this after resizing are erased from mask and presence.
  """
  from unmask_jax.data.base import ArrayDataset
  check_split(split)
  if size < 1:
    raise ValueError(f'size must be >= 1, got {size}')
  b = builder(data_dir, manual_dir=manual_dir, size=size, allow_multiclass=allow_multiclass,
              min_part_pixels=min_part_pixels)
  arrays = read_split(b, split, ('image', 'mask', 'parts', 'label'),
                      {'image': (size, size, 3), 'mask': (size, size),
                       'parts': (parts.NUM_PARTS,)})
  summary = warn_skipped('pascal_part', metadata_report(b), split)
  unmapped = (b.info.metadata or {}).get('unmapped_part_names', {}).get(split, {})
  if unmapped:
    logging.getLogger(__name__).info('pascal_part %s: part names dropped (no rule or not a part '
                                     'of the class): %s', split, unmapped)
  source = f'pascal_part/{b.builder_config.name}/{split}'
  return ArrayDataset(arrays=arrays, class_names=CLASSES, name='pascal_part',
                      source=source + (f'|{summary}' if summary else ''))
