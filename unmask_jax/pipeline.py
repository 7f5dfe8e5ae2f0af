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
