"""Trains the part extractor K (a segmenter).

  python3 train_k.py --config=configs/synthparts_k.py --workdir=runs/k

Any config field can be overridden, e.g. --config.num_epochs=3. Re-running the same command resumes
from the last checkpoint in --workdir.
"""
from absl import flags

from unmask_jax import cli, pipeline

_CONFIG = cli.define_config('config', None, 'Path to a configs/*.py training config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl and final.json.')
flags.mark_flags_as_required(['config', 'workdir'])

_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False,
    "Discard this workdir's training outputs (checkpoints, metrics, final.json) and train from "
    'scratch; needed when the config differs from the one that made them.')


def main(argv):
  del argv
  pipeline.train(_CONFIG.value, _WORKDIR.value, expect_task='segmenter', overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main)
