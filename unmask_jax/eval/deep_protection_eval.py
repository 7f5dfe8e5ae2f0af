"""Deep Protection (Kulkarni & Ambati) evaluated: fixed, auto and oracle stop from ONE DIP run.

Deep Protection restores each input with a Deep Image Prior and classifies the restoration with the
unchanged victim M (`unmask_jax.defenses.deep_protection`). Its three stop rules differ only in
WHICH checkpoint's EMA output they keep: the EMA output at a checkpoint does not depend on when (or
whether) the image stops. So every image is restored once, to `max_iters`, recording M's logits and
the MSE to the input at every checkpoint (`deep_protection.dip_trajectory`), and then:

  fixed:  the checkpoint `iters` chosen on CLEAN VALIDATION images only: the earliest checkpoint
          whose validation accuracy is within `fit_tolerance` of the best (the rule of
          `deep_protection.make(iters=None)`); the same iteration for every image.
  auto:   the first checkpoint where the label-free 'auto' rule fires (noise floor reached or loss
          curve flat; `deep_protection.auto_stop_index`), capped at `max_iters`.
  oracle: UPPER BOUND ONLY, it uses the true label: the first checkpoint where the true class is in
          M's top-k (Kulkarni & Ambati's "automatic termination"), else the last checkpoint.

Kulkarni & Ambati used top-5 among ImageNet's 1000 classes (0.5% of them). Top-5 of 3 classes always holds,
so the oracle's k is capped at a tenth of the classes and is at least 1:
k = max(1, min(oracle_topk, num_classes // 10)), i.e. top-1 for SynthParts' 3-5 classes. Even
top-1 is a loose bound with 3 classes (any checkpoint that happens to predict the true class
counts), which is why it is an upper bound and never a defense result.

Cost and subset: DIP fits a network per image (~2 ms per image-iteration on an idle 2-core CPU), so
only a documented subset is restored: the first `n_images` test images, each clean and under
every attack, plus `val_size` clean validation images to choose the fixed stop; Kulkarni & Ambati likewise
used 100 images x 8 attacks. All of them are restored in one `dip_trajectory` call (rows:
validation, clean test, then each attack in order; row r uses `fold_in(key, r)`), `chunk` images
at a time.

Threat model: gray-box, as the rest of the evaluation: the attacks were computed against M alone;
DIP (and its randomness) is unknown to the attacker. This is not an adaptive (BPDA + EOT) attack on
the defense.

Also reported: the restoration residual ||x - x_hat||^2 at the fixed stop as a detection score (ROC
AUC; positives = successful adversarial examples, negatives = their clean counterparts; TPR at a
threshold set on the clean validation images' residuals) and the fraction of clean accuracy
recovered, (acc_dip(adv) - acc_none(adv)) / (acc_none(clean) - acc_none(adv)).

Used by the evaluation (`eval.evaluate`, config block `dip`: the "DP (subset)" column and each
class set's Deep Protection section of the report) and, on its own, by the study script
`experiments/deep_protection/study.py`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from unmask_jax.defenses import base
from unmask_jax.defenses import deep_protection as dp
from unmask_jax.eval import metrics

RULES = ('fixed', 'auto', 'oracle')
CLEAN = 'clean'


def default_config() -> ml_collections.ConfigDict:
  """Every option, with the defaults the main job runs (SynthParts 32x32x3, 3 classes, 2-core CPU).

  With widths (16, 32, 32), DIP restores clean images to M's accuracy by ~125 iterations; attacked
  images recover most of it at ~125-175 iterations and lose some again later as the generator
  re-draws the perturbation; the 'auto' rule stops attacked images at ~210-250 (clean ones mostly
  run to the cap), hence max_iters 250. Measured costs and the (32, 64, 64) comparison:
  experiments/deep_protection/config.py.
  """
  return ml_collections.ConfigDict({
      'n_images': 32,          # first n test images (each clean and under every attack)
      'val_size': 32,          # first clean validation images, to choose the fixed stop
      'max_iters': 250,        # every image runs this long (the trajectory)
      'check_every': 25,       # iterations between checkpoints
      'chunk': 32,             # images restored at once
      'iters': None,           # fixed stop: None = choose on validation; or an iteration count
      'fit_tolerance': 0.01,   # fixed stop: earliest checkpoint within this of the best val acc
      'min_iters': 100,        # 'auto' rule (see deep_protection)
      'auto_tol': 0.01,
      'noise_level': None,     # None: estimate each input's noise std without labels
      'oracle_topk': 5,        # Kulkarni & Ambati's top-5, capped at num_classes // 10 (>= 1)
      'widths': (16, 32, 32),  # DIPConfig; (32, 64, 64) costs ~2.9x per iteration
      'skip_channels': 4,
      'input_depth': 8,
      'input_scale': 0.1,
      'reg_noise_std': 1.0 / 30.0,
      'lr': 0.01,
      'ema': 0.99,
      'conv': 'im2col',
  })


def _merged_config(cfg) -> dict:
  out = default_config().to_dict()
  given = {} if cfg is None else (cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
  unknown = sorted(set(given) - set(out))
  if unknown:
    raise ValueError(f'Unknown Deep Protection evaluation config fields {unknown}; '
                     f'known: {sorted(out)}')
  out.update(given)
  out['widths'] = tuple(int(w) for w in out['widths'])
  for name in ('n_images', 'val_size', 'max_iters', 'check_every', 'chunk'):
    if int(out[name]) < 1:
      raise ValueError(f'{name} must be >= 1, got {out[name]}')
  it = out['iters']
  if it is not None and not (0 < it <= out['max_iters'] and
                             (it % out['check_every'] == 0 or it == out['max_iters'])):
    raise ValueError(f'iters={it} is not a checkpoint (multiples of check_every='
                     f'{out["check_every"]} up to max_iters={out["max_iters"]})')
  return out


def dip_config(cfg) -> dp.DIPConfig:
  """The generator settings of a config (overrides of `default_config()`)."""
  c = _merged_config(cfg)
  return dp.DIPConfig(**{f.name: c[f.name] for f in dataclasses.fields(dp.DIPConfig)})


def oracle_k(topk: int, num_classes: int) -> int:
  """The oracle's k: `topk` capped at a tenth of the classes, at least 1 (module docstring)."""
  return max(1, min(int(topk), int(num_classes) // 10))


def restoration_rows(x_val, x_test, adv: Mapping[str, Any], cfg) -> tuple[np.ndarray, dict]:
  """The images restored, in order, and each set's row slice: {'val', 'clean', attack...}."""
  c = _merged_config(cfg)
  n, v = min(c['n_images'], len(x_test)), min(c['val_size'], len(x_val))
  parts, slices, start = [], {}, 0
  for name, x in [('val', x_val[:v]), (CLEAN, x_test[:n])] + [(a, adv[a][:n]) for a in adv]:
    x = np.asarray(x, np.float32)
    if name not in ('val', CLEAN) and len(x) != n:
      raise ValueError(f'attack {name!r} has {len(x)} images for the {n} test images')
    parts.append(x)
    slices[name] = slice(start, start + len(x))
    start += len(x)
  return np.concatenate(parts), slices


def _mean(x) -> float:
  return float(np.mean(x)) if np.size(x) else float('nan')


def evaluate_stop_rules(ctx: base.Context, x_val, y_val, x_test, y_test, adv: Mapping[str, Any],
                        key: jax.Array, cfg=None) -> dict:
  """Deep Protection with fixed, 'auto' and oracle stops on a subset, from one DIP run per image.

  Args:
    ctx: uses `ctx.logits_fn` (M).
    x_val, y_val: clean validation images [V, H, W, C] in [0, 1] and labels; the first
      `cfg.val_size` are restored to choose the fixed stop (unless `cfg.iters` is set).
    x_test, y_test: clean test images and labels; the first `cfg.n_images` are used.
    adv: attack label -> adversarial versions of the same test images (row i attacks x_test[i]);
      the first `cfg.n_images` of each are used. Attacks are reported in this order.
    key: DIP randomness (row r of `restoration_rows` uses `fold_in(key, r)`).
    cfg: overrides of `default_config()` (ConfigDict or dict).

  Returns:
    A JSON-serialisable dict (floats, ints, lists, strings; NaN where undefined):
      'config', 'n_images', 'val_size', 'attacks', 'num_classes', 'oracle_topk', 'checkpoints',
      'fixed_iters', 'fixed_iters_source' ('validation' or 'config'), 'val_accuracy' (per
      checkpoint), 'accuracy' {set: {'none', 'fixed', 'auto', 'oracle'}} with set in
      ['clean', *attacks, 'worst_case'] (worst case: correct under every attack, per image),
      'oracle_hit' {set: share whose true class reached the top-k}, 'mean_stop_iter' {set: {rule}},
      'accuracy_curve' {set: accuracy at each checkpoint}, 'recovered' {attack or 'mean': {rule}},
      'detection' {attack: metrics.detection_report of the fixed-stop residual, 'auc_all' (all
      attacked vs all clean images)}, 'per_image' {set: {'pred_none', 'pred_fixed', 'pred_auto',
      'pred_oracle', 'stop_auto', 'stop_oracle', 'residual_fixed'} lists}, 'seconds',
      'image_iterations', 'ms_per_image_iteration'.
  """
  c = _merged_config(cfg)
  dip_cfg = dip_config(c)
  attacks = list(adv)
  x_all, slices = restoration_rows(x_val, x_test, adv, c)
  n = slices[CLEAN].stop - slices[CLEAN].start
  v = slices['val'].stop - slices['val'].start
  y_val = np.asarray(y_val)[:v]
  y_test = np.asarray(y_test)[:n]
  if len(y_val) != v or len(y_test) != n:
    raise ValueError('Fewer labels than images')
  y_all = np.concatenate([y_val] + [y_test] * (1 + len(attacks)))

  t0 = time.time()
  traj = dp.dip_trajectory(x_all, key, max_iters=c['max_iters'], cfg=dip_cfg,
                           check_every=c['check_every'], chunk=c['chunk'],
                           classify_fn=dp.classifier(ctx))
  pred_none = dp.predict_classes(ctx, x_all, c['chunk'])
  seconds = time.time() - t0
  checkpoints = traj['checkpoints']
  pred = np.argmax(traj['logits'], axis=-1)                      # [N, K]
  num_classes = traj['logits'].shape[-1]
  correct = pred == y_all[:, None]                               # [N, K]
  residual = traj['mse'] * float(np.prod(x_all.shape[1:]))       # ||x - x_hat||^2 per checkpoint

  # Stop index per image and rule.
  val_acc = correct[slices['val']].mean(axis=0)
  if c['iters'] is None:
    k_fixed = dp.choose_fixed_iters(val_acc, c['fit_tolerance'])
    source = 'validation'
  else:
    k_fixed, source = int(np.flatnonzero(checkpoints == int(c['iters']))[0]), 'config'
  sigma = dp.noise_sigma(x_all, c['noise_level'])
  topk = oracle_k(c['oracle_topk'], num_classes)
  rows = np.arange(len(x_all))
  stop = {'fixed': np.full(len(x_all), k_fixed),
          'auto': dp.auto_stop_index(checkpoints, traj['mse'], sigma, auto_tol=c['auto_tol'],
                                     min_iters=c['min_iters']),
          'oracle': dp.oracle_stop_index(traj['logits'], y_all, topk)}
  pred_at = {r: pred[rows, s] for r, s in stop.items()}
  hit = dp.oracle_hit(traj['logits'][rows, stop['oracle']], y_all, topk)

  sets = [CLEAN] + attacks
  accuracy, mean_stop, curve, per_image, oracle_hit = {}, {}, {}, {}, {}
  for name in sets:
    sl, y = slices[name], y_all[slices[name]]
    accuracy[name] = {'none': _mean(pred_none[sl] == y),
                      **{r: _mean(pred_at[r][sl] == y) for r in RULES}}
    mean_stop[name] = {r: _mean(checkpoints[stop[r][sl]]) for r in RULES}
    curve[name] = correct[sl].mean(axis=0).tolist()
    oracle_hit[name] = _mean(hit[sl])
    per_image[name] = {'pred_none': pred_none[sl].tolist(),
                       **{f'pred_{r}': pred_at[r][sl].tolist() for r in RULES},
                       'stop_auto': checkpoints[stop['auto'][sl]].tolist(),
                       'stop_oracle': checkpoints[stop['oracle'][sl]].tolist(),
                       'residual_fixed': residual[sl, k_fixed].tolist()}
  if attacks:
    worst = {}
    for r in ('none',) + RULES:
      p = pred_none if r == 'none' else pred_at[r]
      ok = np.all([p[slices[a]] == y_test for a in attacks], axis=0)
      worst[r] = _mean(ok)
    accuracy['worst_case'] = worst

  recovered = {}
  clean_acc = accuracy[CLEAN]['none']
  for a in attacks:
    gap = clean_acc - accuracy[a]['none']
    recovered[a] = {r: (accuracy[a][r] - accuracy[a]['none']) / gap if gap > 0 else float('nan')
                    for r in RULES}
  if attacks:
    recovered['mean'] = {r: float(np.nanmean([recovered[a][r] for a in attacks]))
                         if any(np.isfinite(recovered[a][r]) for a in attacks) else float('nan')
                         for r in RULES}

  # Residual at the fixed stop as a detection score: successful adversarial examples (clean
  # correct, attacked wrong, without defense) against their clean counterparts; thresholds on the
  # clean VALIDATION residuals.
  val_res = residual[slices['val'], k_fixed]
  clean_res = residual[slices[CLEAN], k_fixed]
  clean_ok = pred_none[slices[CLEAN]] == y_test
  detection = {}
  for a in attacks:
    adv_res = residual[slices[a], k_fixed]
    success = clean_ok & (pred_none[slices[a]] != y_test)
    rep = metrics.detection_report(val_res, clean_res[success], adv_res[success])
    rep['auc_all'] = metrics.roc_auc(clean_res, adv_res)
    detection[a] = rep

  image_iterations = int(len(x_all) * c['max_iters'])
  return {
      'config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()},
      'n_images': int(n), 'val_size': int(v), 'attacks': attacks,
      'num_classes': int(num_classes), 'oracle_topk': int(topk),
      'checkpoints': checkpoints.tolist(),
      'fixed_iters': int(checkpoints[k_fixed]), 'fixed_iters_source': source,
      'val_accuracy': val_acc.tolist(),
      'accuracy': accuracy, 'oracle_hit': oracle_hit, 'mean_stop_iter': mean_stop,
      'accuracy_curve': curve, 'recovered': recovered, 'detection': detection,
      'per_image': per_image,
      'seconds': float(seconds), 'image_iterations': image_iterations,
      'ms_per_image_iteration': 1e3 * seconds / image_iterations,
  }


def _pct(x) -> str:
  return 'n/a' if x is None or not np.isfinite(x) else f'{100 * x:.1f}%'


def _num(x, fmt='.3f') -> str:
  return 'n/a' if x is None or not np.isfinite(x) else format(x, fmt)


def report_section(result: dict) -> str:
  """A markdown section (starting with a level-2 heading) for report.md."""
  c = result['config']
  attacks = result['attacks']
  n, v = result['n_images'], result['val_size']
  lines = [
      '## Deep Protection (Kulkarni & Ambati): DIP restoration, fixed vs automatic vs oracle stop', '',
      f'**Subset.** DIP fits one network per image, which is costly (~'
      f'{result["ms_per_image_iteration"]:.1f} ms per image-iteration here), so Deep Protection '
      f'is evaluated on a subset: the first {n} test images, clean and under each of the '
      f'{len(attacks)} attacks ({n * (1 + len(attacks))} restorations), plus {v} clean '
      f'validation images to choose the fixed stop (Kulkarni & Ambati: 100 images x 8 attacks). All '
      f'{n * (1 + len(attacks)) + v} images ran {c["max_iters"]} iterations once '
      f'({result["image_iterations"]:,} image-iterations, {result["seconds"]:.0f} s wall); the '
      'three stop rules read that one trajectory at different checkpoints (every '
      f'{c["check_every"]} iterations). Generator: widths {tuple(c["widths"])}, input depth '
      f'{c["input_depth"]}, swish, Adam lr {c["lr"]}, EMA {c["ema"]}.', '',
      f'**Stop rules.** *fixed*: {result["fixed_iters"]} iterations for every image, chosen on '
      + ('the clean validation images only (earliest checkpoint within '
         f'{_pct(c["fit_tolerance"])} of the best validation accuracy)'
         if result['fixed_iters_source'] == 'validation' else 'the config (not chosen here)')
      + '. *auto*: label-free per-image rule (noise floor reached or loss curve flat; min '
      f'{c["min_iters"]}, cap {c["max_iters"]}). *oracle*: first checkpoint where the TRUE class '
      f'is in M\'s top-{result["oracle_topk"]} -- it uses the label, so it is an upper bound, not '
      f'a defense (top-{result["oracle_topk"]} because top-5 is meaningless with '
      f'{result["num_classes"]} classes; with so few classes even this bound is loose).', '',
      'Threat model: gray-box (attacks computed against M alone; DIP unknown to the attacker), '
      'not an adaptive BPDA+EOT attack on DIP.', '',
      '| images | no defense | DIP fixed | DIP auto | DIP oracle (upper bound) '
      '| mean stop fixed / auto / oracle |',
      '|---|---|---|---|---|---|',
  ]
  for name in [CLEAN] + attacks + (['worst_case'] if 'worst_case' in result['accuracy'] else []):
    a = result['accuracy'][name]
    s = result['mean_stop_iter'].get(name)
    stops = ' / '.join(f'{s[r]:.0f}' for r in RULES) if s else '--'
    label = 'worst case over attacks (per image)' if name == 'worst_case' else name
    lines.append(f'| {label} | {_pct(a["none"])} | {_pct(a["fixed"])} | {_pct(a["auto"])} '
                 f'| {_pct(a["oracle"])} | {stops} |')
  if attacks:
    rec = result['recovered']
    lines += ['', 'Fraction of clean accuracy recovered, (acc_DIP(adv) - acc_none(adv)) / '
              '(acc_none(clean) - acc_none(adv)):', '',
              '| attack | fixed | auto | oracle (upper bound) |', '|---|---|---|---|']
    for a in attacks + ['mean']:
      lines.append(f'| {a} | ' + ' | '.join(_pct(rec[a][r]) for r in RULES) + ' |')
    lines += ['', 'Restoration residual ||x - x_hat||^2 at the fixed stop as a detection score '
              '(positives: successful adversarial examples; negatives: their clean counterparts; '
              'threshold for the TPR set on the clean validation residuals; "all": every attacked '
              'vs every clean image):', '',
              '| attack | AUC | TPR @ 5% FPR | n pos | AUC (all) |', '|---|---|---|---|---|']
    for a in attacks:
      d = result['detection'][a]
      lines.append(f'| {a} | {_num(d["auc"])} | {_pct(d["tpr@5%fpr"])} | {d["n_pos"]} '
                   f'| {_num(d["auc_all"])} |')
  ck = result['checkpoints']
  lines += ['', 'Accuracy of M on the DIP output at each checkpoint (validation: clean validation '
            'images, used to choose the fixed stop):', '',
            '| iterations | ' + ' | '.join(str(k) for k in ck) + ' |',
            '|---|' + '---|' * len(ck),
            '| validation | ' + ' | '.join(f'{100 * a:.0f}' for a in result['val_accuracy']) + ' |']
  for name in [CLEAN] + attacks:
    lines.append(f'| {name} | '
                 + ' | '.join(f'{100 * a:.0f}' for a in result['accuracy_curve'][name]) + ' |')
  lines.append('')
  return '\n'.join(lines)
