"""The main job in quick mode end to end, its caching, and evaluate.py's input checks."""
import json
import os
import subprocess
import sys

import pytest

from configs import evaluate as evaluate_config
from configs import quick
from experiments.digits import study as digits_study
from unmask_jax import pipeline
from unmask_jax.eval import attack_runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('quick'))
  c = quick.get_config()
  c.data_dir = os.path.join(wd, 'data')
  report = pipeline.run_main(c, wd, extra_stages=digits_study.main_job_stages(c))
  return wd, c, report


@pytest.fixture(scope='module')
def quick_results(quick_run):
  """results.json of the quick job as first written (later tests re-run stages in its workdir)."""
  return json.load(open(os.path.join(quick_run[0], 'eval', 'results.json')))


def test_quick_main_job_writes_report_with_all_sections(quick_run, quick_results):
  wd, c, report = quick_run
  text = open(report).read()
  for section in ('## Findings', '## Headline: attack success, per-image worst case',
                  '### Adaptive attacks, per defense', '## Accuracy (gray-box; Table IV form',
                  '## Detection (gray-box; contamination 0.5)',
                  '## MRR at its security parameter', '## Part extraction K under attack',
                  '## Sanity checks of the attacks', '## Digits: Tuna et al. 2021 study',
                  '## Main job: wall seconds per stage'):
    assert section in text
  # Per-stage wall times of this run end the report (issue #15).
  times = text[text.index('## Main job: wall seconds per stage'):]
  for stage in ('| train K | ', '| attack AT-M cs3b | ', '| evaluate | ', '| total | '):
    assert stage in times, stage
  for cs in ('cs3a', 'cs3b'):
    assert f'![ROC {cs}](roc_{cs}.png)' in text
    assert os.path.getsize(os.path.join(wd, 'eval', f'roc_{cs}.png')) > 1000
  results = json.load(open(os.path.join(wd, 'eval', 'results.json')))
  cs3a = results['class_sets']['cs3a']
  mc = next(d for d in results['defenses'] if d.startswith('mc_dropout'))
  # MC dropout also predicts (the MC-averaged class); KDE, KL, LR and MRR only detect. Deep
  # Protection predicts too, but only where the quick config runs its DIP study (cs3a, PGD-Linf-8).
  assert set(cs3a['clean']) == {'None', 'AT', 'unmask', mc, 'deep_protection'}
  assert set(results['class_sets']['cs3b']['clean']) == {'None', 'AT', 'unmask', mc}
  assert set(cs3a['attacks']) == {'FGSM-Linf-8', 'PGD-Linf-8', 'PGD-L2-600', 'AutoAttack-Linf-8'}
  # AutoAttack's per-image worst case is in the worst-case row: never above any single attack.
  wc = cs3a['worst_case']['accuracy']
  assert set(wc) >= {'None', 'AT', 'unmask'}
  for m, v in wc.items():
    assert v <= min(x['accuracy'][m] for x in cs3a['attacks'].values() if m in x['accuracy']) + 1e-9
  assert '| worst case (per image, every attack above) |' in text
  # The report lists attacks in the order they were run (results.json is key-sorted).
  acc = text[text.index('## Accuracy'):]
  assert acc.index('| FGSM-Linf-8 |') < acc.index('| PGD-Linf-8 |') < acc.index('| PGD-L2-600 |')
  a = cs3a['attacks']['PGD-Linf-8']
  assert set(a['accuracy']) == {'None', 'AT', 'unmask', mc, 'deep_protection'}
  assert 'deep_protection' not in cs3a['attacks']['FGSM-Linf-8']['accuracy']
  detected = {d for x in cs3a['attacks'].values() for d in x['detection']}
  assert detected <= set(results['defenses']) and {'kde', 'kl'} <= set(results['defenses'])
  # Every kind of detector reached the detection table, the combiner included.
  kinds = {d.split('(')[0] for d in detected}
  # (DIP's residual reaches it only when >= 2 of its 6 images were attacked successfully.)
  assert kinds - {'deep_protection'} == {'unmask', 'mc_dropout', 'kde', 'kl', 'lr_combiner', 'mrr', 'lid'}
  # The adaptive section: the quick config attacks UnMask and KDE on cs3a only.
  ad = cs3a['adaptive']
  assert set(ad) == {'unmask', 'kde'}
  assert 'adaptive' not in results['class_sets']['cs3b']
  for name, rows in ad.items():
    r = rows['PGD-Linf-8']
    assert r['ball_violations'] == 0 and r['ball_violations_8bit'] == 0
    # Worst case is per image over both attacks: never below either.
    assert r['worst_case_success'] >= max(r['adaptive_success'], r['graybox_success']) - 1e-9
  assert ad['kde']['PGD-Linf-8']['budget_check']['success'][1] >= \
      ad['kde']['PGD-Linf-8']['budget_check']['success'][0]
  assert 'Threat model: per-image worst case' in text and 'more restarts never lower' in text
  # The combiner's held-out split: 12 validation images attacked, thresholds on the other 24.
  assert cs3a['n_combiner_holdout'] == 12 and cs3a['n_validation'] == 24
  # MRR flags at its own operating point; 2 defenders were trained and loaded.
  assert len(cs3a['mrr_defenders']) == 2
  for d in ('mrr(n=1)', 'mrr(n=2)'):
    assert 0.0 <= cs3a['flags_clean'][d]['test'] <= 1.0
    assert 0.0 <= a['flags'][d]['defense_success'] <= 1.0
  for v in a['accuracy'].values():
    assert 0.0 <= v <= 1.0
  assert cs3a['overlap'] == pytest.approx(2 / 29)


def test_adaptive_study_reproduces_the_evaluations_adaptive_rows(quick_run, quick_results,
                                                                 tmp_path):
  """experiments/adaptive with the quick job's adaptive budget, in one batch: the evaluation's
  fitted states, images and key, hence its numbers; in two batches, rows merged by image count.
  (Before test_second_run_skips_finished_stages, which re-runs the evaluation with another
  max_fit in the same workdir.)"""
  from experiments.adaptive import config as adaptive_config
  from experiments.adaptive import study as adaptive_study
  wd, c, _ = quick_run
  cfg = adaptive_config.get_config()
  cfg.main_workdir, cfg.data_dir, cfg.max_fit = wd, c.data_dir, c.evaluate.max_fit
  cfg.class_sets, cfg.defenses = ('cs3a',), tuple(c.evaluate.adaptive.defenses)
  cfg.adaptive = c.evaluate.adaptive
  cfg.n_images = cfg.batch_size = int(c.evaluate.adaptive.n_images)
  result = adaptive_study.run_study(cfg, str(tmp_path / 'one'))
  expected = quick_results['class_sets']['cs3a']['adaptive']
  for name in cfg.defenses:
    got = result['class_sets']['cs3a'][name]['PGD-Linf-8']
    want = expected[name]['PGD-Linf-8']
    for k in ('adaptive_success', 'graybox_success', 'worst_case_success', 'threshold', 'm_fooled'):
      assert got[k] == pytest.approx(want[k]), (name, k)
  text = open(tmp_path / 'one' / adaptive_study.REPORT_MD).read()
  assert '| CS3A | unmask | PGD-Linf-8 |' in text and 'Threat model: white-box' in text
  cfg.batch_size = 5                       # 12 images: batches of 5, 5 and 2
  rows = adaptive_study.run_study(cfg, str(tmp_path / 'three'))['class_sets']['cs3a']
  row = rows['kde']['PGD-Linf-8']
  assert row['n_images'] == 12 and len(row['auc_per_batch']) == 3
  assert 0.0 <= row['adaptive_success'] <= row['worst_case_success'] <= 1.0

def test_second_run_skips_finished_stages(quick_run):
  wd, c, report = quick_run
  before = os.path.getmtime(report)
  attacks_index = os.path.join(wd, 'attacks_cs3a', attack_runner.INDEX)
  before_idx = os.path.getmtime(attacks_index)
  pipeline.run_main(c, wd, extra_stages=digits_study.main_job_stages(c))
  assert os.path.getmtime(report) == before and os.path.getmtime(attacks_index) == before_idx
  last = json.loads(open(os.path.join(wd, 'stage_seconds.jsonl')).read().strip().splitlines()[-1])
  assert 'evaluate' not in last and last['train K'] < 10
  # A changed evaluation config re-runs only the evaluation.
  c2 = c.copy_and_resolve_references()
  c2.evaluate.max_fit = 60
  c2.evaluate.adaptive.n_images = 0   # (keeps the test short; the adaptive stage is tested above)
  pipeline.run_main(c2, wd, extra_stages=digits_study.main_job_stages(c2))
  last = json.loads(open(os.path.join(wd, 'stage_seconds.jsonl')).read().strip().splitlines()[-1])
  assert 'evaluate' in last and os.path.getmtime(report) > before
  assert os.path.getmtime(attacks_index) == before_idx


def _eval_cfg(wd, c, **dirs):
  e = evaluate_config.get_config()
  e.k_dir, e.data_dir = os.path.join(wd, 'k'), c.data_dir
  import ml_collections
  e.class_sets = ml_collections.ConfigDict({'cs3a': {**evaluate_config.class_set_dirs(wd, 'cs3a').to_dict(), **dirs}})
  e.max_fit, e.batch_size = 64, 32
  return e


def test_attack_results_of_another_model_are_rejected(quick_run, tmp_path):
  wd, c, _ = quick_run
  e = _eval_cfg(wd, c, attacks_dir=os.path.join(wd, 'attacks_at_cs3a'), at_dir='', at_attacks_dir='')
  with pytest.raises(ValueError, match='another model'):
    pipeline.evaluate(e, str(tmp_path / 'eval'))


def test_attack_results_on_other_data_are_rejected(quick_run, tmp_path):
  wd, c, _ = quick_run
  e = _eval_cfg(wd, c, m_dir=os.path.join(wd, 'm_cs3b'), attacks_dir=os.path.join(wd, 'attacks_cs3a'),
                at_dir='', at_attacks_dir='')
  with pytest.raises(ValueError, match='another model|other data'):
    pipeline.evaluate(e, str(tmp_path / 'eval'))


def test_missing_stage_output_names_the_command(quick_run, tmp_path):
  wd, c, _ = quick_run
  e = _eval_cfg(wd, c, attacks_dir=str(tmp_path / 'none'), at_dir='', at_attacks_dir='')
  with pytest.raises(FileNotFoundError, match='attack.py'):
    pipeline.evaluate(e, str(tmp_path / 'eval'))
  e = _eval_cfg(wd, c)
  e.k_dir = str(tmp_path / 'nok')
  with pytest.raises(Exception, match='train_k.py|train it first'):
    pipeline.evaluate(e, str(tmp_path / 'eval'))


def test_attack_script_rerun_skips_and_bad_spec_fails_fast(quick_run, tmp_path):
  wd, c, _ = quick_run
  env = {**os.environ, 'UNMASK_NO_PROGRESS': '1'}
  args = [sys.executable, 'attack.py', f'--config.model_dir={wd}/m_cs3a', f'--config.data_dir={c.data_dir}',
          f'--workdir={wd}/attacks_cs3a', '--config.max_examples=24', '--config.batch_size=32']
  spec = '--config.attacks=("FGSM-Linf-8=fgsm(eps=8/255)",)'
  out = subprocess.run(args + [spec], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'already done with the same parameters, skipped' in out.stdout and 'success_rate' in out.stdout
  out = subprocess.run(args[:-1] + ['--config.attacks=("X=pgd_linf(eps=8, steps=3)",)'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and '255' in out.stderr


def test_paper_attack_list_rescales_l2_eps():
  specs = dict(attack_runner.split_label(s) for s in attack_runner.paper_attacks((32, 32, 3)))
  assert len([k for k in specs if not k.startswith('FGSM')]) == 8
  from unmask_jax.attacks import parse_attack
  eps = parse_attack(specs['PGD-L2-300']).eps
  assert eps == pytest.approx(300 / 255 * (32 / 150))
  assert parse_attack(specs['PGD-Linf-16']).eps == pytest.approx(16 / 255)

