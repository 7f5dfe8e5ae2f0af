"""The main job on the embedded SynthParts data (no download).

  python3 main.py --workdir=runs/main

Builds SynthParts, prints each UnMask class set (classes, part count, feature overlap) and writes an
example grid PNG to the workdir.
"""
from absl import app, flags

from unmask_jax import pipeline

_WORKDIR = flags.DEFINE_string('workdir', 'runs/main', 'Where outputs go.')
_DATA_DIR = flags.DEFINE_string('data_dir', 'data', 'Where generated datasets are cached.')


def main(argv):
  del argv
  pipeline.describe_synthparts(_DATA_DIR.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
