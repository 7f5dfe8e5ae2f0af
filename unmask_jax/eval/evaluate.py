"""evaluate.py's core: accuracy (Table IV form), detection (ROC) and part-extraction robustness.

Threat model of every number: gray-box, as in the UnMask paper — the attacks in attack.py were
computed against the victim M (or, for the AT column, against the adversarially trained M itself);
K and the defenses are unknown to the attacker. This is NOT an adaptive white-box evaluation.

Honest-evaluation rules applied here:
* detection thresholds are set on held-out CLEAN validation images only (never on test scores);
* defenses are fitted on clean training images only;
* positives = successful adversarial examples, negatives = their own clean counterparts
  (contamination 0.5); accuracies are also reported with contamination 1 and on clean data;
* the attack results must come from the same model and data (fingerprints are checked).
"""
from __future__ import annotations

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax import data as data_lib
from unmask_jax import defenses as defenses_lib
from unmask_jax.data import parts as parts_lib
from unmask_jax.data import pipeline
from unmask_jax.eval import attack_runner, metrics
from unmask_jax.models import functional, part_extraction
from unmask_jax.train import checkpoint as ckpt


def _extract(segment_fn, min_area, min_conf, x):
  return part_extraction.extract_parts(segment_fn(x), min_area, min_conf)


def load_part_extractor(k_dir: str) -> tuple[jax.tree_util.Partial, dict]:
  """K as a pure `x -> multi-hot parts` function (with its validation-chosen thresholds)."""
  model, spec = ckpt.load_model(k_dir)
  if spec['task'] != 'segmenter':
    raise ValueError(f'{k_dir} holds a {spec["task"]}, not the part extractor K (train_k.py)')
  path = os.path.join(k_dir, 'extraction.json')
  if not os.path.exists(path):
    raise ckpt.CheckpointError(f'{path} is missing: run train_k.py to the end (it chooses the '
                               'extraction thresholds on validation).')
  ex = ckpt.read_json(path)
  fn = jax.tree_util.Partial(_extract, functional.segment_fn(model), float(ex['min_area']),
                             float(ex['min_conf']))
  return fn, {**ex, 'fingerprint': ckpt.model_fingerprint(model)}


def _require(path: str, command: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing; create it with: {command}')
  return path


def load_attack_results(attacks_dir: str, model_fp: str, test: data_lib.ArrayDataset, who: str):
  """Reads attack.py's index + arrays, checking they were made on this model and data."""
  index = ckpt.read_json(_require(os.path.join(attacks_dir, attack_runner.INDEX),
                                  f'python3 attack.py --config.model_dir=<{who} dir> --workdir={attacks_dir}'))
  sub = test.take(slice(0, index['n']))
  if index['model_fingerprint'] != model_fp:
    raise ValueError(f'The attack results in {attacks_dir} were made on another model '
                     f'({index["model_fingerprint"]}) than the {who} evaluated here ({model_fp}); '
                     're-run attack.py on this model.')
  if index['data_fingerprint'] != sub.fingerprint():
    raise ValueError(f'The attack results in {attacks_dir} were made on other data than the '
                     f'{who}\'s test split; re-run attack.py.')
  results = {}
  for label in index.get('order', sorted(index['attacks'])):
    with np.load(_require(os.path.join(attacks_dir, f'{label}.npz'), 'python3 attack.py ...')) as f:
      results[label] = {k: f[k] for k in f.files}
  return index, sub, results


def _key_for(root, *names) -> jax.Array:
  h = int(hashlib.sha1('/'.join(names).encode()).hexdigest()[:8], 16)
  return jax.random.fold_in(root, h)


def _accuracy(pred, y) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(y)))


def evaluate_class_set(cs_name: str, cs, config, parts_fn, workdir: str) -> dict:
  """All numbers of one class set: see the module docstring."""
  root = jax.random.key(config.seed)
  m_model, m_spec = ckpt.load_model(cs.m_dir)
  m_fp = ckpt.model_fingerprint(m_model)
  data_cfg = m_spec['data_config']
  test = data_lib.load_from_config(data_cfg, 'test', data_dir=config.data_dir)
  index, test, adv = load_attack_results(cs.attacks_dir, m_fp, test, 'M')
  classes = tuple(m_spec['class_names'])
  v = parts_lib.parts_matrix(classes)   # errors if a class has no row in the table
  val = data_lib.load_from_config(data_cfg, 'validation', data_dir=config.data_dir)
  train = data_lib.load_from_config(data_cfg, 'train', data_dir=config.data_dir)
  if config.max_validation:
    val = val.take(slice(0, config.max_validation))
  if config.max_fit:
    rng = np.random.default_rng(config.seed)
    train = train.take(np.sort(rng.permutation(len(train))[:config.max_fit]))

  ctx = defenses_lib.Context(
      logits_fn=functional.logits_fn(m_model), features_fn=functional.features_fn(m_model),
      mc_logits_fn=functional.mc_logits_fn(m_model), head_fn=functional.head_fn(m_model),
      parts_fn=parts_fn, parts_matrix=jnp.asarray(v), num_classes=len(classes), class_names=classes)
  x_test, y_test = pipeline.to_float(test.arrays['image']), test.arrays['label']
  x_val = pipeline.to_float(val.arrays['image'])
  out = {'classes': list(classes), 'parts': parts_lib.overlap(classes)[0],
         'overlap': parts_lib.overlap(classes)[1], 'n_test': len(test), 'n_validation': len(val),
         'n_fit': len(train), 'model_fingerprint': m_fp, 'attacks': {}, 'clean': {},
         'sanity': index.get('sanity', [])}
  clean_pred = next(iter(adv.values()))['clean_pred'] if adv else None
  out['clean']['None'] = _accuracy(clean_pred, y_test)

  # AT column: the adversarially trained M under attacks computed against itself.
  at_results = {}
  if cs.get('at_dir', ''):
    at_model, at_spec = ckpt.load_model(cs.at_dir)
    at_index, _, at_results = load_attack_results(cs.at_attacks_dir, ckpt.model_fingerprint(at_model),
                                                  data_lib.load_from_config(at_spec['data_config'], 'test',
                                                                            data_dir=config.data_dir), 'AT-M')
    if at_results:
      out['clean']['AT'] = _accuracy(next(iter(at_results.values()))['clean_pred'], y_test[:at_index['n']])
    out['sanity_at'] = at_index.get('sanity', [])

  # K on clean test images: how well it recovers the true parts.
  ex_clean = _batched(parts_fn, x_test, config.batch_size)
  out['k_clean_presence'] = part_extraction.presence_prf(ex_clean, test.arrays['parts']) \
      if 'parts' in test.arrays else None

  det_states = {}
  for spec in config.defenses:
    name = spec
    d = defenses_lib.make(spec)
    state_path = os.path.join(workdir, 'states', f'{cs_name}_{_safe(name)}.npz')
    if os.path.exists(state_path):
      state = defenses_lib.load_state(state_path)
    else:
      t0 = time.time()
      state = d.fit(ctx, {'image': pipeline.to_float(train.arrays['image']), 'label': train.arrays['label']},
                    _key_for(root, cs_name, name, 'fit'))
      os.makedirs(os.path.dirname(state_path), exist_ok=True)
      defenses_lib.save_state(state_path, state)
      print(f'  fitted {name} on {len(train)} clean training images in {time.time() - t0:.1f}s')
    det_states[name] = (d, state)

  clean_scores, val_scores = {}, {}
  for name, (d, state) in det_states.items():
    val_scores[name] = np.asarray(d.score(state, ctx, x_val, _key_for(root, cs_name, name, 'val')))
    clean_scores[name] = np.asarray(d.score(state, ctx, x_test, _key_for(root, cs_name, name, 'clean')))
    if d.predict is not None:
      out['clean'][name] = _accuracy(d.predict(state, ctx, x_test, _key_for(root, cs_name, name, 'cpred')), y_test)

  for label, r in adv.items():
    row = index['attacks'][label]
    succ = r['success'].astype(bool)
    a = {'spec': row['spec'], 'norm': row['norm'], 'eps': row['eps'], 'success_rate': row['success_rate'],
         'n_success': int(succ.sum()), 'accuracy': {'None': _accuracy(r['adv_pred'], y_test)},
         'detection': {}, 'roc': {}}
    if label in at_results:
      a['accuracy']['AT'] = _accuracy(at_results[label]['adv_pred'], at_results[label]['label'])
    ex_adv = _batched(parts_fn, r['x_adv'], config.batch_size)
    if 'parts' in test.arrays:
      a['k_presence_f1_adv'] = part_extraction.presence_prf(ex_adv, test.arrays['parts'])['f1']
      a['k_presence_f1_clean'] = out['k_clean_presence']['f1']
    for name, (d, state) in det_states.items():
      s_adv = np.asarray(d.score(state, ctx, r['x_adv'], _key_for(root, cs_name, name, label)))
      if d.predict is not None:
        a['accuracy'][name] = _accuracy(d.predict(state, ctx, r['x_adv'], _key_for(root, cs_name, name, label, 'p')),
                                        y_test)
      if succ.sum() >= 2:
        a['detection'][name] = metrics.detection_report(val_scores[name], clean_scores[name][succ], s_adv[succ])
        a['roc'][name] = {'neg': clean_scores[name][succ].tolist(), 'pos': s_adv[succ].tolist()}
    out['attacks'][label] = a
  return out


def _safe(name: str) -> str:
  return ''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in name)[:80]


def _batched(fn: jax.tree_util.Partial, x, batch_size: int) -> np.ndarray:
  """A pure Partial over fixed-size padded batches (one compile); padding rows dropped."""
  return defenses_lib.base.map_chunks(lambda xb, _: {'out': _apply(fn, xb)}, x, batch_size)['out']


@jax.jit
def _apply(fn, x):
  return fn(x)


def evaluate(config, workdir: str) -> dict:
  """Evaluates every class set in `config.class_sets`; writes results.json, report.md, ROC PNGs."""
  from unmask_jax.eval import report_md
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  parts_fn, k_info = load_part_extractor(config.k_dir)
  results = {'threat_model': 'gray-box: attacks computed against M (AT column: against AT-M); '
                             'K and the defenses unknown to the attacker',
             'k': k_info, 'defenses': list(config.defenses), 'class_sets': {}}
  if not config.class_sets:
    raise ValueError('config.class_sets is empty: name at least one class set with its m_dir and attacks_dir')
  for name, cs in config.class_sets.items():
    print(f'evaluating {name} ...')
    results['class_sets'][name] = evaluate_class_set(name, cs, config, parts_fn, workdir)
  results['seconds'] = round(time.time() - t0, 1)
  plots = report_md.roc_plots(results, workdir)
  ckpt.write_json_atomic(os.path.join(workdir, 'results.json'), _strip_roc(results))
  path = report_md.write_report(results, plots, workdir)
  return {'report': path, 'results': results}


def _strip_roc(results: dict) -> dict:
  """results.json keeps every number but not the raw per-example scores behind the ROC plots."""
  import copy
  r = copy.deepcopy(results)
  for cs in r['class_sets'].values():
    for a in cs['attacks'].values():
      a.pop('roc', None)
  return r
