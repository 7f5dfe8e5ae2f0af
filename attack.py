"""Attacks a trained victim M with a list of jit-compiled batch attacks and prints a results table.

  python3 attack.py --config=configs/attack.py --config.model_dir=runs/m_cs3a --workdir=runs/attacks_cs3a
  python3 attack.py --config=configs/attack.py --config.model_dir=runs/m_cs3a --workdir=runs/a \
      --config.attacks='("PGD8=pgd_linf(eps=8/255, steps=20)", "CW=cw_l2(steps=100)")'

Results go to --workdir (one .npz per attack + attacks.json); a rerun skips finished attacks.
"""
from absl import flags

from unmask_jax import cli, pipeline

_CONFIG = cli.define_config('config', 'configs/attack.py', 'Path to an attack config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the attack results.')
flags.mark_flags_as_required(['workdir'])

_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False,
    'Redo every listed attack even if a result is stored; needed when the seed, batch size, spec or '
    'model differ from the stored ones.')


def main(argv):
  del argv
  pipeline.attack(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main)
