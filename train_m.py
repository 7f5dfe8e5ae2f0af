"""Trains a victim classifier M (optionally adversarially trained).

  python3 train_m.py --config=configs/synthparts_m.py --workdir=runs/m_cs3a

Adversarial-training baseline: --config.adv_training.enabled=True (PGD-L∞, 7 steps, eps 4/255), or
the paper's eps line search on validation: --at_line_search=1,2,4,6,8,16.
Any config field can be overridden, e.g. --config.num_epochs=3. Re-running the same command resumes
from the last checkpoint in --workdir.
"""
from absl import flags

from unmask_jax import cli, pipeline

_CONFIG = cli.define_config('config', None, 'Path to a configs/*.py training config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl and final.json.')
_LINE_SEARCH = flags.DEFINE_list(
    'at_line_search', None,
    'Adversarial-training eps line search instead of one run: comma-separated eps in 1/255 units '
    '(the paper: 1,2,4,6,8,16). Trains one PGD-L∞ AT model per eps under --workdir/eps_<e>, '
    'picks one on the validation split, and writes line_search.json.')
flags.mark_flags_as_required(['config', 'workdir'])

_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False,
    "Discard this workdir's training outputs (checkpoints, metrics, final.json) and train from "
    'scratch; needed when the config differs from the one that made them.')


def main(argv):
  del argv
  if _LINE_SEARCH.value:
    pipeline.at_line_search(_CONFIG.value, _WORKDIR.value, [float(e) for e in _LINE_SEARCH.value],
                            overwrite=_OVERWRITE.value)
  else:
    pipeline.train(_CONFIG.value, _WORKDIR.value, expect_task='classifier', overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main)
