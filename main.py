"""The main job on the embedded SynthParts data (no download): data -> K -> M, AT-M -> attacks ->
evaluation, ending with the path of report.md.

  python3 main.py --workdir=runs/main
  python3 main.py --config=configs/quick.py --workdir=runs/quick

Stages are cached in --workdir: running the same command again skips finished stages and resumes
an interrupted one.
"""
from absl import app, flags
from ml_collections import config_flags

from unmask_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/main.py', 'Path to the main-job config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/main', 'Where every stage writes its outputs.')


def main(argv):
  del argv
  pipeline.run_main(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
