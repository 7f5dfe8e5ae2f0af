"""Tuna et al.'s (2021) uncertainty + closeness detection study, reproduced on the embedded digits.

Tuna, Catak & Eskil ("Closeness and uncertainty aware adversarial examples detection", Tuna et al. 2021,
after Feinman et al. 2017) score adversarial examples with six features of one dropout CNN --
four MC-dropout uncertainty metrics (confidence, entropy, variance, mutual information; T passes
with dropout on) and two closeness metrics on the last hidden activations (per-class Gaussian KDE,
KL divergence to the class-mean PMF) -- and combine them with a logistic regression (LR). Their
claims: uncertainty metrics detect better at low eps (the "low-confidence window"), KDE at high
eps, and the combination is at least as good as the best single metric.

`run_digits_study(config, workdir)` runs that study on scikit-learn's 8x8 digits (real data,
embedded) with `experiments/digits/config.py`:

1. trains the Feinman/seed-004 dropout CNN (`configs/digits_cnn.py`; cached: a finished run
   returns at once);
2. attacks the test split and the validation split with FGSM, BIM and PGD-L∞ at a low and a high
   eps (`attack_runner.run_attacks`, cached per attack);
3. fits the KDE and KL statistics on clean TRAINING images (true labels);
4. splits the validation images (by image, seeded) into a combiner-fit part and a threshold part.
   For every attack x eps an LR combiner (`defenses.combiner`) is fitted on the combiner-fit
   part only: positives = successful adversarial examples of those images, negatives = their
   clean versions and Gaussian-noisy copies (noise std matched to the attack); with
   `equal_fit_sizes` every attack at one eps gets equally many. Member scores of each image set
   (the positives, and the clean test and threshold images shared by all attacks) are computed
   once and mapped through each LR (`combiner.lr_decision`), after `combiner.assert_disjoint`
   has checked that none of the scored images was among those the LR was fitted on;
5. evaluates on the test split: positives = successful adversarial examples, negatives = their
   clean counterparts (contamination 0.5); ROC AUC, and TPR at 5% (1%) FPR with the threshold
   set on the threshold part's clean validation scores only;
6. checks the three claims automatically and writes `digits_study.json`, `digits_study.md` and
   `digits_roc.png` to the workdir.

Threat model: gray-box, as in Tuna et al. 2021 -- the attacks are computed against the CNN only (its
deterministic, dropout-off logits); the detectors are unknown to the attacker. Not an adaptive
evaluation.

Each single metric has a fixed orientation (higher = more uncertain / farther from the predicted
class). The seed evaluated each feature through an LR, which may flip it; here the direction is
decided on the combiner-fit validation images (AUC of adversarial vs clean there < 0.5 -> flip),
never on test data. Tables report that "held-out direction" AUC (the claims use it), and mark
flipped metrics with their fixed-direction AUC beside them.
"""
from __future__ import annotations

import json
import os
import time
from typing import NamedTuple, Optional

import jax
import numpy as np

from unmask_jax import data as data_lib
from unmask_jax import defenses as defenses_lib
from unmask_jax import pipeline
from unmask_jax.data import pipeline as data_pipeline
from unmask_jax.defenses import combiner
from unmask_jax.eval import attack_runner, metrics
from unmask_jax.models import functional
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.utils import named_key

UNCERTAINTY = ('confidence', 'entropy', 'variance', 'mutual_information')
CLOSENESS = ('kde', 'kl')
METRICS = UNCERTAINTY + CLOSENESS
COMBINED = 'combined'
SHORT = {'confidence': 'conf.', 'entropy': 'entropy', 'variance': 'variance',
         'mutual_information': 'MI', 'kde': 'KDE', 'kl': 'KL', COMBINED: 'LR comb.'}
RESULT_JSON = 'digits_study.json'
REPORT_MD = 'digits_study.md'
ROC_PNG = 'digits_roc.png'
_STEPS = 5
_BUCKET = 128
# Part of the cache stamp: bump it when a change to the scoring should invalidate stored results.
STUDY_VERSION = 1


def _log(step: int, msg: str) -> None:
  print(f'[digits {step}/{_STEPS}] {msg}', flush=True)


def member_specs(config) -> list[str]:
  """The six detector specs of Tuna et al.'s (2021) Table 5, in `METRICS` order (the LR's features)."""
  mc = [f'mc_dropout(metric="{m}", T={int(config.T)}, chunk={int(config.mc_chunk)})'
        for m in UNCERTAINTY]
  kde = f'kde(bandwidth={float(config.kde_bandwidth)!r})' if config.kde_bandwidth else 'kde'
  return mc + [kde, f'kl(pmf="{config.kl_pmf}")']


def attack_entries(config) -> list[tuple[str, str, float, str]]:
  """(label, attack name, eps, "label=spec") for every attack x eps, low eps first."""
  out = []
  for eps in config.eps:
    for entry in config.attacks:
      name, _, fn = entry.partition('=')
      fn = fn or name
      params = f'eps={float(eps)!r}'
      if fn != 'fgsm':
        params += f', steps={int(config.steps)}'
      label = f'{name}-{float(eps):g}'
      out.append((label, name, float(eps), f'{label}={fn}({params})'))
  return out


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (combiner-fit, threshold) indices of n validation images: a seeded split by image."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'combiner_fraction must be in (0, 1), got {fraction}')
  perm = np.random.default_rng([int(seed), 4]).permutation(n)
  k = int(round(fraction * n))
  if k < 2 or n - k < 2:
    raise ValueError(f'{n} validation images are too few to split into a combiner-fit part and a '
                     f'threshold part (fraction {fraction})')
  return np.sort(perm[:k]), np.sort(perm[k:])


def _pad(x: np.ndarray, bucket: int = _BUCKET) -> np.ndarray:
  """x padded (repeating row 0) to a multiple of `bucket` rows.

  The detectors' eager jnp ops compile once per input shape (0.3-1 s each on the CPU); a few
  bucket sizes instead of one shape per image set keep compilation from dominating. Padding rows
  go last, so the real rows' MC-dropout masks (per chunk and position) and scores are unchanged.
  """
  pad = -len(x) % bucket
  return np.concatenate([x, np.repeat(x[:1], pad, 0)]) if pad else x


def _member_scores(state, ctx, x, key) -> np.ndarray:
  """[N, 6] member scores (`METRICS` order) of the combiner's members, in bucketed shapes."""
  return combiner.member_scores(state, ctx, _pad(x), key)[:len(x)]


def combiner_fit_sets(config, entries, success: dict, pool: np.ndarray) -> dict[str, np.ndarray]:
  """Validation indices each attack's combiner is fitted on: successful attacks in `pool`.

  With `config.equal_fit_sizes`, every attack at one eps gets the same number of them (the
  smallest count at that eps; a seeded random subset of the others): the LRs at an eps then learn
  from equally many examples, and `fit_combiner`'s noise draw compiles once per eps instead of
  once per attack (about 1 s each on the 2-core CPU).
  """
  sets = {label: pool[np.asarray(success[label])[pool].astype(bool)] for label, *_ in entries}
  if not config.get('equal_fit_sizes', False):
    return sets
  for e_i, eps in enumerate(sorted({e for _, _, e, _ in entries})):
    labels = [label for label, _, e, _ in entries if e == eps]
    n = min(len(sets[label]) for label in labels)
    for label in labels:
      rng = np.random.default_rng([int(config.seed), 5, e_i])
      sets[label] = np.sort(rng.permutation(sets[label])[:n])
  return sets


def _load_split(spec: dict, split: str, config, limit: int):
  ds = data_lib.load_from_config(spec['data_config'], split, data_dir=config.data_dir)
  return ds.take(slice(0, limit)) if limit else ds


class _Scoring(NamedTuple):
  """What every attack's evaluation shares (built once per run)."""
  root: jax.Array
  ctx: defenses_lib.Context
  base_state: dict                 # the combiner with its members fitted on clean training images
  x_test: np.ndarray
  x_val: np.ndarray
  fit_idx: np.ndarray              # validation images the LR combiners may be fitted on
  thr_idx: np.ndarray              # validation images the thresholds come from
  s_test: np.ndarray               # [n_test, 6] member scores of the clean test images
  s_thr: np.ndarray                # [n_thr, 6] of the clean threshold images
  s_fit_clean: np.ndarray          # [n_fit, 6] of the clean combiner-fit images
  ref_kde: Optional[tuple]         # (kde defense, state, clean test scores) at the seed's bandwidth


def run_digits_study(config, workdir: str, *, reuse: bool = True) -> dict:
  """Runs the study into `workdir` (see the module docstring); returns the result dict.

  Args:
    config: `experiments/digits/config.py` (`get_config()` or `tiny()`).
    workdir: holds `model/`, `attacks_test/`, `attacks_validation/`, `digits_study.json`,
      `digits_study.md` and `digits_roc.png`. Training and attacks are cached there; the scoring
      is skipped too when `digits_study.json` was made with the same config, model and attacks.
    reuse: False recomputes the scoring even when `digits_study.json` is up to date (training and
      attacks still come from the cache).

  Returns:
    The content of `digits_study.json` (every number of the report) plus 'roc' (the per-example
    scores behind the ROC plot) when the scoring ran in this call.
  """
  t_start = time.time()
  cfg = config.copy_and_resolve_references()
  if len(cfg.eps) != 2 or not 0 < cfg.eps[0] < cfg.eps[1]:
    raise ValueError(f'config.eps must be (low, high) with 0 < low < high, got {cfg.eps}')
  os.makedirs(workdir, exist_ok=True)
  seconds = {}

  t0 = time.time()
  model_dir = os.path.join(workdir, 'model')
  _log(1, f'dropout CNN on digits -> {model_dir} (cached when finished)')
  final = pipeline.train(cfg.model, model_dir, expect_task='classifier')
  model, spec = ckpt.load_model(model_dir)
  model_fp = ckpt.model_fingerprint(model)
  seconds['train'] = round(time.time() - t0, 1)

  t0 = time.time()
  entries = attack_entries(cfg)
  _log(2, f'{len(entries)} attacks ({", ".join(e[0] for e in entries)}) on test and validation')
  adv, index = _run_attacks(cfg, workdir, model_dir, entries)
  seconds['attacks'] = round(time.time() - t0, 1)

  attack_fps = {s: {'data': index[s]['data_fingerprint'],
                    'specs': {l: index[s]['attacks'][l]['spec'] for l, *_ in entries}}
                for s in index}
  stamp = {'version': STUDY_VERSION, 'config': json.loads(cfg.to_json(sort_keys=True)),
           'model_fingerprint': model_fp, 'attacks': attack_fps}
  json_path = os.path.join(workdir, RESULT_JSON)
  png_path = os.path.join(workdir, ROC_PNG)
  if reuse and os.path.exists(json_path) and os.path.exists(png_path):
    cached = ckpt.read_json(json_path)
    if cached.get('stamp') == stamp:
      _log(_STEPS, f'{json_path} is up to date (same config, model and attacks): reused')
      return cached

  t0 = time.time()
  sc, info = _prepare_scoring(cfg, workdir, model, spec, index)
  seconds['fit_and_clean_scores'] = round(time.time() - t0, 1)

  t0 = time.time()
  _log(4, f'scoring {len(entries)} attacks: {len(METRICS)} metrics + LR combination '
          f'(T={cfg.T} MC passes)')
  fit_sets = combiner_fit_sets(
      cfg, entries, {l: adv['validation'][l]['success'] for l, *_ in entries}, sc.fit_idx)
  rows, roc = [], {}
  for label, name, eps, _ in entries:
    row = {'label': label, 'attack': name, 'eps': eps,
           'spec': index['test']['attacks'][label]['spec'],
           'success_rate': index['test']['attacks'][label]['success_rate'],
           'success_rate_validation': index['validation']['attacks'][label]['success_rate'],
           'robust_accuracy': index['test']['attacks'][label]['robust_accuracy']}
    row.update(_evaluate_attack(sc, label, adv['test'][label], adv['validation'][label],
                                fit_sets[label], roc))
    rows.append(row)
  seconds['score'] = round(time.time() - t0, 1)

  _log(5, f'claims, {RESULT_JSON}, {REPORT_MD}, {ROC_PNG}')
  first = adv['test'][entries[0][0]]
  result = {
      'stamp': stamp, 'seed': int(cfg.seed), 'model_fingerprint': model_fp,
      'threat_model': 'gray-box: FGSM/BIM/PGD computed against the CNN (dropout off); the '
                      'detectors are unknown to the attacker',
      'clean_test_accuracy': float(np.mean(first['clean_pred'] == first['label'])),
      'train_final_test_accuracy': float(final['test']['accuracy']),
      **info,
      'T': int(cfg.T), 'eps': [float(e) for e in cfg.eps], 'steps': int(cfg.steps),
      'kl_pmf': cfg.kl_pmf, 'claim_tolerance': float(cfg.claim_tolerance),
      'attack_sanity': index['test'].get('sanity', []), 'rows': rows}
  for row in rows:  # Uncertainty of the differences the claims compare.
    if not row['metrics']:
      continue
    curves, ci = roc[row['label']], {}
    ci['uncertainty_minus_kde'] = paired_bootstrap_auc_diff(
        curves[_selected_uncertainty(row)], curves['kde'], seed=cfg.seed)
    if row[COMBINED]:
      best = max(METRICS, key=lambda m: row['metrics'][m]['auc'])
      ci['combined_minus_best_single'] = paired_bootstrap_auc_diff(
          curves[COMBINED], curves[best], seed=cfg.seed)
    row['bootstrap_ci95'] = ci
  result['claims'] = check_claims(result)
  seconds['total'] = round(time.time() - t_start, 1)
  result['seconds'] = seconds
  result['roc_png'] = roc_plot(result, roc, png_path)
  ckpt.write_json_atomic(json_path, result)
  with open(os.path.join(workdir, REPORT_MD), 'w') as f:
    f.write(report_section(result, relative_to=workdir) + '\n')
  for c in result['claims']:
    print(f'  claim {c["id"]}: {c["verdict"]} -- {c["claim"]}')
  print(f'digits study done in {seconds["total"]:.1f}s '
        f'({", ".join(f"{k} {v}s" for k, v in seconds.items() if k != "total")})')
  return {**result, 'roc': roc}


def _run_attacks(cfg, workdir: str, model_dir: str, entries) -> tuple[dict, dict]:
  """Every attack on test (evaluation) and validation (combiner fit), cached per attack."""
  import ml_collections
  adv, index = {}, {}
  for split, limit in (('test', cfg.max_test), ('validation', cfg.max_validation)):
    a_cfg = ml_collections.ConfigDict({
        'model_dir': model_dir, 'data_dir': cfg.data_dir, 'split': split,
        'max_examples': int(limit), 'attacks': tuple(e[3] for e in entries),
        'steps': int(cfg.steps), 'batch_size': int(cfg.attack_batch_size), 'seed': int(cfg.seed)})
    a_dir = os.path.join(workdir, f'attacks_{split}')
    attack_runner.run_attacks(a_cfg, a_dir)
    index[split] = ckpt.read_json(os.path.join(a_dir, attack_runner.INDEX))
    adv[split] = {}
    for label, *_ in entries:
      adv[split][label] = attack_runner.load_result(a_dir, label)   # sha256-verified
  return adv, index


def _prepare_scoring(cfg, workdir: str, model, spec: dict, index: dict) -> tuple[_Scoring, dict]:
  """Data, the protected system, members fitted on clean training images, clean scores."""
  root = jax.random.key(int(cfg.seed))
  test = _load_split(spec, 'test', cfg, cfg.max_test)
  val = _load_split(spec, 'validation', cfg, cfg.max_validation)
  train = _load_split(spec, 'train', cfg, 0)
  if cfg.max_fit and cfg.max_fit < len(train):
    perm = np.random.default_rng([int(cfg.seed), 3]).permutation(len(train))
    train = train.take(np.sort(perm[:cfg.max_fit]))
  for split, ds in (('test', test), ('validation', val)):
    if ds.fingerprint() != index[split]['data_fingerprint']:
      raise ValueError(f'The attack results in {workdir}/attacks_{split} were made on other data')
  x_test = data_pipeline.to_float(test.arrays['image'])
  x_val = data_pipeline.to_float(val.arrays['image'])
  fit_idx, thr_idx = split_validation(len(val), cfg.combiner_fraction, cfg.seed)
  ctx = defenses_lib.Context(
      logits_fn=functional.logits_fn(model), features_fn=functional.features_fn(model),
      mc_logits_fn=functional.mc_logits_fn(model), head_fn=functional.head_fn(model),
      num_classes=int(spec['num_classes']), class_names=tuple(spec['class_names']))
  specs = member_specs(cfg)
  comb = combiner.make(members=specs, C=float(cfg.lr_C))
  _log(3, f'fitting KDE and KL on {len(train)} clean training images; validation split into '
          f'{len(fit_idx)} combiner-fit / {len(thr_idx)} threshold images')
  train_data = {'image': data_pipeline.to_float(train.arrays['image']),
                'label': train.arrays['label']}
  base_state = comb.fit(ctx, train_data, named_key(root, 'fit'))
  # Clean scores: one MC run per image set with a fixed key, so every attack's negatives and
  # thresholds see the same clean features (and the combiner's own member scores match them).
  s_test = _member_scores(base_state, ctx, x_test, named_key(root, 'score', 'test'))
  s_thr = _member_scores(base_state, ctx, x_val[thr_idx], named_key(root, 'score', 'threshold'))
  s_fit_clean = _member_scores(base_state, ctx, x_val[fit_idx], named_key(root, 'direction', 'clean'))
  ref_kde = None
  if cfg.get('kde_reference_bandwidth', 0.0):
    # KDE at the seed's bandwidth too, to show how much KDE's AUCs depend on that choice.
    kde_ref = defenses_lib.make(f'kde(bandwidth={float(cfg.kde_reference_bandwidth)!r})')
    st_ref = kde_ref.fit(ctx, train_data, None)
    ref_kde = (kde_ref, st_ref, kde_ref.score(st_ref, ctx, _pad(x_test), None)[:len(x_test)])
  sc = _Scoring(root=root, ctx=ctx, base_state=base_state, x_test=x_test, x_val=x_val,
                fit_idx=fit_idx, thr_idx=thr_idx, s_test=s_test, s_thr=s_thr,
                s_fit_clean=s_fit_clean, ref_kde=ref_kde)
  info = {
      'n_train_fit': len(train), 'n_test': len(test), 'n_validation': len(val),
      'n_combiner_fit_pool': int(len(fit_idx)), 'n_threshold': int(len(thr_idx)),
      'threshold_validation_indices': thr_idx.tolist(),
      'combiner_pool_validation_indices': fit_idx.tolist(), 'members': specs,
      'kde_bandwidth': float(base_state[f'member{METRICS.index("kde")}.bandwidth']),
      'kde_bandwidth_source': ('config' if cfg.kde_bandwidth
                               else 'held-out likelihood on clean training features'),
      'kde_reference_bandwidth': float(cfg.get('kde_reference_bandwidth', 0.0))}
  return sc, info


def _evaluate_attack(sc: _Scoring, label: str, r_test: dict, r_val: dict, fit_succ: np.ndarray,
                     roc: dict) -> dict:
  """Detection numbers of one attack x eps; adds its ROC scores to `roc[label]`.

  Args:
    sc: the shared scoring state.
    label: e.g. 'PGD-0.3'.
    r_test, r_val: the attack runner's arrays on the test and validation split.
    fit_succ: validation indices (successful attacks in the combiner-fit part) the LR is fitted on.
    roc: per-label dict of {'neg', 'pos'} score lists, filled for the plot.
  """
  succ = r_test['success'].astype(bool)
  row = {'n_pos': int(succ.sum()), 'n_neg': int(succ.sum()),
         'n_fit_clean': int(len(fit_succ)), 'n_fit_noisy': int(len(fit_succ)),
         'n_fit_adv': int(len(fit_succ)), 'combiner_fit_validation_indices': fit_succ.tolist(),
         'metrics': {}, COMBINED: None}
  if succ.sum() < 2:
    print(f'  {label}: only {int(succ.sum())} successful test examples; no detection numbers')
    return row
  x_adv = r_test['x_adv'][succ]
  s_adv = _member_scores(sc.base_state, sc.ctx, x_adv, named_key(sc.root, 'score', label))
  neg = sc.s_test[succ]
  heldout = None
  if len(fit_succ) >= 2:
    # Direction of each metric: adversarial vs clean AUC on the combiner-fit images only.
    s_fit_adv = _member_scores(sc.base_state, sc.ctx, r_val['x_adv'][fit_succ],
                               named_key(sc.root, 'direction', label))
    fit_mask = np.isin(sc.fit_idx, fit_succ)
    heldout = [metrics.roc_auc(sc.s_fit_clean[fit_mask, j], s_fit_adv[:, j]) for j in range(len(METRICS))]
  roc[label] = {}
  for j, m in enumerate(METRICS):
    fixed = metrics.detection_report(sc.s_thr[:, j], neg[:, j], s_adv[:, j])
    sign = -1 if heldout is not None and heldout[j] < 0.5 else 1
    directed = fixed if sign == 1 else metrics.detection_report(-sc.s_thr[:, j], -neg[:, j], -s_adv[:, j])
    row['metrics'][m] = {
        'auc': directed['auc'], 'tpr@5%fpr': directed['tpr@5%fpr'],
        'tpr@1%fpr': directed['tpr@1%fpr'], 'test_fpr@5%': directed['test_fpr@5%'],
        'clean_test_fpr@5%': metrics.rate_above(sign * sc.s_test[:, j], directed['threshold@5%']),
        'direction': sign, 'heldout_auc': None if heldout is None else heldout[j],
        'auc_fixed': fixed['auc'], 'tpr@5%fpr_fixed': fixed['tpr@5%fpr']}
    roc[label][m] = {'neg': (sign * neg[:, j]).tolist(), 'pos': (sign * s_adv[:, j]).tolist()}
  if len(fit_succ) >= 2:
    row[COMBINED] = _evaluate_combiner(sc, label, r_val, fit_succ, succ, x_adv, s_adv, roc)
  else:
    print(f'  {label}: only {len(fit_succ)} successful held-out examples; no LR combination')
  if sc.ref_kde is not None:
    kde_ref, st_ref, ref_test = sc.ref_kde
    row['kde_reference_bandwidth_auc'] = metrics.roc_auc(
        ref_test[succ], kde_ref.score(st_ref, sc.ctx, _pad(x_adv), None)[:len(x_adv)])
  best = max(METRICS, key=lambda m: row['metrics'][m]['auc'])
  comb_auc = row[COMBINED]['auc'] if row[COMBINED] else float('nan')
  print(f'  {label:<10} n_pos {row["n_pos"]:>3}  best single {SHORT[best]} '
        f'{row["metrics"][best]["auc"]:.3f}  KDE {row["metrics"]["kde"]["auc"]:.3f}  '
        f'LR {comb_auc:.3f}')
  return row


def _evaluate_combiner(sc: _Scoring, label, r_val, fit_succ, succ, x_adv, s_adv, roc) -> dict:
  """Fits the LR on held-out validation images; evaluates it on the test images."""
  xc_fit, xa_fit = sc.x_val[fit_succ], r_val['x_adv'][fit_succ]
  noise_std = combiner.matched_noise_std(xc_fit, xa_fit)
  st = combiner.fit_combiner(sc.base_state, sc.ctx, xc_fit, xa_fit, noise_std,
                             named_key(sc.root, 'lr', label))
  # Member scores of every scored image set were computed once (with the keys the combiner's own
  # score would use) and are mapped through this LR; none of those images may be one it was
  # fitted on (LeakageError).
  x_thr = sc.x_val[sc.thr_idx]
  combiner.assert_disjoint(st, x_adv, sc.x_test, x_thr)
  c_adv = combiner.lr_decision(st, s_adv)
  c_test, c_thr = combiner.lr_decision(st, sc.s_test), combiner.lr_decision(st, sc.s_thr)
  rep = metrics.detection_report(c_thr, c_test[succ], c_adv)
  scored = combiner.image_fingerprints(np.concatenate([sc.x_test, x_adv, x_thr]))
  roc[label][COMBINED] = {'neg': c_test[succ].tolist(), 'pos': c_adv.tolist()}
  return {'auc': rep['auc'], 'tpr@5%fpr': rep['tpr@5%fpr'], 'tpr@1%fpr': rep['tpr@1%fpr'],
          'test_fpr@5%': rep['test_fpr@5%'],
          'clean_test_fpr@5%': metrics.rate_above(c_test, rep['threshold@5%']),
          'lr_coef': dict(zip(METRICS, st['lr_coef'].tolist())),
          'noise_std_mean': float(np.mean(noise_std)),
          'fit_images': int(len(st['fit_fingerprints'])),
          'fit_overlap_with_scored_images': int(np.isin(scored, st['fit_fingerprints']).sum())}


# ----------------------------------------------------------------------------------------------
# Claims.


def _rows_at(result: dict, eps: float) -> list[dict]:
  return [r for r in result['rows'] if r['eps'] == eps and r['metrics']]


def _selected_uncertainty(row: dict, directed: bool = True) -> str:
  """The uncertainty metric with the best AUC on the held-out combiner-fit images (not on test).

  directed: True = after the held-out direction flip (max(AUC, 1 - AUC)); False = as oriented.
  """
  def key(m):
    h = row['metrics'][m]['heldout_auc']
    return -1.0 if h is None else (max(h, 1.0 - h) if directed else h)
  return max(UNCERTAINTY, key=key)


def _verdict(holds: list[bool]) -> str:
  if not holds:
    return 'not measured'
  if all(holds):
    return 'yes'
  return f'partly ({sum(holds)}/{len(holds)})' if any(holds) else 'no'


def _ci(row: dict, name: str, auc_key: str) -> str:
  """The paired-bootstrap 95% CI of an AUC difference, when it was computed for these AUCs."""
  ci = row.get('bootstrap_ci95', {}).get(name)
  if ci is None or auc_key != 'auc':
    return ''
  if name == 'uncertainty_minus_kde':
    return f' [uncertainty - KDE: 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}]'
  return f', 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}'


def check_claims(result: dict, auc_key: str = 'auc') -> list[dict]:
  """Tuna et al.'s (2021) three claims, checked on the measured AUCs (nothing is assumed).

  1. Uncertainty stronger than KDE at the low eps: per attack, the uncertainty metric chosen on
     the held-out combiner-fit images beats KDE's test AUC by more than the tolerance.
  2. KDE stronger than uncertainty at the high eps: the same comparison the other way round.
     Also reported: whether KDE's advantage over uncertainty grows from low to high eps (the
     weaker, trend form of claims 1 + 2).
  3. The LR combination at least as good as the best single metric: per attack x eps, the
     combination's test AUC >= the best of the six single test AUCs (chosen on test, the bar
     least favourable to the combination) minus the tolerance.

  Verdicts compare point estimates with the tolerance; where the rows carry paired-bootstrap CIs
  (`bootstrap_ci95`), the verdict also says for how many rows the CI of the difference excludes
  0 (claims 1, 2) or shows the combination significantly below the best single metric (claim 3).

  Args:
    result: the study's result dict (rows with per-metric AUCs).
    auc_key: 'auc' (direction chosen on held-out data, the default) or 'auc_fixed' (every metric
      in its fixed orientation).
  """
  tol = result['claim_tolerance']
  lo, hi = min(result['eps']), max(result['eps'])
  select = lambda r: _selected_uncertainty(r, directed=auc_key == 'auc')
  out = []
  for cid, eps, claim, stronger in (
      (1, lo, f'uncertainty metrics stronger than KDE at low eps ({lo:g})', 'uncertainty'),
      (2, hi, f'KDE stronger than uncertainty metrics at high eps ({hi:g})', 'kde')):
    details, holds, significant = [], [], []
    for r in _rows_at(result, eps):
      u = select(r)
      au, ak = r['metrics'][u][auc_key], r['metrics']['kde'][auc_key]
      ok = au > ak + tol if stronger == 'uncertainty' else ak > au + tol
      holds.append(ok)
      ci = r.get('bootstrap_ci95', {}).get('uncertainty_minus_kde') if auc_key == 'auc' else None
      if ci is not None:
        significant.append(ci[0] > 0 if stronger == 'uncertainty' else ci[1] < 0)
      details.append(f'{r["attack"]}: {SHORT[u]} {au:.3f} vs KDE {ak:.3f}'
                     + _ci(r, 'uncertainty_minus_kde', auc_key))
    verdict = _verdict(holds)
    if significant:
      verdict += f'; significant (95% CI excludes 0) for {sum(significant)}/{len(significant)}'
    out.append({'id': cid, 'claim': claim, 'verdict': verdict, 'holds': holds,
                'detail': '; '.join(details)})
  trend, tdetails = [], []
  for r_lo in _rows_at(result, lo) if hi > lo else []:
    r_hi = next((r for r in _rows_at(result, hi) if r['attack'] == r_lo['attack']), None)
    if r_hi is None:
      continue
    gap = [r['metrics']['kde'][auc_key] - r['metrics'][select(r)][auc_key]
           for r in (r_lo, r_hi)]
    trend.append(gap[1] > gap[0] + tol)
    tdetails.append(f'{r_lo["attack"]}: KDE - uncertainty {gap[0]:+.3f} -> {gap[1]:+.3f}')
  out.append({'id': '1+2 trend', 'claim': f'KDE gains on uncertainty from eps {lo:g} to {hi:g}',
              'verdict': _verdict(trend), 'holds': trend, 'detail': '; '.join(tdetails)})
  holds, details, ties, worse = [], [], 0, []
  for r in result['rows']:
    if not r['metrics'] or not r[COMBINED]:
      continue
    best = max(METRICS, key=lambda m: r['metrics'][m][auc_key])
    c, b = r[COMBINED]['auc'], r['metrics'][best][auc_key]
    holds.append(c >= b - tol)
    ties += int(b - tol <= c < b)
    ci = r.get('bootstrap_ci95', {}).get('combined_minus_best_single')
    if auc_key == 'auc' and ci is not None and ci[1] < 0:
      worse.append(r['label'])
    details.append(f'{r["label"]}: LR {c:.3f} vs {SHORT[best]} {b:.3f} ({c - b:+.3f}'
                   + _ci(r, 'combined_minus_best_single', auc_key) + ')')
  verdict = _verdict(holds)
  if ties:
    verdict += f' ({ties} of {len(holds)} only within the tie tolerance)'
  if worse:
    verdict += (f'; significantly below the best single metric (95% CI) for {len(worse)}/'
                f'{len(holds)}: {", ".join(worse)}')
  out.append({'id': 3, 'claim': 'LR combination at least as good as the best single metric',
              'verdict': verdict, 'holds': holds, 'detail': '; '.join(details)})
  return out


# ----------------------------------------------------------------------------------------------
# Report and plot.


def roc_plot(result: dict, roc: dict, path: str) -> str:
  """One panel per attack x eps: the ROC of each metric (held-out direction) and of the LR."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from sklearn.metrics import roc_curve

  eps_list = sorted(result['eps'])
  attacks = list(dict.fromkeys(r['attack'] for r in result['rows']))
  fig, axes = plt.subplots(len(eps_list), len(attacks), squeeze=False,
                           figsize=(4.2 * len(attacks), 4.0 * len(eps_list)))
  for i, eps in enumerate(eps_list):
    for j, name in enumerate(attacks):
      ax = axes[i][j]
      row = next((r for r in result['rows'] if r['attack'] == name and r['eps'] == eps), None)
      curves = roc.get(row['label'], {}) if row else {}
      for m in METRICS + (COMBINED,):
        if m not in curves:
          continue
        neg, pos = np.asarray(curves[m]['neg']), np.asarray(curves[m]['pos'])
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
        auc = row[COMBINED]['auc'] if m == COMBINED else row['metrics'][m]['auc']
        ax.plot(fpr, tpr, lw=2.2 if m == COMBINED else 1.1, color='k' if m == COMBINED else None,
                ls='--' if m in CLOSENESS else '-', label=f'{SHORT[m]} {auc:.3f}')
      ax.plot([0, 1], [0, 1], ':', color='gray', lw=0.8)
      succ = f', success {row["success_rate"]:.2f}, n={row["n_pos"]}' if row else ''
      ax.set(xlabel='false positive rate', ylabel='true positive rate',
             title=f'{name} eps={eps:g}{succ}')
      ax.title.set_fontsize(9)
      ax.legend(fontsize=7, loc='lower right')
  fig.suptitle('Digits (Tuna et al. 2021 study): ROC on test, positives = successful adversarial, '
               'negatives = their clean images', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def _f(v, digits: int = 3) -> str:
  return '-' if v is None or (isinstance(v, float) and np.isnan(v)) else f'{v:.{digits}f}'


def _auc_cell(row: dict, m: str) -> str:
  if m == COMBINED:
    return _f(row[COMBINED]['auc']) if row[COMBINED] else '-'
  d = row['metrics'].get(m)
  if not d:
    return '-'
  return _f(d['auc']) + (f' (fixed {_f(d["auc_fixed"])})*' if d['direction'] == -1 else '')


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
  """Hanley & McNeil (1982) standard error of an ROC AUC from n_pos positives, n_neg negatives."""
  q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
  var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc))
  return float(np.sqrt(max(var, 0.0) / max(n_pos * n_neg, 1)))


def paired_bootstrap_auc_diff(a: dict, b: dict, *, seed: int, n_resamples: int = 1000,
                              level: float = 0.95) -> list[float]:
  """Percentile CI of AUC(a) - AUC(b) over paired bootstrap resamples of the test examples.

  `a` and `b` are {'neg': [n], 'pos': [n]} scores of two detectors on the same examples, where
  neg[i] is the clean version of pos[i]; each resample draws n indices with replacement and
  keeps the clean/adversarial pairs and the two detectors together, so the CI accounts for both
  being scored on the same images.
  """
  from scipy.stats import rankdata
  n = len(a['pos'])
  idx = np.random.default_rng([int(seed), 6]).integers(0, n, size=(n_resamples, n))

  def aucs(d):
    both = np.concatenate([np.asarray(d['neg'])[idx], np.asarray(d['pos'])[idx]], axis=1)
    ranks = rankdata(both, axis=1)
    return (ranks[:, n:].sum(axis=1) - n * (n + 1) / 2.0) / (n * n)

  diff = aucs(a) - aucs(b)
  q = (1.0 - level) / 2.0
  return [float(np.quantile(diff, q)), float(np.quantile(diff, 1.0 - q))]


def report_section(result: dict, *, relative_to: str | None = None) -> str:
  """The study as a markdown section (tables, the claims as measured, sanity notes, ROC figure).

  Args:
    result: what `run_digits_study` returned (or `digits_study.json`).
    relative_to: directory of the markdown file the section goes into; the ROC figure is linked
      relative to it (None = the path as stored).
  """
  rows = result['rows']
  cols = METRICS + (COMBINED,)
  eps = ' and '.join(f'{e:g}' for e in result['eps'])
  lines = [
      '## Digits: Tuna et al. 2021 study (MC-dropout uncertainty, KDE/KL closeness, LR combination)', '',
      f"Dropout CNN (Conv-Conv-Pool-Dropout-Dense128-Dropout-Dense10) on scikit-learn's 8x8 "
      f'digits; clean test accuracy {result["clean_test_accuracy"]:.4f} on {result["n_test"]} test '
      f'images. Attacks FGSM, BIM, PGD-L∞ ({result["steps"]} steps for BIM/PGD) at eps {eps} '
      f"(pixels in [0, 1]; Tuna et al.'s (2021) MNIST values). Threat model: {result['threat_model']}. MC "
      f'dropout T={result["T"]}; KDE bandwidth {result["kde_bandwidth"]:.3g} '
      f'({result["kde_bandwidth_source"]}; Tuna et al. 2021 used 1.70 on MNIST features); KL on '
      f'{result["kl_pmf"]} PMFs.', '',
      'ROC AUC on test: positives = successful adversarial examples, negatives = their clean '
      'images. A metric marked * was flipped because it pointed the wrong way on the held-out '
      'combiner-fit images (its fixed-direction AUC in parentheses).', '',
      '| attack | eps | success | n | ' + ' | '.join(SHORT[m] for m in cols) + ' |',
      '|---|---|---|---|' + '---|' * len(cols)]
  for r in rows:
    lines.append(f'| {r["attack"]} | {r["eps"]:g} | {r["success_rate"]:.3f} | {r["n_pos"]} | '
                 + ' | '.join(_auc_cell(r, m) for m in cols) + ' |')
  lines += ['', 'TPR at 5% FPR (threshold = 95th percentile of the metric on '
            f'{result["n_threshold"]} held-out clean validation images; in parentheses the FPR '
            "this threshold gives on the row's negatives):", '',
            '| attack | eps | ' + ' | '.join(SHORT[m] for m in cols) + ' |',
            '|---|---|' + '---|' * len(cols)]
  for r in rows:
    lines.append(f'| {r["attack"]} | {r["eps"]:g} | '
                 + ' | '.join(_tpr_cell(r, m) for m in cols) + ' |')
  lines += ['', "**Tuna et al.'s (2021) claims, as measured** (AUC differences below "
            f'{result["claim_tolerance"]:g} count as ties; uncertainty = the metric best on the '
            'held-out combiner-fit images):', '']
  fixed = {c['id']: c for c in check_claims(result, auc_key='auc_fixed')}
  for c in result['claims']:
    extra = ''
    if fixed.get(c['id'], c)['verdict'] != c['verdict']:
      extra = f' (with every metric in its fixed direction: {fixed[c["id"]]["verdict"]})'
    lines.append(f'* {c["claim"]}: **{c["verdict"]}**{extra}. {c["detail"]}.')
  lines += ['', 'What the numbers mean / sanity:', ''] + [f'* {n}' for n in _notes(result)]
  png = result.get('roc_png')
  if png:
    link = os.path.relpath(png, relative_to) if relative_to else png
    lines += ['', f'![digits ROC curves]({link})']
  return '\n'.join(lines)


def _tpr_cell(row: dict, m: str) -> str:
  d = row[COMBINED] if m == COMBINED else row['metrics'].get(m)
  if not d:
    return '-'
  return f'{_f(d["tpr@5%fpr"])} ({_f(d["test_fpr@5%"])})'


def _notes(result: dict) -> list[str]:
  """The sanity bullets under the tables."""
  rows = result['rows']
  fit_rows = [r for r in rows if r[COMBINED]]
  overlap = sum(r[COMBINED]['fit_overlap_with_scored_images'] for r in fit_rows)
  notes = [
      f'Splits by image: KDE/KL fitted on {result["n_train_fit"]} clean training images; one LR '
      f'per attack x eps fitted on successful attacks among {result["n_combiner_fit_pool"]} '
      'validation images (n = ' + ', '.join(f'{r["label"]} {r["n_fit_adv"]}' for r in rows)
      + " adversarial, as many clean, and as many Gaussian-noisy copies with the noise std matched "
      f"to each attack's RMS perturbation); thresholds from the other {result['n_threshold']} "
      f'validation images; evaluation on the {result["n_test"]} test images. Images shared '
      f"between a combiner's fit set and what it scored: {overlap} (the combiner also refuses "
      'such images itself).']
  sanity = result.get('attack_sanity', [])
  bad = '; '.join(f'{s["check"]} ({s["detail"]})' for s in sanity if not s['ok'])
  notes.append(f'Attack sanity checks (test): {sum(s["ok"] for s in sanity)}/{len(sanity)} pass'
               + (f': failing {bad}' if bad else '')
               + '. Success counts only images the CNN classifies correctly when clean.')
  if fit_rows:
    every = [r[COMBINED]['clean_test_fpr@5%'] for r in fit_rows]
    paired = ', '.join(f'{r["label"]} {r[COMBINED]["test_fpr@5%"]:.3f}' for r in fit_rows)
    notes.append(
        f'The 5%-FPR thresholds come from held-out clean validation images. On all '
        f'{result["n_test"]} clean test images they give the combination an FPR of '
        f'{min(every):.3f}-{max(every):.3f} (target 5%; {result["n_threshold"]} threshold images '
        "make it noisy). On each row's negatives, the clean versions of the images the attack "
        f'broke, the FPR is {paired}: higher at low eps, where the attack breaks mostly the images '
        'the CNN is least sure of, whose clean versions already score above typical clean images. '
        'The TPRs hold at the stated FPR on clean data in general, not on these negatives.')
  ref = [r for r in rows if r.get('kde_reference_bandwidth_auc') is not None]
  if ref:
    aucs = ', '.join(f'{r["label"]} {r["kde_reference_bandwidth_auc"]:.3f} '
                     f'({r["metrics"]["kde"]["auc"]:.3f})' for r in ref)
    notes.append(f"KDE bandwidth sensitivity: with Tuna et al.'s (2021) MNIST bandwidth "
                 f'{result["kde_reference_bandwidth"]:g} instead of {result["kde_bandwidth"]:.3g}, '
                 f"KDE's AUCs are {aucs} (chosen bandwidth in parentheses; not in the claims).")
  ses = [auc_standard_error(r['metrics'][m]['auc'], r['n_pos'], r['n_neg'])
         for r in rows if r['metrics'] for m in METRICS]
  if ses:
    n_pos = [r['n_pos'] for r in rows]
    notes.append(f'Small samples: {min(n_pos)}-{max(n_pos)} positives per row, so a single AUC '
                 f'has a standard error of about {min(ses):.3f}-{max(ses):.3f} (Hanley-McNeil). '
                 'The AUC differences the claims rest on come with 95% CIs from 1000 paired '
                 'bootstrap resamples of the test pairs (both detectors on the same images).')
  # Sorted: a cached result comes back from JSON key-sorted, and the section must not change
  # between runs (the main job re-evaluates when it does).
  parts = ', '.join(f'{k} {v}s' for k, v in sorted(result['seconds'].items()) if k != 'total')
  notes.append(f'Seed {result["seed"]}; all numbers are deterministic for a given seed. Wall time '
               f'{result["seconds"]["total"]:.0f}s ({parts}).')
  return notes


def main_job_stages(config) -> list:
  """The main job's stage for this study (`pipeline.run_main(..., extra_stages=...)`): runs it
  on `config.digits` in `<workdir>/digits` and returns its report section; [] without `digits`."""
  if config.get('digits', None) is None:
    return []

  def run(workdir: str, eval_dir: str) -> str:
    result = run_digits_study(config.digits, os.path.join(workdir, 'digits'))
    return report_section(result, relative_to=eval_dir)
  return [('digits study', run)]


def main(argv) -> None:
  del argv
  from absl import flags
  config = flags.FLAGS.config
  run_digits_study(config, flags.FLAGS.workdir)
  print(f'report: {os.path.join(flags.FLAGS.workdir, REPORT_MD)}')


if __name__ == '__main__':
  from absl import flags
  from unmask_jax import cli
  cli.define_config('config', 'experiments/digits/config.py', 'experiments/digits/config.py '
                    '(":tiny" for the test variant).')
  flags.DEFINE_string('workdir', 'runs/digits', 'Output directory (cached stages are reused).')
  cli.run(main)   # one-line errors and both CPU cores, as the other scripts
