"""evaluate.py's core: accuracy (Table IV form), detection (ROC), part-extraction robustness
and the adaptive (defense-aware) evaluation.

Two threat models. The tables of accuracy and detection are gray-box, as in the UnMask paper: the
attacks in attack.py were computed against the victim M (or, for the AT column, against the
adversarially trained M itself); K and the defenses are unknown to the attacker. The adaptive
section (`eval/adaptive_eval.py`, config block `adaptive`) attacks every defense white-box, through
its surrogate, and its per-image worst case over both attacks is the headline of the report.

Honest-evaluation rules applied here:
* detection thresholds are set on held-out CLEAN validation images only (never on test scores);
* defenses are fitted on clean training images only; the LR combiner's logistic regression (the
  one detector that needs adversarial examples to fit) is fitted on attacks of the first validation
  images (`holdout_attacks_dir`), and thresholds then use only the other validation images;
* every defense's state carries its operating threshold (`defenses.base.calibrate`: 5% FPR on
  clean validation images, unless the defense has its own, e.g. MRR's security parameter);
* MRR and other defenses with their own operating point (`state['threshold']`, e.g. MRR's
  security parameter) also get flag rates and defense success at that point;
* positives = successful adversarial examples, negatives = their own clean counterparts
  (contamination 0.5); accuracies are also reported with contamination 1 and on clean data;
* the attack results must come from the same model and data (fingerprints are checked).
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
from unmask_jax.data import pipeline
from unmask_jax.eval import attack_runner, metrics
from unmask_jax.models import functional, part_extraction
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.utils import named_key as _key_for


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
  # The exact rule, with a differentiable surrogate for adaptive attacks (part_extraction.soft_parts).
  fn = part_extraction.part_extractor(functional.segment_fn(model), float(ex['min_area']),
                                      float(ex['min_conf']))
  return fn, {**ex, 'fingerprint': ckpt.model_fingerprint(model)}


def _require(path: str, command: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing; create it with: {command}')
  return path


def load_attack_results(attacks_dir: str, model_fp: str, test: data_lib.ArrayDataset, who: str,
                        split: str = 'test'):
  """Reads attack.py's index + arrays, checking they were made on this model and data.

  `test` is the split the attacks must have been run on (`split` names it): its first
  `index['n']` images are returned with the results.
  """
  index = ckpt.read_json(_require(os.path.join(attacks_dir, attack_runner.INDEX),
                                  f'python3 attack.py --config.model_dir=<{who} dir> '
                                  f'--config.split={split} --workdir={attacks_dir}'))
  if index.get('split', 'test') != split:
    raise ValueError(f'{attacks_dir} holds attacks on the {index.get("split")!r} split, but the '
                     f'{split!r} split is expected here.')
  if index['n'] > len(test):
    raise ValueError(f'{attacks_dir} attacked {index["n"]} images, more than the {len(test)} of '
                     f'the {split} split given')
  sub = test.take(slice(0, index['n']))
  if index['model_fingerprint'] != model_fp:
    raise ValueError(f'The attack results in {attacks_dir} were made on another model '
                     f'({index["model_fingerprint"]}) than the {who} evaluated here ({model_fp}); '
                     're-run attack.py on this model.')
  if index['data_fingerprint'] != sub.fingerprint():
    raise ValueError(f'The attack results in {attacks_dir} were made on other data than the '
                     f'{who}\'s {split} split; re-run attack.py.')
  results = {}
  for label in index.get('order', sorted(index['attacks'])):
    results[label] = attack_runner.load_result(attacks_dir, label)   # sha256-verified
  return index, sub, results


def _accuracy(pred, y) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(y)))


def load_defenders(mrr_dir: str, m_spec: dict) -> tuple[tuple, list[dict]]:
  """Feature functions of the MRR defenders in `<mrr_dir>/defender_<i>` (train_m.py workdirs).

  Returns (features_fns in index order, [{'dir', 'test_accuracy'}]). Each defender must have been
  trained on the victim's data (same class names and data config).
  """
  if not mrr_dir:
    return (), []
  names = [d for d in os.listdir(_require(mrr_dir, 'python3 train_m.py --config=configs/mrr_defender.py ...'))
           if d.startswith('defender_') and d.split('_', 1)[1].isdigit()]
  fns, info = [], []
  for d in sorted(names, key=lambda n: int(n.split('_', 1)[1])):
    path = os.path.join(mrr_dir, d)
    model, spec = ckpt.load_model(path)
    if spec['model'] != 'mrr_defender':
      raise ValueError(f'{path} holds a {spec["model"]}, not an mrr_defender')
    if spec['class_names'] != m_spec['class_names'] or spec['data_config'] != m_spec['data_config']:
      raise ValueError(f'The MRR defender {path} was trained on other data than the victim M')
    fns.append(functional.features_fn(model))
    final = os.path.join(path, 'final.json')
    acc = ckpt.read_json(final)['test']['accuracy'] if os.path.exists(final) else None
    info.append({'dir': path, 'test_accuracy': acc})
  return tuple(fns), info


def _flag_stats(state, s_clean, s_adv, success, clean_correct) -> dict:
  """At a defense's own operating point (state['threshold'], e.g. MRR's SP): flag rates.

  defense_success = share of the images M classifies correctly when clean on which the attack
  fails or is flagged (Rouhani et al. 2018's measure).
  """
  t = float(state['threshold'])
  flagged = np.asarray(s_adv) > t
  ok = np.asarray(clean_correct, bool)
  return {'clean_flag_rate': metrics.rate_above(s_clean, t),
          'adv_flag_rate': metrics.rate_above(np.asarray(s_adv)[success], t),
          'defense_success': float(np.mean((~success | flagged)[ok])) if ok.any() else float('nan')}


def _fitted_state(workdir, cs_name, name, fit_fn):
  """Fits (or reloads) a defense state, saved so that a rerun of the evaluation resumes."""
  state_path = os.path.join(workdir, 'states', f'{cs_name}_{_safe(name)}.npz')
  if os.path.exists(state_path):
    return defenses_lib.load_state(state_path)
  t0 = time.time()
  state = fit_fn()
  os.makedirs(os.path.dirname(state_path), exist_ok=True)
  defenses_lib.save_state(state_path, state)
  print(f'  fitted {name} in {time.time() - t0:.1f}s')
  return state


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
  # Held-out adversarial split for the LR combiner: attacks on the FIRST validation images; the
  # thresholds of every detector are then set on the remaining validation images only, so nothing
  # the combiner was fitted on is ever scored.
  holdout_index, holdout, holdout_adv = None, None, {}
  if cs.get('holdout_attacks_dir', ''):
    holdout_index, holdout, holdout_adv = load_attack_results(
        cs.holdout_attacks_dir, m_fp, val, 'M', split='validation')
    val = val.take(slice(holdout_index['n'], None))
    if len(val) < 20:
      raise ValueError(f'Only {len(val)} validation images are left for thresholds after the '
                       f'{holdout_index["n"]} attacked for the combiner; attack fewer.')
  if config.max_validation:
    val = val.take(slice(0, config.max_validation))
  if config.max_fit:
    rng = np.random.default_rng(config.seed)
    train = train.take(np.sort(rng.permutation(len(train))[:config.max_fit]))

  defender_fns, defender_info = load_defenders(cs.get('mrr_dir', ''), m_spec)
  ctx = defenses_lib.Context(
      logits_fn=functional.logits_fn(m_model), features_fn=functional.features_fn(m_model),
      mc_logits_fn=functional.mc_logits_fn(m_model), head_fn=functional.head_fn(m_model),
      intermediates_fn=functional.intermediates_fn(m_model),
      parts_fn=parts_fn, parts_matrix=jnp.asarray(v), num_classes=len(classes), class_names=classes,
      defenders=defender_fns)
  x_test, y_test = pipeline.to_float(test.arrays['image']), test.arrays['label']
  x_val = pipeline.to_float(val.arrays['image'])
  x_holdout = pipeline.to_float(holdout.arrays['image']) if holdout is not None else None
  out = {'classes': list(classes), 'parts': parts_lib.overlap(classes)[0],
         'overlap': parts_lib.overlap(classes)[1], 'n_test': len(test), 'n_validation': len(val),
         'n_fit': len(train), 'model_fingerprint': m_fp, 'attacks': {}, 'clean': {},
         'sanity': index.get('sanity', []), 'flags_clean': {}, 'mrr_defenders': defender_info,
         'n_combiner_holdout': holdout_index['n'] if holdout_index else 0}
  clean_pred = next(iter(adv.values()))['clean_pred'] if adv else None
  out['clean']['None'] = _accuracy(clean_pred, y_test)
  clean_correct = np.asarray(clean_pred) == np.asarray(y_test)

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

  fit_data = {'image': pipeline.to_float(train.arrays['image']), 'label': train.arrays['label']}
  holdout_data = None
  if holdout_index is not None:
    holdout_data = {'x_clean': x_holdout, 'attacks': holdout_adv}
  det_states = {}
  # Wall seconds per defense (fit when not cached, then scoring/prediction): its cost in the report.
  cost = out['defense_seconds'] = {name: 0.0 for name in config.defenses}
  for name in config.defenses:
    t0 = time.perf_counter()
    d = make_defense(name)
    det_states[name] = (d, fitted_states(d, name, ctx, fit_data, x_val, holdout_data, adv, root,
                                         cs_name, workdir))
    cost[name] += time.perf_counter() - t0

  # Clean validation/test decisions (one per state: a defense fitted per attack has one per attack).
  clean_dec, val_dec = {}, {}
  for name, (d, states) in det_states.items():
    t0 = time.perf_counter()
    for sk, state in states.items():
      val_dec[name, sk] = d.decide(state, ctx, x_val, _key_for(root, cs_name, name, 'val'))
      clean_dec[name, sk] = d.decide(state, ctx, x_test, _key_for(root, cs_name, name, 'clean'))
    first = next(iter(states))
    if d.corrects:
      out['clean'][name] = _accuracy(clean_dec[name, first]['pred'], y_test)
    if own_operating_point(states[first]):
      t = float(states[first]['threshold'])
      out['flags_clean'][name] = {'validation': metrics.rate_above(val_dec[name, first]['score'], t),
                                  'test': metrics.rate_above(clean_dec[name, first]['score'], t)}
    cost[name] += time.perf_counter() - t0

  # Per image and method: correct under each attack, for the per-image worst case over attacks.
  correct: dict[str, list] = {}

  def record(a, method, pred, y, label):
    ok = np.asarray(pred) == np.asarray(y)
    a['accuracy'][method] = float(np.mean(ok))
    a['accuracy_ci'][method] = metrics.bootstrap_mean_ci(ok, seed=config.seed)
    correct.setdefault(method, []).append(ok)

  for label, r in adv.items():
    row = index['attacks'][label]
    succ = r['success'].astype(bool)
    a = {'spec': row['spec'], 'norm': row['norm'], 'eps': row['eps'], 'success_rate': row['success_rate'],
         'n_success': int(succ.sum()), 'accuracy': {}, 'accuracy_ci': {},
         'detection': {}, 'roc': {}, 'flags': {}}
    record(a, 'None', r['adv_pred'], y_test, label)
    if label in at_results:
      record(a, 'AT', at_results[label]['adv_pred'], at_results[label]['label'], label)
    ex_adv = _batched(parts_fn, r['x_adv'], config.batch_size)
    if 'parts' in test.arrays:
      a['k_presence_f1_adv'] = part_extraction.presence_prf(ex_adv, test.arrays['parts'])['f1']
      a['k_presence_f1_clean'] = out['k_clean_presence']['f1']
    for name, (d, states) in det_states.items():
      sk = label if label in states else ('' if '' in states else None)
      if sk is None:   # fitted per attack, and this attack has no held-out fitting data
        continue
      t0 = time.perf_counter()
      state = states[sk]
      dec = d.decide(state, ctx, r['x_adv'], _key_for(root, cs_name, name, label))
      s_val, s_clean, s_adv = val_dec[name, sk]['score'], clean_dec[name, sk]['score'], dec['score']
      if d.corrects:
        record(a, name, dec['pred'], y_test, label)
      if own_operating_point(state):
        a['flags'][name] = _flag_stats(state, s_clean, s_adv, succ, clean_correct)
      if succ.sum() >= 2:
        a['detection'][name] = metrics.detection_report(s_val, s_clean[succ], s_adv[succ])
        a['roc'][name] = {'neg': s_clean[succ].tolist(), 'pos': s_adv[succ].tolist()}
      cost[name] += time.perf_counter() - t0
    out['attacks'][label] = a
  # AutoAttack's convention (Croce & Hein 2020): robust accuracy = correct under EVERY attack,
  # per image; never the minimum of per-attack averages.
  n_attacks = len(adv)
  out['worst_case'] = {'attacks': list(adv), 'accuracy': {}, 'accuracy_ci': {}}
  for method, oks in correct.items():
    if len(oks) == n_attacks and len({len(o) for o in oks}) == 1:
      ok = np.logical_and.reduce(oks)
      out['worst_case']['accuracy'][method] = float(np.mean(ok))
      out['worst_case']['accuracy_ci'][method] = metrics.bootstrap_mean_ci(ok, seed=config.seed)
  adaptive_cfg = config.get('adaptive', None)
  if (adaptive_cfg is not None and adaptive_cfg.get('n_images', 0)
      and cs_name in (adaptive_cfg.get('class_sets', ()) or (cs_name,))):
    from unmask_jax.eval import adaptive_eval
    t0 = time.perf_counter()
    out['adaptive'] = adaptive_eval.evaluate_adaptive(
        adaptive_cfg, det_states, ctx, x_test, y_test,
        {l: {**r, 'norm': index['attacks'][l]['norm'], 'eps': index['attacks'][l]['eps']} for l, r in adv.items()},
        clean_dec, _key_for(root, cs_name, 'adaptive'),
        make_defense=make_defense,
        fit=lambda d, n, n_cal: fitted_states(d, n, ctx, fit_data, x_val[:n_cal], None, adv, root,
                                              cs_name, workdir))
    out['adaptive_seconds'] = round(time.perf_counter() - t0, 1)
  dip_cfg = config.get('dip', None)
  if dip_cfg is not None and cs_name in dip_cfg.class_sets:
    t0 = time.perf_counter()
    _add_deep_protection(out, dip_cfg, ctx, val, x_val, test, x_test, y_test, adv, root, cs_name,
                         workdir)
    cost[DIP] = time.perf_counter() - t0
  out['defense_seconds'] = {k: round(v, 2) for k, v in cost.items()}
  return out


# Deep Protection's name in results (the registry's defense, with the study's fixed stop); the
# report shows it as "DP (subset)": it runs on a subset of the test images (see
# deep_protection_eval).
DIP = 'deep_protection'


def _add_deep_protection(out, dip_cfg, ctx, val, x_val, test, x_test, y_test, adv, root, cs_name,
                         workdir) -> None:
  """Runs `deep_protection_eval` on the configured subset (cached by config and model) and adds its
  fixed-stop accuracy, residual-detection AUC and ROC data under the name `DIP`.

  Only the first `n_images` test images are restored (DIP fits one network per image), so these
  entries are over that subset, unlike the other columns; the report says so.
  """
  from unmask_jax.eval import deep_protection_eval
  overrides = {k: v for k, v in dip_cfg.to_dict().items() if k not in ('class_sets', 'attacks')}
  labels = [l for l in dip_cfg.attacks if l in adv]
  stamp = {'config': json.loads(json.dumps(overrides)), 'attacks': labels,
           'model': out['model_fingerprint'], 'test': test.fingerprint(), 'val': val.fingerprint()}
  path = os.path.join(workdir, 'states', f'{cs_name}_dip_study.json')
  result = ckpt.read_json(path) if os.path.exists(path) else None
  if result is None or result.get('stamp') != stamp:
    print(f'  Deep Protection (DIP) on the first {overrides.get("n_images")} test images x '
          f'{len(labels)} attacks + clean ...')
    result = deep_protection_eval.evaluate_stop_rules(
        ctx, x_val, val.arrays['label'], x_test, y_test, {l: adv[l]['x_adv'] for l in labels},
        _key_for(root, cs_name, 'dip'), cfg=overrides)
    result['stamp'] = stamp
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ckpt.write_json_atomic(path, result)
  out['dip'] = result
  out['clean'][DIP] = result['accuracy']['clean']['fixed']
  per = result['per_image']
  for label in labels:
    a = out['attacks'][label]
    a['accuracy'][DIP] = result['accuracy'][label]['fixed']
    det = result['detection'][label]
    if det.get('n_pos', 0) >= 2:
      a['detection'][DIP] = det
      n = result['n_images']
      succ = np.asarray(adv[label]['success'][:n], bool)
      a['roc'][DIP] = {'neg': np.asarray(per['clean']['residual_fixed'])[succ].tolist(),
                       'pos': np.asarray(per[label]['residual_fixed'])[succ].tolist()}


_DEFENSE_CACHE: dict = {}


def make_defense(spec: str):
  """`defenses.make(spec)`, one object per spec: equal specs share jit caches across class sets."""
  if spec not in _DEFENSE_CACHE:
    _DEFENSE_CACHE[spec] = defenses_lib.make(spec)
  return _DEFENSE_CACHE[spec]


def own_operating_point(state) -> bool:
  """Whether the defense set its threshold itself (e.g. MRR's SP) rather than `calibrate`."""
  return 'threshold' in state and 'threshold_fpr' not in state


def fitted_states(d, name, ctx, fit_data, x_val, holdout, adv, root, cs_name, workdir) -> dict:
  """{state key: fitted, calibrated state} of one defense, cached in `workdir/states`.

  One state ('') for defenses fitted on clean data only. A defense that also learns from
  adversarial examples (`fit_adversarial`, e.g. the LR combiner; Feinman et al. fit one per
  attack) gets one state per attack label, fitted on the held-out validation attacks of that
  label: their clean versions, matched-noise copies and the successful adversarial versions.
  Thresholds are then calibrated on the OTHER clean validation images.
  """
  from unmask_jax.defenses import base
  clean = _fitted_state(workdir, cs_name, name,
                        lambda: d.fit(ctx, fit_data, _key_for(root, cs_name, name, 'fit')))
  calib = lambda st, tag: base.calibrate(d, st, ctx, x_val, _key_for(root, cs_name, name, tag, 'cal'))
  if d.fit_adversarial is None:
    return {'': _fitted_state(workdir, cs_name, f'{name}_calibrated', lambda: calib(clean, ''))}
  if holdout is None:
    raise ValueError(f'{name} learns from adversarial examples: give the class set a '
                     'holdout_attacks_dir (attack.py --config.split=validation).')
  states = {}
  for label in adv:
    h = holdout['attacks'].get(label)
    if h is None or h['success'].astype(bool).sum() < 2:
      continue
    ok = h['success'].astype(bool)
    x_h, x_a = holdout['x_clean'][ok], h['x_adv'][ok]
    states[label] = _fitted_state(
        workdir, cs_name, f'{name}_{label}',
        lambda: calib(d.fit_adversarial(clean, ctx, x_h, x_a, _key_for(root, cs_name, name, label, 'lr')),
                      label))
  return states


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
             'adaptive_threat_model': 'white-box: the attacker knows M, the defense, its state and '
                                      'threshold; headline = per-image worst case over both',
             'k': k_info, 'defenses': list(config.defenses), 'class_sets': {}}
  if config.get('dip', None) is not None and config.dip.class_sets:
    results['defenses'].append(DIP)
  if not config.class_sets:
    raise ValueError('config.class_sets is empty: name at least one class set with its m_dir and attacks_dir')
  for name, cs in config.class_sets.items():
    print(f'evaluating {name} ...')
    results['class_sets'][name] = evaluate_class_set(name, cs, config, parts_fn, workdir)
  results['seconds'] = round(time.time() - t0, 1)
  plots = report_md.roc_plots(results, workdir)
  ckpt.write_json_atomic(os.path.join(workdir, 'results.json'), _strip_roc(results))
  path = report_md.write_report(results, plots, workdir, tuple(config.get('extra_sections', ())))
  return {'report': path, 'results': results}


def _strip_roc(results: dict) -> dict:
  """results.json keeps every number but not the raw per-example scores behind the ROC plots."""
  import copy
  r = copy.deepcopy(results)
  for cs in r['class_sets'].values():
    for a in cs['attacks'].values():
      a.pop('roc', None)
  return r
