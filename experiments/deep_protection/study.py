"""Kulkarni & Ambati's Deep Protection: fixed vs automatic vs oracle stop, on a main-job class set.

  python3 -m experiments.deep_protection.study --workdir=runs/deep_protection
  python3 -m experiments.deep_protection.study --config.dip.max_iters=300 --workdir=/tmp/dp300

A thin script over the library: it loads M, the attacks on M and the validation images the way
the evaluation does (`eval.evaluate`: the held-out validation images of the LR combiner are left
out, the attacks' model and data fingerprints are checked), runs
`deep_protection_eval.evaluate_stop_rules` with the evaluation's key for the class set, and writes
`deep_protection_study.json` (every number) and `deep_protection_study.md` (the report section)
to --workdir. With `experiments/deep_protection/config.py` its numbers are those of the main
job's "CS3A: Deep Protection" section; other settings give other budgets without re-running the
evaluation. The result is cached: a second run with the same config and inputs returns at once.
"""
from __future__ import annotations

import json
import os

import jax

from unmask_jax import data as data_lib
from unmask_jax import defenses as defenses_lib
from unmask_jax.data import pipeline as data_pipeline
from unmask_jax.eval import attack_runner, deep_protection_eval, evaluate
from unmask_jax.models import functional
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.utils import named_key, quiet_logs

RESULT_JSON = 'deep_protection_study.json'
REPORT_MD = 'deep_protection_study.md'


def class_set_inputs(config) -> dict:
  """The class set's directories in the main job's layout under `config.main_workdir`."""
  root, cs = config.main_workdir, config.class_set
  return {'m_dir': os.path.join(root, f'm_{cs}'),
          'attacks_dir': os.path.join(root, f'attacks_{cs}'),
          'holdout_attacks_dir': os.path.join(root, f'attacks_holdout_{cs}')}


def run_study(config, workdir: str, *, reuse: bool = True) -> dict:
  """Runs the study into `workdir` (see the module docstring); returns the result dict.

  Args:
    config: `experiments/deep_protection/config.py` (`get_config()` or `quick()`).
    workdir: receives `deep_protection_study.json` and `deep_protection_study.md`.
    reuse: False restores the images again even when the JSON is up to date.

  Returns:
    `deep_protection_eval.evaluate_stop_rules`'s dict plus 'stamp' (what it was computed from:
    config, attacks, model and data fingerprints) and 'class_set'.
  """
  quiet_logs()
  cfg = config.copy_and_resolve_references()
  dirs = class_set_inputs(cfg)
  model, spec = ckpt.load_model(dirs['m_dir'])
  model_fp = ckpt.model_fingerprint(model)
  data_cfg = spec['data_config']
  test = data_lib.load_from_config(data_cfg, 'test', data_dir=cfg.data_dir)
  index, test, adv = evaluate.load_attack_results(dirs['attacks_dir'], model_fp, test, 'M')
  missing = [label for label in cfg.attacks if label not in adv]
  if missing:
    raise ValueError(f'{dirs["attacks_dir"]} has no attack(s) {missing}; it has {sorted(adv)}')
  val = data_lib.load_from_config(data_cfg, 'validation', data_dir=cfg.data_dir)
  # The evaluation's validation images: those after the LR combiner's held-out ones, when the
  # main job attacked any (the fixed stop is chosen on the first `val_size` of the rest).
  if os.path.exists(os.path.join(dirs['holdout_attacks_dir'], attack_runner.INDEX)):
    holdout_index, _, _ = evaluate.load_attack_results(dirs['holdout_attacks_dir'], model_fp, val,
                                                       'M', split='validation')
    val = val.take(slice(holdout_index['n'], None))
  if cfg.max_validation:
    val = val.take(slice(0, cfg.max_validation))

  settings = cfg.dip.to_dict()
  stamp = {'config': json.loads(json.dumps(settings)),
           'attacks': list(cfg.attacks), 'seed': int(cfg.seed), 'class_set': cfg.class_set,
           'model': model_fp, 'test': test.fingerprint(), 'val': val.fingerprint()}
  path = os.path.join(workdir, RESULT_JSON)
  if reuse and os.path.exists(path):
    cached = ckpt.read_json(path)
    if cached.get('stamp') == stamp:
      print(f'{path} is up to date (same config and inputs): not recomputed')
      _write_report(cached, workdir)
      return cached

  n = min(settings['n_images'], len(test))
  print(f'Deep Protection (DIP) on the first {n} {cfg.class_set} test images x {len(cfg.attacks)} '
        f'attacks + clean, {settings["max_iters"]} iterations ...', flush=True)
  ctx = defenses_lib.Context(logits_fn=functional.logits_fn(model),
                             num_classes=len(spec['class_names']),
                             class_names=tuple(spec['class_names']))
  x_test = data_pipeline.to_float(test.arrays['image'])
  x_val = data_pipeline.to_float(val.arrays['image'])
  # The key the evaluation uses for this class set (`eval.evaluate`): the same restorations.
  key = named_key(jax.random.key(cfg.seed), cfg.class_set, 'dip')
  result = deep_protection_eval.evaluate_stop_rules(
      ctx, x_val, val.arrays['label'], x_test, test.arrays['label'],
      {label: adv[label]['x_adv'] for label in cfg.attacks}, key, cfg=settings)
  result.update(stamp=stamp, class_set=cfg.class_set)
  os.makedirs(workdir, exist_ok=True)
  ckpt.write_json_atomic(path, result)
  _write_report(result, workdir)
  return result


def _write_report(result: dict, workdir: str) -> None:
  with open(os.path.join(workdir, REPORT_MD), 'w') as f:
    f.write(report_section(result))


def report_section(result: dict) -> str:
  """The evaluation report's section for this class set (the same heading and tables)."""
  return deep_protection_eval.report_section(result).replace(
      '## Deep Protection', f'## {result["class_set"].upper()}: Deep Protection', 1)


def main(argv) -> None:
  del argv
  from absl import flags
  result = run_study(flags.FLAGS.config, flags.FLAGS.workdir, reuse=not flags.FLAGS.overwrite)
  acc = result['accuracy']
  for name in ['clean', *result['attacks']]:
    rules = ('none',) + deep_protection_eval.RULES
    print(f'{name:>16} accuracy: ' + ', '.join(f'{r} {acc[name][r]:.3f}' for r in rules))
  print(f'report: {os.path.join(flags.FLAGS.workdir, REPORT_MD)}')


if __name__ == '__main__':
  from absl import flags
  from unmask_jax import cli
  cli.define_config('config', 'experiments/deep_protection/config.py',
                    'experiments/deep_protection/config.py (":quick" for configs/quick.py\'s run).')
  flags.DEFINE_string('workdir', 'runs/deep_protection', 'Output directory (the result is cached).')
  flags.DEFINE_bool('overwrite', False, 'Recompute even when the cached result is up to date.')
  cli.run(main)
