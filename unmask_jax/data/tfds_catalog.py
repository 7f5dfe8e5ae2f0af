"""MNIST, Fashion-MNIST and CIFAR-10, through tensorflow-datasets or from their raw files.

Splits: 'test' is the dataset's test split; 'train' is the first 90% of its training split and
'validation' the last 10% (n // 10 examples), in the stored record order, so both are
deterministic.

Two backends give the same arrays up to example order:

  'tfds'  tensorflow-datasets' own builder (`tfds.builder(name, data_dir=data_dir,
          file_format='array_record')`), read with `as_data_source` (PIL decodes the PNGs; no
          TensorFlow needed to READ). PREPARING it (download + write) runs tfds' own code, which
          needs TensorFlow (`tf.io.gfile`, `tf.image.encode_png`) and internet access. A copy
          prepared elsewhere (`tfds build mnist --file_format=array_record`) can be copied into
          `data_dir`. tfds shuffles records when it writes them, so its train/validation cut
          differs from the raw backend's.
  'raw'   the original distribution files in `<data_dir>/downloads/manual/<name>/`
          (MNIST-style `*-idx?-ubyte[.gz]`, CIFAR-10's `cifar-10-binary.tar.gz` or its extracted
          `cifar-10-batches-bin/`), parsed with numpy in file order. No TensorFlow, no network.

`backend='auto'` (default) uses a prepared tfds copy if there is one, else raw files if present,
else prepares with tfds when TensorFlow is installed, else raises an error that lists the
missing files and both ways to provide them. `ArrayDataset.source` records the backend, so the
two never share fingerprints.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import tarfile

import numpy as np

SPLITS = ('train', 'validation', 'test')
BACKENDS = ('auto', 'tfds', 'raw')


@dataclasses.dataclass(frozen=True)
class CatalogSpec:
  """What a catalog dataset is called in tfds, its labels and its raw files."""
  name: str
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  raw_files: tuple[str, ...]   # needed in <data_dir>/downloads/manual/<name>/ (any one layout)
  url: str


_MNIST_RAW = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
SPECS = {
    'mnist': CatalogSpec(
        'mnist', tuple(str(d) for d in range(10)), (28, 28, 1), _MNIST_RAW,
        'https://storage.googleapis.com/cvdf-datasets/mnist/'),
    'fashion_mnist': CatalogSpec(
        'fashion_mnist', ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                          'Shirt', 'Sneaker', 'Bag', 'Ankle boot'), (28, 28, 1), _MNIST_RAW,
        'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'),
    'cifar10': CatalogSpec(
        'cifar10', ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                    'ship', 'truck'), (32, 32, 3), ('cifar-10-binary.tar.gz',),
        'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'),
}
_CIFAR_DIR = 'cifar-10-batches-bin'
_CIFAR_TRAIN = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
_CIFAR_TEST = ('test_batch.bin',)


def manual_dir(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, 'downloads', 'manual', name)


def _train_validation_cut(n: int, split: str) -> range:
  """Indices of 'train' (first n - n // 10) or 'validation' (last n // 10) in a train split."""
  cut = n - n // 10
  return range(0, cut) if split == 'train' else range(cut, n)


# ---------------------------------------------------------------------------------------------
# Raw files.

def _open_maybe_gz(path: str) -> bytes:
  with open(path, 'rb') as f:
    data = f.read()
  return gzip.decompress(data) if data[:2] == b'\x1f\x8b' else data


def parse_idx(data: bytes) -> np.ndarray:
  """Parses an IDX file (MNIST format: magic 0x0000 08 <ndim>, big-endian dims, uint8 data)."""
  if len(data) < 4 or data[:3] != b'\x00\x00\x08':
    raise ValueError('not an unsigned-byte IDX file (bad magic number)')
  ndim = data[3]
  dims = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f'IDX file holds {body.size} bytes, header says {dims}')
  return body.reshape(dims)


def parse_cifar_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (planar R, G, B)."""
  rec = 1 + 3072
  if len(data) % rec:
    raise ValueError(f'CIFAR-10 batch of {len(data)} bytes is not a multiple of {rec}')
  raw = np.frombuffer(data, np.uint8).reshape(-1, rec)
  return raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), raw[:, 0].astype(np.int32)


def _find_mnist_file(folder: str, gz_name: str) -> str | None:
  for candidate in (gz_name, gz_name[:-3]):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  return None


def _raw_missing(spec: CatalogSpec, folder: str) -> list[str]:
  """Raw files still missing in `folder` ([] when it has a complete layout)."""
  if spec.name == 'cifar10':
    if os.path.isfile(os.path.join(folder, spec.raw_files[0])):
      return []
    extracted = os.path.join(folder, _CIFAR_DIR)
    if os.path.isdir(extracted):
      return [f'{_CIFAR_DIR}/{f}' for f in _CIFAR_TRAIN + _CIFAR_TEST
              if not os.path.isfile(os.path.join(extracted, f))]
    return list(spec.raw_files)
  return [f for f in spec.raw_files if _find_mnist_file(folder, f) is None]


def _read_raw(spec: CatalogSpec, folder: str, part: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, C], labels int32) of the raw 'train' or 'test' part."""
  if spec.name == 'cifar10':
    wanted = _CIFAR_TRAIN if part == 'train' else _CIFAR_TEST
    archive = os.path.join(folder, spec.raw_files[0])
    blobs = []
    if os.path.isfile(archive):
      with tarfile.open(archive, 'r:gz') as tar:
        for f in wanted:
          blobs.append(tar.extractfile(f'{_CIFAR_DIR}/{f}').read())
    else:
      for f in wanted:
        with open(os.path.join(folder, _CIFAR_DIR, f), 'rb') as fh:
          blobs.append(fh.read())
    parsed = [parse_cifar_batch(b) for b in blobs]
    return (np.concatenate([p[0] for p in parsed]), np.concatenate([p[1] for p in parsed]))
  prefix = 'train' if part == 'train' else 't10k'
  images = parse_idx(_open_maybe_gz(_find_mnist_file(folder, f'{prefix}-images-idx3-ubyte.gz')))
  labels = parse_idx(_open_maybe_gz(_find_mnist_file(folder, f'{prefix}-labels-idx1-ubyte.gz')))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f'{spec.name} raw {part} files disagree: images {images.shape}, '
                     f'labels {labels.shape}')
  return images[..., None], labels.astype(np.int32)


def _load_raw(spec: CatalogSpec, data_dir: str, split: str) -> dict[str, np.ndarray]:
  folder = manual_dir(data_dir, spec.name)
  images, labels = _read_raw(spec, folder, 'test' if split == 'test' else 'train')
  if split != 'test':
    idx = np.asarray(_train_validation_cut(len(labels), split), np.int64)
    images, labels = images[idx], labels[idx]
  return {'image': np.ascontiguousarray(images), 'label': labels}


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets' own builders.

def _tfds_builder(spec: CatalogSpec, data_dir: str):
  import tensorflow_datasets as tfds
  return tfds.builder(spec.name, data_dir=data_dir, file_format='array_record')


def _read_records(source, indices, spec: CatalogSpec) -> dict[str, np.ndarray]:
  # One record at a time: about 1.4x slower than `__getitems__` on array_record, but it is the
  # access that `tfds.testing.mock_data` supports too (its mocked `__getitems__` is broken in
  # tfds 4.9.10), so the tests run this very code.
  images, labels = [], []
  for i in indices:
    r = source[i]
    images.append(np.asarray(r['image'], np.uint8))
    labels.append(int(r['label']))
  if not images:
    return {'image': np.zeros((0,) + spec.image_shape, np.uint8),
            'label': np.zeros((0,), np.int32)}
  return {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}


def _load_tfds(spec: CatalogSpec, data_dir: str, split: str) -> dict[str, np.ndarray]:
  b = _tfds_builder(spec, data_dir)
  if not b.is_prepared():
    if not _tensorflow_installed():
      # tfds would download the files and only then fail on `tf.io.gfile`: stop before that.
      raise FileNotFoundError(_missing_message(
          spec, data_dir, 'no prepared tfds copy, and TensorFlow (which tfds needs to prepare '
          'one) is not installed'))
    from unmask_jax.data.tfds_io import prepare
    try:
      prepare(b)
    except Exception as e:  # noqa: BLE001 - offline, no TensorFlow, bad files: explain all
      raise RuntimeError(_missing_message(spec, data_dir, f'preparing it with tfds failed: '
                                          f'{type(e).__name__}: {e}')) from e
  source = b.as_data_source(split='test' if split == 'test' else 'train')
  indices = range(len(source)) if split == 'test' else _train_validation_cut(len(source), split)
  arrays = _read_records(source, indices, spec)
  if arrays['image'].shape[1:] != spec.image_shape:
    raise ValueError(f'{spec.name}: tfds gave images of shape {arrays["image"].shape[1:]}, '
                     f'expected {spec.image_shape}')
  return arrays


def _tensorflow_installed() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _missing_message(spec: CatalogSpec, data_dir: str, why: str) -> str:
  folder = manual_dir(data_dir, spec.name)
  missing = _raw_missing(spec, folder)
  return (
      f'Dataset {spec.name!r} is not available in data_dir={data_dir!r}: {why}.\n'
      f'Provide it in one of two ways (nothing else is needed afterwards, and no network):\n'
      f'  1. Raw files (no TensorFlow needed): put {", ".join(spec.raw_files)} from '
      f'{spec.url} into {folder}/ (missing now: {", ".join(missing) or "none"}).\n'
      f'  2. A tfds copy in array_record format: on a machine with internet and TensorFlow, '
      f'run `tfds build {spec.name} --file_format=array_record --data_dir=DIR` (without '
      f'--data_dir tfds uses $TFDS_DATA_DIR, default ~/tensorflow_datasets) and copy '
      f'DIR/{spec.name} to {os.path.join(data_dir, spec.name)}; or install TensorFlow here and '
      f'load once with internet access (backend="tfds").')


def _load(name: str, split: str, data_dir: str, backend: str):
  from unmask_jax.data.base import ArrayDataset
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {", ".join(SPLITS)}')
  if backend not in BACKENDS:
    raise ValueError(f'Unknown backend {backend!r}; valid: {", ".join(BACKENDS)}')
  spec = SPECS[name]
  if backend == 'auto':
    raw_ok = not _raw_missing(spec, manual_dir(data_dir, name))
    if _tfds_builder(spec, data_dir).is_prepared():
      backend = 'tfds'
    elif raw_ok:
      backend = 'raw'
    elif _tensorflow_installed():
      backend = 'tfds'
    else:
      raise FileNotFoundError(_missing_message(
          spec, data_dir, 'no prepared tfds copy, no raw files, and TensorFlow (which tfds needs '
          'to download and prepare it) is not installed'))
  if backend == 'raw':
    if _raw_missing(spec, manual_dir(data_dir, name)):
      raise FileNotFoundError(_missing_message(spec, data_dir, 'raw files are missing'))
    arrays = _load_raw(spec, data_dir, split)
  else:
    arrays = _load_tfds(spec, data_dir, split)
  labels = arrays['label']
  if labels.size and (labels.min() < 0 or labels.max() >= len(spec.class_names)):
    raise ValueError(f'{name}: labels out of range [0, {len(spec.class_names)})')
  return ArrayDataset(arrays=arrays, class_names=spec.class_names, name=name,
                      source=f'{name}/{backend}/{split}')


def load_mnist(split: str, *, data_dir: str, backend: str = 'auto'):
  """MNIST (60k train incl. validation, 10k test), uint8 [N, 28, 28, 1]; see module docstring."""
  return _load('mnist', split, data_dir, backend)


def load_fashion_mnist(split: str, *, data_dir: str, backend: str = 'auto'):
  """Fashion-MNIST, uint8 [N, 28, 28, 1]; see the module docstring."""
  return _load('fashion_mnist', split, data_dir, backend)


def load_cifar10(split: str, *, data_dir: str, backend: str = 'auto'):
  """CIFAR-10 (50k train incl. validation, 10k test), uint8 [N, 32, 32, 3]; see module docstring."""
  return _load('cifar10', split, data_dir, backend)
