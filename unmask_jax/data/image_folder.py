"""Class-named sub-folders of images: how users bring their own data (ImageNet subset, Flickr set).

Two layouts are accepted under `root`:

  root/<split>/<class>/*.{jpg,jpeg,png,bmp}   split folders: 'train', 'validation' (or 'val',
                                              'valid'), 'test'; used as they are.
  root/<class>/*.{jpg,jpeg,png,bmp}           no split folders: every file goes to train /
                                              validation / test (80/10/10) by a hash of its
                                              path relative to root, so adding files never
                                              moves existing ones between splits.

Images are converted to RGB and resized to `size` x `size` (bilinear). Labels follow `classes`
(default: the sorted class folder names). An empty class folder is an error; an unreadable image
is skipped and reported (logging.warning at build and load time, and in `ArrayDataset.source`).

The converted arrays are cached as a tfds dataset (array_record) in `data_dir/unmask_image_folder/`,
under a config named by a hash of the absolute root, the options and the file listing (names and
byte sizes), so a changed folder is rebuilt rather than served stale.

The image helpers (`read_image_rgb`, `resize_image`, `resize_mask`) and the skip-report helpers
are shared with the PASCAL-Part loader.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
from PIL import Image

SPLITS = ('train', 'validation', 'test')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
# Folder names accepted for each split in the split-folder layout.
SPLIT_DIR_NAMES = {'train': ('train',), 'validation': ('validation', 'val', 'valid'),
                   'test': ('test',)}
_MAX_NAMES_SHOWN = 5

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Image helpers (pure PIL / numpy).

def read_image_rgb(path: str) -> np.ndarray:
  """Decodes an image file into uint8 [H, W, 3] (grey, palette and alpha are converted to RGB).

  Raises whatever PIL raises for unreadable or truncated files; callers decide to skip.
  """
  with Image.open(path) as im:
    im.load()  # decode now, so truncated files fail here and not later
    return np.asarray(im.convert('RGB'), dtype=np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3], bilinear (aspect ratio is not kept)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """uint8 label map [H, W] -> [size, size] with nearest neighbour, so no label is invented."""
  if mask.shape == (size, size):
    return mask
  return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST), np.uint8)


def hash_split(key: str) -> str:
  """Deterministic 80/10/10 train/validation/test assignment from a string key."""
  bucket = int(hashlib.sha1(key.encode('utf-8')).hexdigest()[:8], 16) % 10
  return 'train' if bucket < 8 else ('validation' if bucket == 8 else 'test')


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {", ".join(SPLITS)}')


# ---------------------------------------------------------------------------------------------
# Skip reports: collected while a tfds builder generates a split, stored in the dataset's
# metadata (so they survive the cache), summarised again whenever the split is loaded.

def record_skip(report: dict, split: str, reason: str, name: str, detail: str = '',
                quiet: bool = False) -> None:
  """Adds one skipped file to `report[split][reason]`; logs it unless `quiet`.

  `quiet` is for expected, frequent skips (e.g. multi-class images), which only the per-split
  summary reports; broken files are always logged one by one.
  """
  report.setdefault(split, {}).setdefault(reason, []).append(name)
  if not quiet:
    log.warning('%s: skipped %s (%s)%s', split, name, reason, f': {detail}' if detail else '')


def skip_summary(report: dict, split: str) -> str:
  """One line such as 'skipped unreadable_image=2 (a.jpg, b.png)', or '' if nothing was skipped."""
  items = []
  for reason, names in sorted(report.get(split, {}).items()):
    shown = ', '.join(names[:_MAX_NAMES_SHOWN]) + (', ...' if len(names) > _MAX_NAMES_SHOWN else '')
    items.append(f'{reason}={len(names)} ({shown})')
  return ('skipped ' + '; '.join(items)) if items else ''


def warn_skipped(dataset: str, report: dict, split: str) -> str:
  """Logs the split's skip summary (the build-time warnings may have gone unseen) and returns it."""
  summary = skip_summary(report, split)
  if summary:
    log.warning('%s %s: %s', dataset, split, summary)
  return summary


def metadata_report(b) -> dict:
  """The skip report a builder stored in its metadata ({} if none)."""
  meta = b.info.metadata
  return dict(meta['skipped']) if meta is not None and 'skipped' in meta else {}


# ---------------------------------------------------------------------------------------------
# Folder scanning.

def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


def _image_files(folder: str) -> list[str]:
  """Image files under `folder` (recursively), as sorted paths relative to `folder`."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for f in filenames:
      if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS):
        out.append(os.path.relpath(os.path.join(dirpath, f), folder))
  return sorted(out)


def _split_dirs(root: str) -> dict[str, str]:
  """{split: folder name} of the split folders present under root (empty: flat layout)."""
  present = set(_subdirs(root))
  found = {}
  for split, names in SPLIT_DIR_NAMES.items():
    hits = [n for n in names if n in present]
    if len(hits) > 1:
      raise ValueError(f'{root} has several folders for split {split!r}: {hits}; keep one.')
    if hits:
      found[split] = hits[0]
  return found


def scan(root: str, classes: tuple[str, ...] | list[str] | None = None) -> dict:
  """Lists the files of each split and class.

  Returns:
    {'layout': 'split_folders' | 'flat', 'classes': [...],
     'files': {split: [(relative path, label), ...]}} with paths relative to root, sorted.

  Raises:
    FileNotFoundError: root does not exist.
    ValueError: no class folders, an unknown class in `classes`, or an empty class folder.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'image_folder root {root!r} does not exist. Expected root/<class>/*.jpg (split 80/10/10 '
        'automatically) or root/{train,validation,test}/<class>/*.jpg.')
  split_dirs = _split_dirs(root)
  if split_dirs:
    bases = {s: os.path.join(root, d) for s, d in split_dirs.items()}
  else:
    bases = {'': root}
  found = sorted({c for base in bases.values() for c in _subdirs(base)})
  if not found:
    raise ValueError(f'No class folders under {root!r}. Expected root/<class>/*.jpg or '
                     'root/<split>/<class>/*.jpg.')
  if classes is None:
    classes = found
  else:
    classes = list(classes)
    missing = [c for c in classes if c not in found]
    if missing:
      raise ValueError(f'Class folder(s) {missing} not found under {root!r}; found: '
                       f'{", ".join(found)}')
    if len(set(classes)) != len(classes):
      raise ValueError(f'classes has duplicates: {classes}')
  files: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
  for base_split, base in bases.items():
    for label, c in enumerate(classes):
      folder = os.path.join(base, c)
      if not os.path.isdir(folder):
        continue  # a class may be absent from one split folder (e.g. a test set)
      rel = _image_files(folder)
      if not rel:
        raise ValueError(f'Class folder {folder!r} contains no images '
                         f'({", ".join(IMAGE_EXTENSIONS)}); remove it or add images.')
      for r in rel:
        path = os.path.relpath(os.path.join(folder, r), root)
        split = base_split or hash_split(path.replace(os.sep, '/'))
        files[split].append((path, label))
  return {'layout': 'split_folders' if split_dirs else 'flat', 'classes': list(classes),
          'splits_present': sorted(split_dirs) if split_dirs else list(SPLITS),
          'files': {s: sorted(v) for s, v in files.items()}}


def _listing_digest(root: str, listing: dict) -> str:
  """Hash of the file names and byte sizes, so that a changed folder gets a new cache entry."""
  h = hashlib.sha1()
  for split in SPLITS:
    for path, label in listing['files'][split]:
      h.update(f'{split}\0{path}\0{label}\0{os.path.getsize(os.path.join(root, path))}\n'.encode())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets builder (array_record, Tensor features: no TensorFlow needed).

import tensorflow_datasets as tfds  # noqa: E402  (the helpers above need no tfds)


class ImageFolderConfig(tfds.core.BuilderConfig):
  """One (root, size, classes, file listing) combination."""

  def __init__(self, root: str, size: int, listing: dict):
    key = json.dumps([os.path.abspath(root), size, listing['classes'], listing['layout'],
                      _listing_digest(root, listing)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    super().__init__(name=f's{size}_{digest}',
                     description=f'image_folder {os.path.abspath(root)} size={size}')
    self.root = os.path.abspath(root)
    self.size = size
    self.listing = listing


class UnmaskImageFolder(tfds.core.GeneratorBasedBuilder):
  """tfds builder over a folder of class sub-folders; see the module docstring."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    cfg = self.builder_config
    s = cfg.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(cfg.listing['classes'])),
        }),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    # Filled in place while the splits are generated; tfds writes the metadata afterwards.
    self._report: dict = {}
    self.info.metadata['skipped'] = self._report
    files = self.builder_config.listing['files']
    return {s: self._generate(s) for s in self.builder_config.listing['splits_present']
            if files[s]}

  def _generate(self, split: str):
    cfg = self.builder_config
    for path, label in cfg.listing['files'][split]:
      try:
        image = resize_image(read_image_rgb(os.path.join(cfg.root, path)), cfg.size)
      except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable": skip it
        record_skip(self._report, split, 'unreadable_image', path, f'{type(e).__name__}: {e}')
        continue
      yield path, {'image': image, 'label': label}

  def _generate_examples(self):  # pragma: no cover - generators come from _split_generators
    raise NotImplementedError


def read_split(b, split: str, keys: tuple[str, ...], shapes: dict[str, tuple[int, ...]]):
  """Prepares `b` and reads a split; an empty split keeps the right trailing shapes and dtypes.

  The builders leave splits without candidate files out (tfds refuses to write an empty
  split), so a split the builder does not have is read as empty.
  """
  from unmask_jax.data.tfds_io import prepare, read_all
  try:
    prepare(b)
  except AssertionError as e:
    if 'No examples were yielded' not in str(e):
      raise
    # Every candidate file of some split was skipped: say which files and why.
    report = getattr(b, '_report', {})
    details = '; '.join(f'{s}: {skip_summary(report, s)}' for s in SPLITS if report.get(s))
    raise ValueError(f'{b.name}: {e}. Skipped files: {details or "none"}') from e
  if split not in b.info.splits or b.info.splits[split].num_examples == 0:
    out = {k: np.zeros((0,) + shapes.get(k, ()), np.uint8) for k in keys}
    out['label'] = np.zeros((0,), np.int32)
    return out
  return read_all(b, split, keys=keys)


def load(split: str, *, data_dir: str, root: str, size: int = 150,
         classes: tuple[str, ...] | list[str] | None = None):
  """Loads a split of an image folder as an `ArrayDataset` (built and cached on first use).

  Args:
    split: 'train', 'validation' or 'test'.
    data_dir: where the converted dataset is cached.
    root: the image folder (see the module docstring for the layouts).
    size: images are resized to size x size.
    classes: label order; default the sorted class folder names. Other folders are ignored.
  """
  from unmask_jax.data.base import ArrayDataset
  check_split(split)
  if size < 1:
    raise ValueError(f'size must be >= 1, got {size}')
  listing = scan(root, classes)
  if split not in listing['splits_present']:
    raise FileNotFoundError(
        f'{root!r} has split folders {listing["splits_present"]} but none for {split!r} '
        f'(accepted names: {", ".join(SPLIT_DIR_NAMES[split])}).')
  b = UnmaskImageFolder(data_dir=data_dir, config=ImageFolderConfig(root, size, listing),
                        file_format='array_record')
  arrays = read_split(b, split, ('image', 'label'), {'image': (size, size, 3)})
  summary = warn_skipped('image_folder', metadata_report(b), split)
  source = f'image_folder/{b.builder_config.name}/{split}'
  return ArrayDataset(arrays=arrays, class_names=tuple(listing['classes']), name='image_folder',
                      source=source + (f'|{summary}' if summary else ''))
