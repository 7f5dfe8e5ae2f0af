"""Reading a tfds builder's split into numpy arrays through `as_data_source` (no TensorFlow)."""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np


@contextlib.contextmanager
def quiet():
  """tfds prints progress bars through tqdm and absl logging; keep our own output readable."""
  from absl import logging as absl_logging
  loggers = [logging.getLogger(n) for n in ('absl', 'tensorflow_datasets')]
  levels = [lg.level for lg in loggers]
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.WARNING)
  for lg in loggers:
    lg.setLevel(logging.WARNING)
  try:
    import tensorflow_datasets as tfds
    tfds.display_progress_bar(False)
    yield
  finally:
    absl_logging.set_verbosity(verbosity)
    for lg, lv in zip(loggers, levels):
      lg.setLevel(lv)


def part_features(size: int, class_names):
  """The tfds feature schema shared by every part dataset (SynthParts, PASCAL-Part)."""
  import tensorflow_datasets as tfds
  from unmask_jax.data import parts
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
      'mask': tfds.features.Tensor(shape=(size, size), dtype=np.uint8),
      'parts': tfds.features.Tensor(shape=(parts.NUM_PARTS,), dtype=np.uint8),
      'label': tfds.features.ClassLabel(names=list(class_names)),
  })


def prepare(builder) -> None:
  with quiet(), contextlib.redirect_stderr(io.StringIO()):
    builder.download_and_prepare()


def read_all(builder, split: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Prepares `builder` if needed and stacks the whole split into arrays, in tfds record order."""
  prepare(builder)
  with quiet():
    source = builder.as_data_source(split=split)
  n = len(source)
  records = source.__getitems__(list(range(n))) if n else []
  out = {}
  for k in keys:
    out[k] = np.stack([np.asarray(r[k]) for r in records]) if n else np.zeros((0,))
  out['label'] = out['label'].astype(np.int32)
  return out
