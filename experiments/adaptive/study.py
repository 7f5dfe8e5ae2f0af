"""Adaptive attacks on UnMask and KDE with a reviewer's budget, on the main job's models.

  python3 -m experiments.adaptive.study --workdir=runs/adaptive

A thin script over the library (see config.py): for each class set it loads K, M, the data and
the gray-box attacks as the evaluation does (`eval.evaluate`), reloads the evaluation's fitted and
calibrated defense states (fitting them the same way when the cache is absent) and runs
`adaptive_eval.evaluate_adaptive` in batches of `batch_size` images. Writes `adaptive_study.json`
(every row) and `adaptive_study.md` (a table) to --workdir.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax import data as data_lib
from unmask_jax import defenses as defenses_lib
from unmask_jax.data import parts as parts_lib
from unmask_jax.data import pipeline as data_pipeline
from unmask_jax.eval import adaptive_eval, attack_runner, evaluate
from unmask_jax.models import functional
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.utils import named_key, quiet_logs

RESULT_JSON = 'adaptive_study.json'
REPORT_MD = 'adaptive_study.md'


def run_class_set(cfg, cs: str, parts_fn) -> dict:
  """{defense: {gray-box label: row}} of `evaluate_adaptive` on the first n_images test images."""
  root_dir = cfg.main_workdir
  model, spec = ckpt.load_model(os.path.join(root_dir, f'm_{cs}'))
  model_fp = ckpt.model_fingerprint(model)
  data_cfg = spec['data_config']
  test = data_lib.load_from_config(data_cfg, 'test', data_dir=cfg.data_dir)
  index, test, adv = evaluate.load_attack_results(os.path.join(root_dir, f'attacks_{cs}'), model_fp,
                                                  test, 'M')
  val = data_lib.load_from_config(data_cfg, 'validation', data_dir=cfg.data_dir)
  holdout_dir = os.path.join(root_dir, f'attacks_holdout_{cs}')
  if os.path.exists(os.path.join(holdout_dir, attack_runner.INDEX)):
    # The evaluation sets thresholds on the validation images after the combiner's held-out ones.
    holdout_index, _, _ = evaluate.load_attack_results(holdout_dir, model_fp, val, 'M',
                                                       split='validation')
    val = val.take(slice(holdout_index['n'], None))
  train = data_lib.load_from_config(data_cfg, 'train', data_dir=cfg.data_dir)
  if cfg.max_fit:   # as the evaluation subsamples its fit data (used only without its cache)
    rng = np.random.default_rng(cfg.seed)
    train = train.take(np.sort(rng.permutation(len(train))[:cfg.max_fit]))
  classes = tuple(spec['class_names'])
  ctx = defenses_lib.Context(
      logits_fn=functional.logits_fn(model), features_fn=functional.features_fn(model),
      mc_logits_fn=functional.mc_logits_fn(model), head_fn=functional.head_fn(model),
      intermediates_fn=functional.intermediates_fn(model), parts_fn=parts_fn,
      parts_matrix=jnp.asarray(parts_lib.parts_matrix(classes)), num_classes=len(classes),
      class_names=classes)
  root = jax.random.key(cfg.seed)
  fit_data = {'image': data_pipeline.to_float(train.arrays['image']), 'label': train.arrays['label']}
  x_val = data_pipeline.to_float(val.arrays['image'])
  det_states = {}
  states_dir = os.path.join(root_dir, 'eval')   # the evaluation's cache of fitted states
  for name in cfg.defenses:
    d = evaluate.make_defense(name)
    det_states[name] = (d, evaluate.fitted_states(d, name, ctx, fit_data, x_val, None, adv, root,
                                                  cs, states_dir))
  n = min(int(cfg.n_images), len(test))
  x_test, y_test = data_pipeline.to_float(test.arrays['image'])[:n], test.arrays['label'][:n]
  adv = {label: {**r, 'norm': index['attacks'][label]['norm'], 'eps': index['attacks'][label]['eps']}
         for label, r in adv.items() if label in cfg.adaptive.attacks}
  # Batches of batch_size images, rows merged by image count. The first batch gets the
  # evaluation's key: with the evaluation's budget and one batch, its numbers are the report's.
  rows: dict = {}
  for start in range(0, n, int(cfg.batch_size)):
    sl = slice(start, min(n, start + int(cfg.batch_size)))
    part_adv = {label: {k: (v[sl] if isinstance(v, np.ndarray) and len(v) == len(test) else v)
                        for k, v in r.items()} for label, r in adv.items()}
    acfg = cfg.adaptive.copy_and_resolve_references()
    acfg.n_images = sl.stop - sl.start
    out = adaptive_eval.evaluate_adaptive(
        acfg, det_states, ctx, x_test[sl], y_test[sl], part_adv, {},
        named_key(root, cs, 'adaptive', *([start] if start else [])),
        make_defense=evaluate.make_defense,
        fit=lambda d, spec, n_cal: evaluate.fitted_states(
            d, spec, ctx, fit_data, x_val[:n_cal], None, adv, root, cs, states_dir))
    for name, by_label in out.items():
      for label, row in by_label.items():
        rows.setdefault(name, {}).setdefault(label, []).append(row)
  return {name: {label: _merge(parts) for label, parts in by_label.items()}
          for name, by_label in rows.items()}


_MEAN_KEYS = ('graybox_success', 'adaptive_success', 'adaptive_success_float', 'worst_case_success',
              'm_fooled', 'defense_accuracy', 'graybox_defense_accuracy',
              'worst_case_defense_accuracy', 'mean_score_clean', 'mean_score_adaptive')


def _merge(parts: list[dict]) -> dict:
  """Rows of several batches as one: image-weighted means; AUC per batch (listed) and seconds
  summed. The AUC of the whole set needs the scores, which the rows do not keep, so the table
  reports the image-weighted mean of the batches' AUCs and says so."""
  w = np.array([p['n_images'] for p in parts], float)
  row = dict(parts[0])
  for k in _MEAN_KEYS:
    if k in row:
      row[k] = float(np.average([p[k] for p in parts], weights=w))
  row['n_images'] = int(w.sum())
  row['seconds'] = round(sum(p['seconds'] for p in parts), 1)
  row['auc_per_batch'] = [p['auc'] for p in parts]
  row['auc'] = float(np.average([p['auc'] for p in parts], weights=w))
  row['ball_violations'] = sum(int(p['ball_violations']) for p in parts) \
      if all(isinstance(p['ball_violations'], (int, np.integer)) for p in parts) else \
      [p['ball_violations'] for p in parts]
  return row


def report(result: dict) -> str:
  a = result['config']['adaptive']
  lines = ['# Adaptive attacks with a reviewer\'s budget', '',
           f'Threat model: white-box, defense-aware (the attacker knows M, the defense, its fitted '
           f'state and threshold). Budget: first {result["config"]["n_images"]} test images, PGD '
           f'{a["steps"]} steps of eps x {a["step_fraction"]}, restarts {a["restarts"]}, every '
           f'wrong class a target, objective {a["objective"]}, corrector {a["corrector"]}; '
           'success judged on 8-bit-rounded images by the exact decision. Worst case = per image '
           'over this attack and the main job\'s gray-box PGD of the same eps. AUC: clean vs '
           'adaptive (M fooled) scores, mean over batches of '
           f'{result["config"]["batch_size"]} images.', '',
           '| class set | defense | eps | gray-box success | adaptive success | worst case | '
           'M fooled | defense acc. (adaptive) | AUC (adaptive) | seconds |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for cs, by_def in result['class_sets'].items():
    for name, by_label in by_def.items():
      for label, r in by_label.items():
        acc = f'{r["defense_accuracy"]:.3f}' if 'defense_accuracy' in r else '—'
        lines.append(f'| {cs.upper()} | {name} | {label} | {r["graybox_success"]:.3f} | '
                     f'**{r["adaptive_success"]:.3f}** | {r["worst_case_success"]:.3f} | '
                     f'{r["m_fooled"]:.3f} | {acc} | {r["auc"]:.3f} | {r["seconds"]:.0f} |')
  return '\n'.join(lines) + '\n'


def run_study(config, workdir: str) -> dict:
  quiet_logs()
  cfg = config.copy_and_resolve_references()
  parts_fn, _ = evaluate.load_part_extractor(os.path.join(cfg.main_workdir, 'k'))
  t0 = time.perf_counter()
  result = {'config': json.loads(json.dumps(cfg.to_dict())), 'class_sets': {}}
  for cs in cfg.class_sets:
    print(f'{cs}: adaptive attacks on {", ".join(cfg.defenses)} ...', flush=True)
    result['class_sets'][cs] = run_class_set(cfg, cs, parts_fn)
  result['seconds'] = round(time.perf_counter() - t0, 1)
  os.makedirs(workdir, exist_ok=True)
  ckpt.write_json_atomic(os.path.join(workdir, RESULT_JSON), result)
  with open(os.path.join(workdir, REPORT_MD), 'w') as f:
    f.write(report(result))
  return result


def main(argv) -> None:
  del argv
  from absl import flags
  run_study(flags.FLAGS.config, flags.FLAGS.workdir)
  print(open(os.path.join(flags.FLAGS.workdir, REPORT_MD)).read())


if __name__ == '__main__':
  from absl import flags
  from unmask_jax import cli
  cli.define_config('config', 'experiments/adaptive/config.py', 'experiments/adaptive/config.py.')
  flags.DEFINE_string('workdir', 'runs/adaptive', 'Output directory.')
  cli.run(main)
