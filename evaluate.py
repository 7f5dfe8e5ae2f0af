"""Evaluates defenses against stored attacks: Table IV accuracies, ROC/TPR@FPR detection, K robustness.

  python3 evaluate.py --config=configs/evaluate.py --workdir=runs/main/eval

See configs/evaluate.py for the inputs (K, each class set's M / AT-M and their attack results).
Writes report.md (read it first), results.json (every number) and roc_<class set>.png.
"""
from absl import flags

from unmask_jax import cli, pipeline

_CONFIG = cli.define_config('config', 'configs/evaluate.py', 'Path to an evaluation config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for report.md, results.json and plots.')
flags.mark_flags_as_required(['workdir'])

_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False,
    'Refit every defense instead of reusing the states fitted in --workdir (they are refitted anyway '
    'when the config or an input changed).')


def main(argv):
  del argv
  pipeline.evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main)
