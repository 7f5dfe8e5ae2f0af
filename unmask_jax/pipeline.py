"""What the scripts call: train, attack, evaluate, and the one-command main job.

Every entry point checks its whole config (ranges, types, registry names) and that its workdir
can be written before it creates anything or computes anything, so a mistake costs seconds and
leaves nothing behind; a run that fails anyway removes a workdir it created and left empty.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import shutil
import tempfile
import time

from unmask_jax import errors
from unmask_jax.data import parts as parts_lib
from unmask_jax.utils import quiet_logs

EVALUATION_KEY = 'evaluation_key.json'


# ----------------------------------------------------------------------------- checks

def _fail(message: str):
  raise errors.ConfigError(message)


def _int(cfg, field: str, prefix: str, lo: int = 0) -> None:
  v = cfg.get(field)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
    _fail(f'{prefix}.{field} must be an integer >= {lo}, got {v!r}; set e.g. {prefix}.{field}={max(lo, 1)}')


def _number(cfg, field: str, prefix: str, lo: float, *, strict: bool, hi: float | None = None,
            hint: str = '') -> None:
  v = cfg.get(field)
  ok = (not isinstance(v, bool) and isinstance(v, numbers.Real) and (v > lo if strict else v >= lo)
        and (hi is None or v <= hi))
  if not ok:
    rng = f'{">" if strict else ">="} {lo:g}' + (f' and <= {hi:g}' if hi is not None else '')
    _fail(f'{prefix}.{field} must be a number {rng}, got {v!r}{hint}')


def _one_of(value, valid, what: str) -> None:
  if value not in valid:
    import difflib
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    _fail(f'{what} is {value!r}, not one of {", ".join(map(repr, valid))}.{hint}')


def validate_train_config(config, expect_task: str, prefix: str = '--config') -> None:
  """Ranges, types and names of a training config (configs/common.py), before anything runs."""
  from unmask_jax import data as data_lib
  from unmask_jax import models
  script = 'train_k.py' if expect_task == 'segmenter' else 'train_m.py'
  if config.get('task') != expect_task:
    _fail(f'{script} trains task={expect_task!r}, but this config has task={config.get("task")!r}; '
          'use the other script or another config.')
  for field in ('seed', 'debug_stop_after_steps'):
    if field in config:
      _int(config, field, prefix, 0)
  for field in ('num_epochs', 'batch_size', 'eval_batch_size'):
    if field in config:
      _int(config, field, prefix, 1)
  _one_of(config.model.name, models.MODELS.names(), f'{prefix}.model.name')
  d = config.data
  _one_of(d.name, data_lib.DATASETS.names(), f'{prefix}.data.name')
  if d.get('class_set'):
    _one_of(d.class_set, sorted(parts_lib.CLASS_SETS), f'{prefix}.data.class_set')
  for split in ('train', 'validation', 'test'):
    if f'max_{split}' in d:
      _int(d, f'max_{split}', f'{prefix}.data', 0)
  o = config.optimizer
  _one_of(o.name, ('sgd', 'adam', 'adamw', 'rmsprop'), f'{prefix}.optimizer.name')
  _one_of(o.schedule, ('cosine', 'constant'), f'{prefix}.optimizer.schedule')
  _number(o, 'learning_rate', f'{prefix}.optimizer', 0, strict=True)
  for field in ('weight_decay', 'warmup_epochs', 'momentum'):
    if field in o:
      _number(o, field, f'{prefix}.optimizer', 0, strict=False)
  if 'center_loss_weight' in config:
    _number(config, 'center_loss_weight', prefix, 0, strict=False)
  adv = config.get('adv_training', None)
  if adv is not None and adv.get('enabled', False):
    _number(adv, 'eps', f'{prefix}.adv_training', 0, strict=True, hi=1,
            hint=' (images are in [0, 1]: write 4/255, not 4)')
    _int(adv, 'steps', f'{prefix}.adv_training', 1)
    _number(adv, 'step_size_factor', f'{prefix}.adv_training', 0, strict=True)
  if expect_task == 'segmenter':
    ex = config.extraction
    if not len(ex.conf_grid) or not len(ex.area_grid):
      _fail(f'{prefix}.extraction.conf_grid and area_grid must not be empty')


def validate_attack_config(config, prefix: str = '--config', need_model_dir: bool = True) -> None:
  """Ranges and specs of an attack config (configs/attack.py); parses every attack spec."""
  from unmask_jax.eval import attack_runner
  if need_model_dir and not config.get('model_dir'):
    _fail(f'{prefix}.model_dir is empty; point it at a train_m.py workdir, e.g. '
          f'{prefix}.model_dir=runs/m_cs3a')
  _one_of(config.split, ('train', 'validation', 'test'), f'{prefix}.split')
  _int(config, 'max_examples', prefix, 0)
  _int(config, 'batch_size', prefix, 1)
  _int(config, 'seed', prefix, 0)
  if 'steps' in config:
    _int(config, 'steps', prefix, 1)
  attack_runner.parse_entries(list(config.attacks))


def validate_evaluate_config(config, prefix: str = '--config', need_inputs: bool = True) -> None:
  """Ranges, defense specs and (with `need_inputs`) the presence of every input stage's output.

  Unknown extra fields and sub-configs are allowed (they belong to the evaluation itself).
  """
  from unmask_jax import defenses as defenses_lib
  from unmask_jax.registry import parse_spec
  for field in ('batch_size',):
    _int(config, field, prefix, 1)
  for field in ('max_fit', 'max_validation', 'seed'):
    if field in config:
      _int(config, field, prefix, 0)
  for spec in config.defenses:
    try:
      name, _ = parse_spec(spec)
    except (ValueError, SyntaxError) as e:
      _fail(f'{prefix}.defenses entry {spec!r} is not a valid spec ({e}); write e.g. "kde(bandwidth=0.3)"')
    _one_of(name, defenses_lib.DEFENSES.names(), f'the defense name in {prefix}.defenses entry {spec!r}')
  if config.get('adaptive', None) is not None:
    _validate_adaptive(config.adaptive, f'{prefix}.adaptive')
  if not need_inputs:
    return
  if not config.class_sets:
    _fail(f'{prefix}.class_sets is empty: name at least one class set with its m_dir and attacks_dir')
  _require_model(config.k_dir, f'{prefix}.k_dir', 'python3 train_k.py --config=configs/synthparts_k.py '
                 f'--workdir={config.k_dir or "<dir>"}')
  for name, cs in config.class_sets.items():
    p = f'{prefix}.class_sets.{name}'
    _require_model(cs.get('m_dir', ''), f'{p}.m_dir', 'python3 train_m.py --config=configs/synthparts_m.py '
                   f'--workdir={cs.get("m_dir") or "<dir>"}')
    _require_attacks(cs.get('attacks_dir', ''), f'{p}.attacks_dir', cs.get('m_dir'), 'test')
    if cs.get('at_dir', ''):
      _require_model(cs.at_dir, f'{p}.at_dir', 'python3 train_m.py --config=configs/synthparts_m.py '
                     f'--config.adv_training.enabled=True --workdir={cs.at_dir}')
      _require_attacks(cs.get('at_attacks_dir', ''), f'{p}.at_attacks_dir', cs.at_dir, 'test')
    if cs.get('holdout_attacks_dir', ''):
      _require_attacks(cs.holdout_attacks_dir, f'{p}.holdout_attacks_dir', cs.get('m_dir'), 'validation')
    if cs.get('mrr_dir', '') and not os.path.isdir(cs.mrr_dir):
      raise errors.MissingInputError(
          f'{p}.mrr_dir={cs.mrr_dir} does not exist; train the defenders with: python3 train_m.py '
          f'--config=configs/mrr_defender.py --config.seed=<i> --workdir={cs.mrr_dir}/defender_<i>, or set it to ""')


def _require_model(path: str, what: str, command: str) -> None:
  from unmask_jax.train import checkpoint as ckpt
  if not path:
    _fail(f'{what} is empty; point it at a trained model\'s workdir')
  if not os.path.exists(os.path.join(path, ckpt.MODEL_SPEC)):
    raise errors.MissingInputError(f'{what}={path} holds no trained model ({ckpt.MODEL_SPEC} missing); '
                                   f'train it first: {command}')


def _require_attacks(path: str, what: str, model_dir, split: str) -> None:
  from unmask_jax.eval import attack_runner
  if not path:
    _fail(f'{what} is empty; point it at an attack.py workdir')
  if not os.path.exists(os.path.join(path, attack_runner.INDEX)):
    raise errors.MissingInputError(
        f'{what}={path} holds no attack results ({attack_runner.INDEX} missing); create them with: '
        f'python3 attack.py --config.model_dir={model_dir or "<model dir>"} --config.split={split} --workdir={path}')


def check_workdir(workdir: str, flag: str = '--workdir') -> None:
  """Errors unless `workdir` is (or can be created as) a directory this process can write in.

  Checked by writing a probe file in it (or its nearest existing parent), which also catches
  read-only mounts, before any work: a run must not compute for minutes and then fail to save.
  """
  if not workdir:
    _fail(f'{flag} is empty; give a directory for the outputs (it is created if missing)')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f'{flag}={workdir} is a file, not a directory; give a directory (it is created if missing)')
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    _fail(f'{flag}={workdir} cannot be created: {parent} is a file; give another directory')
  try:
    fd, probe = tempfile.mkstemp(dir=parent, prefix='.unmask_write_test_')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(f'{flag}={workdir} is not writable ({e.strerror} in {parent}); choose a '
                           'writable directory or fix its permissions') from None


def _has_results(path: str, bookkeeping=('model.json', 'config.json')) -> bool:
  for _, _, files in os.walk(path):
    if any(f not in bookkeeping for f in files):
      return True
  return False


@contextlib.contextmanager
def output_dir(workdir: str, flag: str = '--workdir'):
  """Checks `workdir` is writable; if the block fails, removes it when this run created it and
  it holds no results (at most the model.json / config.json written just before training)."""
  check_workdir(workdir, flag)
  existed = os.path.exists(workdir)
  try:
    yield
  except BaseException:
    if not existed and os.path.isdir(workdir) and not _has_results(workdir):
      shutil.rmtree(workdir, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------- entry points

def train(config, workdir: str, *, expect_task: str, overwrite: bool = False) -> dict:
  """Entry point of train_k.py / train_m.py."""
  from unmask_jax.train import trainer
  quiet_logs()
  validate_train_config(config, expect_task)
  t0 = time.time()
  with output_dir(workdir):
    final = trainer.train_and_evaluate(config, workdir, overwrite=overwrite)
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


def attack(config, workdir: str, *, overwrite: bool = False) -> list[dict]:
  """Entry point of attack.py: runs the configured attacks and prints the table + sanity checks."""
  from unmask_jax.eval import attack_runner
  quiet_logs()
  validate_attack_config(config)
  with output_dir(workdir):
    rows = attack_runner.run_attacks(config, workdir, overwrite=overwrite)
  index = attack_runner.ckpt.read_json(os.path.join(workdir, attack_runner.INDEX))
  attack_runner.print_results(rows, index['sanity'])
  return rows


def _file_hash(path: str) -> str | None:
  if not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def evaluation_key(config) -> dict:
  """The evaluation config plus a hash of every input stage's record, keying evaluate's cache.

  The inputs are the trained models' final.json (rewritten whenever a model is retrained), K's
  extraction.json, the attack indexes (attacks.json, rewritten whenever an attack is redone) and
  the extra report sections; when any changes, the defense states fitted in the workdir are stale.
  """
  from unmask_jax.eval import attack_runner
  files = [os.path.join(config.k_dir, 'final.json'), os.path.join(config.k_dir, 'extraction.json')]
  for cs in config.class_sets.values():
    for field in ('m_dir', 'at_dir'):
      if cs.get(field, ''):
        files.append(os.path.join(cs[field], 'final.json'))
    for field in ('attacks_dir', 'at_attacks_dir', 'holdout_attacks_dir'):
      if cs.get(field, ''):
        files.append(os.path.join(cs[field], attack_runner.INDEX))
    if cs.get('mrr_dir', '') and os.path.isdir(cs.mrr_dir):
      files += [os.path.join(cs.mrr_dir, d, 'final.json') for d in sorted(os.listdir(cs.mrr_dir))]
  files += list(config.get('extra_sections', ()))
  return {'config': json.loads(config.to_json(sort_keys=True)),
          'inputs': {os.path.abspath(f): _file_hash(f) for f in files}}


def evaluate(config, workdir: str, *, overwrite: bool = False) -> dict:
  """Entry point of evaluate.py.

  The defense states fitted in `<workdir>/states` are reused only while `evaluation_key` (config
  and inputs) is unchanged; otherwise (or with `overwrite`) they are removed and refitted.
  """
  from unmask_jax.eval import evaluate as evaluate_lib
  from unmask_jax.train import checkpoint as ckpt
  quiet_logs()
  validate_evaluate_config(config)
  key = evaluation_key(config)
  key_path = os.path.join(workdir, EVALUATION_KEY)
  with output_dir(workdir):
    states = os.path.join(workdir, 'states')
    if os.path.isdir(states) and (overwrite or not os.path.exists(key_path)
                                  or ckpt.read_json(key_path) != key):
      why = '--overwrite' if overwrite else 'the config or an input changed since they were fitted'
      print(f'removing the fitted defense states in {states} ({why})')
      shutil.rmtree(states)
    if os.path.exists(key_path):
      os.remove(key_path)   # re-recorded only once this evaluation has finished
    out = evaluate_lib.evaluate(config, workdir)
    ckpt.write_json_atomic(key_path, key)
  print(f'report: {out["report"]}')
  return out


def _validate_adaptive(a, prefix: str) -> None:
  """The adaptive-evaluation block of the evaluate config (eval/adaptive_eval.py)."""
  from unmask_jax import defenses as defenses_lib
  from unmask_jax.attacks import adaptive as adaptive_lib
  from unmask_jax.registry import parse_spec
  _int(a, 'n_images', prefix, 0)
  if not a.n_images:
    return
  _int(a, 'steps', prefix, 1)
  _int(a, 'restarts', prefix, 1)
  _one_of(a.targets, adaptive_lib.TARGETS, f'{prefix}.targets')
  _one_of(a.get('objective', 'selective'), tuple(adaptive_lib.OBJECTIVES), f'{prefix}.objective')
  _one_of(a.get('corrector', 'target'), adaptive_lib.CORRECTORS, f'{prefix}.corrector')
  if not float(a.kappa) >= 0:
    _fail(f'{prefix}.kappa must be >= 0 (a margin in logits), got {a.kappa!r}')
  if a.get('step_fraction', None) is not None and not float(a.step_fraction) > 0:
    _fail(f'{prefix}.step_fraction must be > 0 (a fraction of eps) or None, got '
          f'{a.step_fraction!r}')
  if not a.attacks:
    _fail(f'{prefix}.attacks is empty: name the gray-box attack labels to pair with, e.g. '
          "('PGD-Linf-8',), or set {prefix}.n_images=0 to skip the adaptive evaluation")
  for spec in tuple(a.get('defenses', ())) + tuple(a.get('extra_defenses', ())):
    try:
      name, _ = parse_spec(spec)
    except (ValueError, SyntaxError) as e:
      _fail(f'{prefix} defense {spec!r} is not a valid spec ({e})')
    _one_of(name, defenses_lib.DEFENSES.names(), f'the defense name in {prefix} entry {spec!r}')


def validate_main_config(config) -> None:
  """Every stage's config of the main job, checked before the first stage runs."""
  if 'combiner_holdout' in config:
    _int(config, 'combiner_holdout', '--config', 0)
  for cs in config.class_sets:
    _one_of(cs, sorted(parts_lib.CLASS_SETS), 'a --config.class_sets entry')
  validate_train_config(config.k, 'segmenter', '--config.k')
  validate_train_config(config.m, 'classifier', '--config.m')
  if config.adversarial_training:
    validate_train_config(config.at, 'classifier', '--config.at')
  if config.get('mrr', {}).get('num_defenders', 0):
    _int(config.mrr, 'num_defenders', '--config.mrr', 0)
    validate_train_config(config.mrr.defender, 'classifier', '--config.mrr.defender')
  validate_attack_config(config.attack, '--config.attack', need_model_dir=False)
  validate_evaluate_config(config.evaluate, '--config.evaluate', need_inputs=False)


def _with_data(cfg, data_dir: str, options: dict):
  cfg = cfg.copy_and_resolve_references()
  cfg.data.data_dir = data_dir
  cfg.data.options = dict(options)
  return cfg


def run_main(config, workdir: str, *, overwrite: bool = False, extra_stages=()) -> str:
  """The main job: data -> K -> M and AT-M per class set -> attacks -> evaluation -> report.md.

  `extra_stages`: (name, fn(workdir, eval_dir) -> markdown section) pairs run before the
  evaluation, whose sections end the report (main.py passes the digits study of experiments/).

  Every stage is cached in `workdir`: training resumes from its last checkpoint (and returns at
  once when finished), attack.py skips finished attacks, evaluation is skipped while its config
  and every input it reads are unchanged (`evaluation_key`). Killing the job and running it again continues where it stopped.
  A stage whose cached outputs were made with another config is an error naming the differences;
  `overwrite` redoes every stage instead.
  """
  from unmask_jax.eval import attack_runner
  from unmask_jax.train import checkpoint as ckpt
  quiet_logs()
  validate_main_config(config)
  check_workdir(workdir)
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
                                 expect_task='segmenter', overwrite=overwrite))
  eval_sets = {}
  for cs in config.class_sets:
    m_cfg = _with_data(config.m, config.data_dir, opts)
    m_cfg.data.class_set = cs
    stage(f'train M {cs}', lambda: train(m_cfg, os.path.join(workdir, f'm_{cs}'),
                                         expect_task='classifier', overwrite=overwrite))
    dirs = {'m_dir': os.path.join(workdir, f'm_{cs}'), 'attacks_dir': os.path.join(workdir, f'attacks_{cs}'),
            'at_dir': '', 'at_attacks_dir': ''}
    if config.adversarial_training:
      at_cfg = _with_data(config.at, config.data_dir, opts)
      at_cfg.data.class_set = cs
      stage(f'train AT-M {cs}', lambda: train(at_cfg, os.path.join(workdir, f'at_{cs}'),
                                              expect_task='classifier', overwrite=overwrite))
      dirs.update(at_dir=os.path.join(workdir, f'at_{cs}'), at_attacks_dir=os.path.join(workdir, f'attacks_at_{cs}'))
    n_mrr = config.get('mrr', {}).get('num_defenders', 0)
    if n_mrr:
      # MRR defenders (Rouhani et al. 2018): M's architecture, each from its own seed, CE + center loss.
      dirs['mrr_dir'] = os.path.join(workdir, f'mrr_{cs}')

      def train_defenders():
        for i in range(n_mrr):
          d_cfg = _with_data(config.mrr.defender, config.data_dir, opts)
          d_cfg.data.class_set, d_cfg.seed = cs, config.mrr.defender.seed + i
          train(d_cfg, os.path.join(dirs['mrr_dir'], f'defender_{i}'), expect_task='classifier',
                overwrite=overwrite)
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
      if split != 'test' and 'extra_attacks' in a_cfg:
        a_cfg.extra_attacks = ()   # the held-out split fits the LR combiner on the paper's vectors
      stage(f'attack {who} {cs}', lambda: attack(a_cfg, out_dir, overwrite=overwrite))
    eval_sets[cs] = dirs

  e_cfg = config.evaluate.copy_and_resolve_references()
  e_cfg.k_dir, e_cfg.data_dir = os.path.join(workdir, 'k'), config.data_dir
  import ml_collections
  e_cfg.class_sets = ml_collections.ConfigDict(eval_sets)
  eval_dir = os.path.join(workdir, 'eval')
  report_path = os.path.join(eval_dir, 'report.md')
  sections = []
  for name, run_study in extra_stages:
    # A study outside the library (experiments/, e.g. the digits study): it runs in its own
    # subfolder and returns a markdown section, appended to the main report.
    text = stage(name, lambda: run_study(workdir, eval_dir))
    section = os.path.join(eval_dir, f'{"".join(c if c.isalnum() else "_" for c in name)}_section.md')
    os.makedirs(eval_dir, exist_ok=True)
    if not os.path.exists(section) or open(section).read() != text:
      with open(section, 'w') as f:
        f.write(text)
    sections.append(section)
  if sections:
    e_cfg.extra_sections = tuple(sections)
  # Re-evaluate when the evaluation config or any input (a model, an attack index, an extra
  # stage's section) changed since the report was written: `evaluate` records the key when it finishes.
  key_path = os.path.join(eval_dir, EVALUATION_KEY)
  fresh = (not overwrite and os.path.exists(report_path) and os.path.exists(key_path)
           and ckpt.read_json(key_path) == evaluation_key(e_cfg))
  if fresh:
    print(f'\n=== evaluate: {report_path} is up to date, skipped')
  else:
    stage('evaluate', lambda: evaluate(e_cfg, eval_dir, overwrite=overwrite))
  times['total (this run)'] = round(time.time() - t_all, 1)
  with open(times_path, 'a') as f:   # one line per run: the history of stage times
    f.write(json.dumps(times) + '\n')
  print('\nStage wall times (s): ' + ', '.join(f'{k} {v}' for k, v in times.items()))
  if 'evaluate' in times:   # a report written by this run (a cached one is left untouched)
    with open(times_path) as f:
      history = [json.loads(line) for line in f if line.strip()]
    with_stage_times(report_path, history)
  print(f'\nDone. Read the report: {report_path}')
  return report_path


STAGE_TIMES_HEADING = '## Main job: wall seconds per stage'


def stage_times_section(history: list[dict], runs: int = 4) -> str:
  """Markdown table of the last `runs` runs of the main job (columns, newest last), one row per
  stage: seconds of that run, near zero where the stage was cached. A stage a run did not reach
  (killed, or a failure) is blank."""
  first = max(len(history) - runs, 0) + 1   # runs are numbered from the workdir's first
  history = history[-runs:]
  stages = list(dict.fromkeys(k for h in history for k in h if k != 'total (this run)'))
  stages.append('total (this run)')
  cols = [f'run {i}' for i in range(first, first + len(history))]
  cols[-1] += ' (this one)'
  lines = [STAGE_TIMES_HEADING, '',
           'From `stage_seconds.jsonl` in the workdir (one line per run of `main.py`). A stage '
           'whose outputs were cached shows its near-zero check time; a fresh workdir shows what '
           'each stage costs.', '',
           '| stage | ' + ' | '.join(cols) + ' |', '|---|' + '---|' * len(cols)]
  for st in stages:
    cells = [f'{h[st]:.1f}' if st in h else '' for h in history]
    lines.append(f'| {"total" if st == "total (this run)" else st} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def with_stage_times(report_path: str, history: list[dict]) -> None:
  """Replaces (or appends) the stage-times section at the end of report.md."""
  with open(report_path) as f:
    text = f.read()
  at = text.find(STAGE_TIMES_HEADING)
  if at >= 0:
    text = text[:at]
  from unmask_jax.train import checkpoint as ckpt
  ckpt.write_text_atomic(report_path, text.rstrip('\n') + '\n\n' + stage_times_section(history))


def at_line_search(config, workdir: str, eps_255: list[float], attack_steps: int = 20, *,
                   overwrite: bool = False) -> dict:
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
    _fail('give at least one eps, e.g. --at_line_search=1,2,4,6,8,16')
  # Values below 0.25 are almost surely [0, 1] units (0.03 meaning 8/255), not 0.03/255.
  bad = [e for e in eps_255 if not 0.25 <= e <= 255]
  if bad:
    _fail(f'line-search eps are in 1/255 units (e.g. 4 for 4/255), between 0.25 and 255; got {bad}')
  validate_train_config(config, 'classifier')
  check_workdir(workdir)
  rows = []
  for e in eps_255:
    cfg = config.copy_and_resolve_references()
    cfg.adv_training.enabled = True
    cfg.adv_training.eps = e / 255
    run_dir = os.path.join(workdir, f'eps_{e:g}')
    train(cfg, run_dir, expect_task='classifier', overwrite=overwrite)
    a_cfg = ml_collections.ConfigDict({
        'model_dir': run_dir, 'data_dir': cfg.data.data_dir, 'split': 'validation', 'max_examples': 0,
        'attacks': (f'PGD-Linf-8=pgd_linf(eps=8/255, steps={attack_steps})',
                    f'PGD-Linf-16=pgd_linf(eps=16/255, steps={attack_steps})'),
        'steps': attack_steps, 'batch_size': cfg.eval_batch_size, 'seed': cfg.seed})
    res = attack_runner.run_attacks(a_cfg, os.path.join(run_dir, 'validation_attacks'), overwrite=overwrite)
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
