"""The main job on the embedded SynthParts data (no download): data -> K -> M, AT-M -> attacks ->
evaluation, ending with the path of report.md.

  python3 main.py --workdir=runs/main
  python3 main.py --config=configs/quick.py --workdir=runs/quick

Stages are cached in --workdir: running the same command again skips finished stages and resumes
an interrupted one.
"""
from absl import flags

from experiments.digits import study as digits_study
from unmask_jax import cli, pipeline

_CONFIG = cli.define_config('config', 'configs/main.py', 'Path to the main-job config.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/main', 'Where every stage writes its outputs.')

_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False,
    'Redo every stage (training, attacks, evaluation) instead of reusing the cached outputs in '
    "--workdir; needed when a stage's config changed.")


def main(argv):
  del argv
  config = _CONFIG.value
  pipeline.run_main(config, _WORKDIR.value, overwrite=_OVERWRITE.value,
                    extra_stages=digits_study.main_job_stages(config))


if __name__ == '__main__':
  cli.run(main)
