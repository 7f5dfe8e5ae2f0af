"""The digits study (Tuna et al. 2021): the tiny config end to end, and the claim checks on made-up AUCs."""
import copy
import os

import numpy as np
import pytest

from experiments.digits import config as digits_config
from unmask_jax import data as data_lib
from unmask_jax.data import pipeline as data_pipeline
from unmask_jax.defenses import combiner
from experiments.digits import study as digits_study
from unmask_jax.train import checkpoint as ckpt


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('digits_study'))
  config = digits_config.tiny()
  return config, workdir, digits_study.run_digits_study(config, workdir)


def _numbers(result: dict) -> dict:
  """Everything but timings and file paths."""
  r = {k: v for k, v in result.items() if k not in ('seconds', 'roc', 'roc_png')}
  return copy.deepcopy(r)


def test_every_attack_eps_metric_is_reported(study):
  config, workdir, result = study
  labels = [r['label'] for r in result['rows']]
  assert labels == [f'{a.split("=")[0]}-{e:g}' for e in config.eps for a in config.attacks]
  for row in result['rows']:
    assert 0.0 <= row['success_rate'] <= 1.0
    assert row['n_pos'] >= 2, row['label']
    assert set(row['metrics']) == set(digits_study.METRICS)
    for m, d in row['metrics'].items():
      assert 0.0 <= d['auc'] <= 1.0 and 0.0 <= d['auc_fixed'] <= 1.0, (row['label'], m)
      assert 0.0 <= d['tpr@5%fpr'] <= 1.0
      # The held-out direction only flips a metric: its AUC is the fixed one or 1 minus it.
      want = d['auc_fixed'] if d['direction'] == 1 else 1.0 - d['auc_fixed']
      assert d['auc'] == pytest.approx(want, abs=1e-9)
    comb = row[digits_study.COMBINED]
    assert comb is not None, row['label']
    assert 0.0 <= comb['auc'] <= 1.0 and 0.0 <= comb['tpr@5%fpr'] <= 1.0
    assert comb['fit_overlap_with_scored_images'] == 0
  assert [c['id'] for c in result['claims']] == [1, 2, '1+2 trend', 3]
  for path in (digits_study.RESULT_JSON, digits_study.REPORT_MD, digits_study.ROC_PNG):
    assert os.path.getsize(os.path.join(workdir, path)) > 0
  md = digits_study.report_section(result)
  assert md.count('\n| FGSM |') == 4 and md.count('\n| PGD |') == 4  # AUC and TPR tables
  for c in result['claims']:
    assert f'{c["claim"]}: **{c["verdict"]}**' in md


def test_combiner_fit_images_are_disjoint_from_evaluated_ones(study):
  _, workdir, result = study
  _, spec = ckpt.load_model(os.path.join(workdir, 'model'))
  load = lambda s: data_lib.load_from_config(spec['data_config'], s, data_dir='unused')
  val, test = load('validation'), load('test')
  pool = set(result['combiner_pool_validation_indices'])
  assert pool.isdisjoint(result['threshold_validation_indices'])
  test_images = data_pipeline.to_float(test.arrays['image'])
  evaluated = [combiner.image_fingerprints(test_images)]
  fitted = []
  for row in result['rows']:
    idx = np.asarray(row['combiner_fit_validation_indices'], int)
    assert set(idx.tolist()) <= pool and len(idx) == row['n_fit_adv'] >= 2
    with np.load(os.path.join(workdir, 'attacks_validation', f'{row["label"]}.npz')) as f:
      assert f['success'][idx].all()
      fitted += [combiner.image_fingerprints(f['x_adv'][idx])]
    with np.load(os.path.join(workdir, 'attacks_test', f'{row["label"]}.npz')) as f:
      evaluated += [combiner.image_fingerprints(f['x_adv'][f['success'].astype(bool)])]
    fitted += [combiner.image_fingerprints(data_pipeline.to_float(val.arrays['image'][idx]))]
  thr = data_pipeline.to_float(val.arrays['image'][result['threshold_validation_indices']])
  evaluated += [combiner.image_fingerprints(thr)]
  assert not np.isin(np.concatenate(evaluated), np.concatenate(fitted)).any()


def test_pgd_is_at_least_as_strong_as_fgsm(study):
  _, _, result = study
  rate = {(r['attack'], r['eps']): r['success_rate'] for r in result['rows']}
  for eps in {r['eps'] for r in result['rows']}:
    assert rate['PGD', eps] >= rate['FGSM', eps]


def test_rerun_gives_identical_numbers_and_reuses_the_cache(study):
  config, workdir, result = study
  final_path = os.path.join(workdir, 'model', 'final.json')
  mtime = os.path.getmtime(final_path)
  again = digits_study.run_digits_study(config, workdir, reuse=False)  # rescored from scratch
  assert _numbers(again) == _numbers(result)
  cached = digits_study.run_digits_study(config, workdir)
  assert _numbers(cached) == _numbers(result)
  assert os.path.getmtime(final_path) == mtime  # the model was not retrained


def _fake_result(auc: dict) -> dict:
  """A result whose AUCs are given per (attack, eps): {'unc': ..., 'kde': ..., 'lr': ...}."""
  rows = []
  for (attack, eps), a in auc.items():
    metrics = {m: {'auc': a['unc'] if m in digits_study.UNCERTAINTY else a['kde'],
                   'heldout_auc': 0.7, 'auc_fixed': 0.5, 'direction': 1}
               for m in digits_study.METRICS}
    metrics['kl']['auc'] = 0.5
    rows.append({'label': f'{attack}-{eps:g}', 'attack': attack, 'eps': eps, 'metrics': metrics,
                 digits_study.COMBINED: {'auc': a['lr']}})
  return {'rows': rows, 'eps': sorted({e for _, e in auc}), 'claim_tolerance': 0.01}


def test_claims_follow_the_numbers():
  paper_like = _fake_result({('BIM', 0.1): {'unc': 0.9, 'kde': 0.7, 'lr': 0.92},
                             ('BIM', 0.3): {'unc': 0.6, 'kde': 0.95, 'lr': 0.96}})
  got = {c['id']: c['verdict'] for c in digits_study.check_claims(paper_like)}
  assert got == {1: 'yes', 2: 'yes', '1+2 trend': 'yes', 3: 'yes'}
  opposite = _fake_result({('BIM', 0.1): {'unc': 0.6, 'kde': 0.9, 'lr': 0.8},
                           ('BIM', 0.3): {'unc': 0.95, 'kde': 0.7, 'lr': 0.9}})
  got = {c['id']: c['verdict'] for c in digits_study.check_claims(opposite)}
  assert got == {1: 'no', 2: 'no', '1+2 trend': 'no', 3: 'no'}
  mixed = _fake_result({('BIM', 0.1): {'unc': 0.9, 'kde': 0.7, 'lr': 0.895},   # a tie counts
                        ('PGD', 0.1): {'unc': 0.7, 'kde': 0.9, 'lr': 0.95},
                        ('BIM', 0.3): {'unc': 0.8, 'kde': 0.805, 'lr': 0.9},  # within tolerance
                        ('PGD', 0.3): {'unc': 0.8, 'kde': 0.9, 'lr': 0.9}})
  got = {c['id']: c['verdict'] for c in digits_study.check_claims(mixed)}
  assert got == {1: 'partly (1/2)', 2: 'partly (1/2)', '1+2 trend': 'partly (1/2)',
                 3: 'yes (1 of 4 only within the tie tolerance)'}


def test_paired_bootstrap_ci_of_an_auc_difference():
  rng = np.random.default_rng(0)
  neg, pos = rng.normal(size=200), rng.normal(size=200) + 2.0
  strong = {'neg': neg.tolist(), 'pos': pos.tolist()}
  chance = {'neg': rng.normal(size=200).tolist(), 'pos': rng.normal(size=200).tolist()}
  assert digits_study.paired_bootstrap_auc_diff(strong, strong, seed=0) == [0.0, 0.0]
  lo, hi = digits_study.paired_bootstrap_auc_diff(strong, chance, seed=0)
  assert 0.2 < lo < hi < 0.6  # AUC ~0.92 vs ~0.5
  assert digits_study.paired_bootstrap_auc_diff(strong, chance, seed=0) == [lo, hi]
