"""Trains a victim classifier M (optionally adversarially trained).

  python3 train_m.py --config=configs/synthparts_m.py --workdir=runs/m_cs3a

Any config field can be overridden, e.g. --config.num_epochs=3. Re-running the same command resumes
from the last checkpoint in --workdir.
"""
from absl import app, flags
from ml_collections import config_flags

from unmask_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py training config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl and final.json.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  pipeline.train(_CONFIG.value, _WORKDIR.value, expect_task='classifier')


if __name__ == '__main__':
  app.run(main)
