"""Evaluates defenses against stored attacks: Table IV accuracies, ROC/TPR@FPR detection, K robustness.

  python3 evaluate.py --config=configs/evaluate.py --workdir=runs/main/eval

See configs/evaluate.py for the inputs (K, each class set's M / AT-M and their attack results).
Writes report.md (read it first), results.json (every number) and roc_<class set>.png.
"""
from absl import app, flags
from ml_collections import config_flags

from unmask_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/evaluate.py', 'Path to an evaluation config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for report.md, results.json and plots.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  pipeline.evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
