"""What the scripts call: train, attack, evaluate, and the one-command main job."""
from __future__ import annotations

import os
import time

from unmask_jax.data import parts as parts_lib
from unmask_jax.utils import quiet_logs


def train(config, workdir: str, *, expect_task: str) -> dict:
  """Entry point of train_k.py / train_m.py."""
  from unmask_jax.train import trainer
  quiet_logs()
  if config.task != expect_task:
    script = 'train_k.py' if expect_task == 'segmenter' else 'train_m.py'
    raise ValueError(f'{script} trains task={expect_task!r}, but this config has task={config.task!r}; '
                     'use the other script or another config.')
  t0 = time.time()
  final = trainer.train_and_evaluate(config, workdir)
  test = final['test']
  if expect_task == 'segmenter':
    pr = test.get('presence', {})
    print(f'K test: mean IoU {test["mean_iou"]:.3f}, part presence P {pr.get("precision", 0):.3f} '
          f'R {pr.get("recall", 0):.3f} F1 {pr.get("f1", 0):.3f} '
          f'(min_area {final["extraction"]["min_area"]:g}, min_conf {final["extraction"]["min_conf"]:g})')
  else:
    print(f'M test: accuracy {test["accuracy"]:.4f}, loss {test["loss"]:.4f}')
  print(f'done in {time.time() - t0:.1f}s; checkpoints and metrics in {workdir}')
  return final


def describe_synthparts(data_dir: str, out_dir: str, **spec) -> list[dict]:
  """Builds SynthParts, prints each class set's classes, part count and overlap, writes a grid PNG."""
  from unmask_jax.data import synthparts, viz
  t0 = time.time()
  train_ds = synthparts.load('train', data_dir=data_dir, **spec)
  sizes = {s: len(synthparts.load(s, data_dir=data_dir, **spec)) for s in ('validation', 'test')}
  print(f'SynthParts {train_ds.image_shape}: train {len(train_ds)}, validation {sizes["validation"]}, '
        f'test {sizes["test"]} images ({time.time() - t0:.1f}s)')
  rows = []
  print(f'{"class set":<10} {"parts":>5} {"overlap":>8}  paper  classes')
  paper = {'cs3a': (29, 0.0689), 'cs3b': (18, 0.50), 'cs5a': (34, 0.2353), 'cs5b': (34, 0.2941)}
  for name in sorted(parts_lib.CLASS_SETS):
    classes = parts_lib.class_set(name)
    n, ov = parts_lib.overlap(classes)
    rows.append({'class_set': name, 'classes': classes, 'parts': n, 'overlap': ov})
    print(f'{name:<10} {n:>5} {ov:>8.2%}  {paper[name][0]}/{paper[name][1]:.2%}  {", ".join(classes)}')
  os.makedirs(out_dir, exist_ok=True)
  path = viz.save_example_grid(train_ds, os.path.join(out_dir, 'synthparts_examples.png'),
                               title='SynthParts (train): image | part mask')
  print(f'example grid: {path}')
  return rows


def attack(config, workdir: str) -> list[dict]:
  """Entry point of attack.py: runs the configured attacks and prints the table + sanity checks."""
  from unmask_jax.eval import attack_runner
  quiet_logs()
  if not config.model_dir:
    raise ValueError('--config.model_dir must point at a train_m.py workdir')
  rows = attack_runner.run_attacks(config, workdir)
  index = attack_runner.ckpt.read_json(os.path.join(workdir, attack_runner.INDEX))
  attack_runner.print_results(rows, index['sanity'])
  return rows


def evaluate(config, workdir: str) -> dict:
  """Entry point of evaluate.py."""
  from unmask_jax.eval import evaluate as evaluate_lib
  quiet_logs()
  out = evaluate_lib.evaluate(config, workdir)
  print(f'report: {out["report"]}')
  return out


def _with_data(cfg, data_dir: str, options: dict):
  cfg = cfg.copy_and_resolve_references()
  cfg.data.data_dir = data_dir
  cfg.data.options = dict(options)
  return cfg


def run_main(config, workdir: str) -> str:
  """The main job: data -> K -> M and AT-M per class set -> attacks -> evaluation -> report.md.

  Every stage is cached in `workdir`: training resumes from its last checkpoint (and returns at
  once when finished), attack.py skips finished attacks, evaluation is skipped when its report is
  newer than every attack result. Killing the job and running it again continues where it stopped.
  """
  import json
  from unmask_jax.eval import attack_runner
  from unmask_jax.train import checkpoint as ckpt
  quiet_logs()
  os.makedirs(workdir, exist_ok=True)
  times_path = os.path.join(workdir, 'stage_seconds.jsonl')
  # Seconds per stage of this run (a cached stage shows its near-zero time).
  times: dict[str, float] = {}
  t_all = time.time()

  def stage(name, fn):
    print(f'\n=== {name}')
    t0 = time.time()
    out = fn()
    times[name] = round(time.time() - t0, 1)
    return out

  opts = dict(config.data_options)
  stage('data', lambda: describe_synthparts(config.data_dir, workdir, **opts))
  stage('train K', lambda: train(_with_data(config.k, config.data_dir, opts), os.path.join(workdir, 'k'),
                                 expect_task='segmenter'))
  eval_sets = {}
  for cs in config.class_sets:
    m_cfg = _with_data(config.m, config.data_dir, opts)
    m_cfg.data.class_set = cs
    stage(f'train M {cs}', lambda: train(m_cfg, os.path.join(workdir, f'm_{cs}'), expect_task='classifier'))
    dirs = {'m_dir': os.path.join(workdir, f'm_{cs}'), 'attacks_dir': os.path.join(workdir, f'attacks_{cs}'),
            'at_dir': '', 'at_attacks_dir': ''}
    if config.adversarial_training:
      at_cfg = _with_data(config.at, config.data_dir, opts)
      at_cfg.data.class_set = cs
      stage(f'train AT-M {cs}', lambda: train(at_cfg, os.path.join(workdir, f'at_{cs}'),
                                              expect_task='classifier'))
      dirs.update(at_dir=os.path.join(workdir, f'at_{cs}'), at_attacks_dir=os.path.join(workdir, f'attacks_at_{cs}'))
    n_mrr = config.get('mrr', {}).get('num_defenders', 0)
    if n_mrr:
      # MRR defenders (seed 002): M's architecture, each from its own seed, CE + center loss.
      dirs['mrr_dir'] = os.path.join(workdir, f'mrr_{cs}')

      def train_defenders():
        for i in range(n_mrr):
          d_cfg = _with_data(config.mrr.defender, config.data_dir, opts)
          d_cfg.data.class_set, d_cfg.seed = cs, config.mrr.defender.seed + i
          train(d_cfg, os.path.join(dirs['mrr_dir'], f'defender_{i}'), expect_task='classifier')
      stage(f'train MRR defenders {cs}', train_defenders)
    attack_jobs = [('M', dirs['m_dir'], dirs['attacks_dir'], 'test', config.attack.max_examples)]
    if config.get('combiner_holdout', 0):
      # Attacks on the first validation images: the LR combiner's held-out fitting data.
      dirs['holdout_attacks_dir'] = os.path.join(workdir, f'attacks_holdout_{cs}')
      attack_jobs.append(('M (held-out validation)', dirs['m_dir'], dirs['holdout_attacks_dir'],
                          'validation', config.combiner_holdout))
    attack_jobs.append(('AT-M', dirs['at_dir'], dirs['at_attacks_dir'], 'test', config.attack.max_examples))
    for who, model_dir, out_dir, split, n in attack_jobs:
      if not model_dir:
        continue
      a_cfg = config.attack.copy_and_resolve_references()
      a_cfg.model_dir, a_cfg.data_dir, a_cfg.split, a_cfg.max_examples = model_dir, config.data_dir, split, n
      stage(f'attack {who} {cs}', lambda: attack(a_cfg, out_dir))
    eval_sets[cs] = dirs

  e_cfg = config.evaluate.copy_and_resolve_references()
  e_cfg.k_dir, e_cfg.data_dir = os.path.join(workdir, 'k'), config.data_dir
  import ml_collections
  e_cfg.class_sets = ml_collections.ConfigDict(eval_sets)
  eval_dir = os.path.join(workdir, 'eval')
  report_path = os.path.join(eval_dir, 'report.md')
  inputs = [os.path.join(d[k], attack_runner.INDEX) for d in eval_sets.values()
            for k in ('attacks_dir', 'at_attacks_dir', 'holdout_attacks_dir') if d.get(k)]
  if config.get('digits', None) is not None:
    # Seed 004's study on the embedded digits; its section is appended to the main report.
    from unmask_jax.eval import digits_study
    result = stage('digits study', lambda: digits_study.run_digits_study(
        config.digits, os.path.join(workdir, 'digits')))
    section = os.path.join(eval_dir, 'digits_section.md')
    text = digits_study.report_section(result, relative_to=eval_dir)
    os.makedirs(eval_dir, exist_ok=True)
    if not os.path.exists(section) or open(section).read() != text:
      with open(section, 'w') as f:
        f.write(text)
    e_cfg.extra_sections = (section,)
    inputs.append(section)
  # Re-evaluate when an attack result is newer than the report or the evaluation config changed.
  stamp_path = os.path.join(eval_dir, 'config.json')
  stamp = json.loads(e_cfg.to_json(sort_keys=True))
  fresh = (os.path.exists(report_path) and os.path.exists(stamp_path)
           and ckpt.read_json(stamp_path) == stamp
           and all(os.path.getmtime(report_path) > os.path.getmtime(p) for p in inputs))
  if fresh:
    print(f'\n=== evaluate: {report_path} is up to date, skipped')
  else:
    stage('evaluate', lambda: evaluate(e_cfg, eval_dir))
    ckpt.write_json_atomic(stamp_path, stamp)
  times['total (this run)'] = round(time.time() - t_all, 1)
  with open(times_path, 'a') as f:   # one line per run: the history of stage times
    f.write(json.dumps(times) + '\n')
  print('\nStage wall times (s): ' + ', '.join(f'{k} {v}' for k, v in times.items()))
  print(f'\nDone. Read the report: {report_path}')
  return report_path


def at_line_search(config, workdir: str, eps_255: list[float], attack_steps: int = 20) -> dict:
  """The paper's adversarial-training line search: one AT-M per eps, chosen on validation.

  For each eps in `eps_255` (in 1/255 units, e.g. [1, 2, 4, 6, 8, 16]) an M is trained with
  PGD-L∞ adversarial training (config.adv_training) into `<workdir>/eps_<e>`, then attacked on the
  VALIDATION split with PGD-L∞ at 8/255 and 16/255 (the evaluated strengths). The chosen eps
  maximises the mean of clean and robust validation accuracies (a model that is robust but no
  longer classifies clean images is not chosen). Test data is never used. The chosen model is an
  ordinary train_m.py workdir, printed at the end and recorded in line_search.json.
  """
  from unmask_jax.eval import attack_runner, report
  from unmask_jax.train import checkpoint as ckpt
  import ml_collections
  quiet_logs()
  if not eps_255:
    raise ValueError('give at least one eps, e.g. --at_line_search=1,2,4,6,8,16')
  # Values below 0.25 are almost surely [0, 1] units (0.03 meaning 8/255), not 0.03/255.
  bad = [e for e in eps_255 if not 0.25 <= e <= 255]
  if bad:
    raise ValueError(f'line-search eps are in 1/255 units (e.g. 4 for 4/255), between 0.25 and 255; got {bad}')
  rows = []
  for e in eps_255:
    cfg = config.copy_and_resolve_references()
    cfg.adv_training.enabled = True
    cfg.adv_training.eps = e / 255
    run_dir = os.path.join(workdir, f'eps_{e:g}')
    train(cfg, run_dir, expect_task='classifier')
    a_cfg = ml_collections.ConfigDict({
        'model_dir': run_dir, 'data_dir': cfg.data.data_dir, 'split': 'validation', 'max_examples': 0,
        'attacks': (f'PGD-Linf-8=pgd_linf(eps=8/255, steps={attack_steps})',
                    f'PGD-Linf-16=pgd_linf(eps=16/255, steps={attack_steps})'),
        'steps': attack_steps, 'batch_size': cfg.eval_batch_size, 'seed': cfg.seed})
    res = attack_runner.run_attacks(a_cfg, os.path.join(run_dir, 'validation_attacks'))
    clean = res[0]['clean_accuracy']
    robust = [r['robust_accuracy'] for r in res]
    rows.append({'eps': f'{e:g}/255', 'val_clean': clean, 'val_robust_8': robust[0],
                 'val_robust_16': robust[1], 'score': (clean + sum(robust) / len(robust)) / 2,
                 'model_dir': run_dir})
  best = max(rows, key=lambda r: r['score'])
  print(report.table(rows, ['eps', 'val_clean', 'val_robust_8', 'val_robust_16', 'score']))
  print(f'chosen eps {best["eps"]} (max of (clean + mean robust) / 2 on validation): {best["model_dir"]}')
  out = {'rows': rows, 'chosen': best}
  ckpt.write_json_atomic(os.path.join(workdir, 'line_search.json'), out)
  return out
