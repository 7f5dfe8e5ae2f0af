"""The Deep Protection study (Kulkarni & Ambati): its configs match the main job's evaluation, and
the script reads a main-job layout as the evaluation does (held-out validation images left out,
the evaluation's key), caches its result and writes the report section."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import attack as attack_config
from configs import evaluate as evaluate_config
from configs import quick as quick_config
from configs import tiny
from experiments.deep_protection import config as dp_config
from experiments.deep_protection import study
from unmask_jax import pipeline
from unmask_jax.data import pipeline as data_pipeline
from unmask_jax.eval import deep_protection_eval
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.utils import named_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIP = {'n_images': 3, 'val_size': 3, 'max_iters': 10, 'check_every': 5, 'chunk': 8,
            'widths': (8,), 'input_depth': 4, 'min_iters': 5}


def _evaluation_settings(dip_block) -> dict:
  """What the evaluation passes to `evaluate_stop_rules` for a `dip` config block."""
  return {k: v for k, v in dip_block.to_dict().items() if k not in ('class_sets', 'attacks')}


def test_configs_are_the_main_jobs_settings():
  """Same settings, attacks, seed and class set as the main job's evaluation: the same numbers."""
  for study_cfg, main_eval in ((dp_config.get_config(), evaluate_config.get_config()),
                               (dp_config.get_config('quick'), quick_config.get_config().evaluate)):
    dip = study_cfg.dip.to_dict()
    assert sorted(dip) == sorted(deep_protection_eval.default_config().to_dict())
    defaults = dict(deep_protection_eval.default_config().to_dict(),
                    **_evaluation_settings(main_eval.dip))
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dip.items()} == \
        {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in defaults.items()}
    assert tuple(study_cfg.attacks) == tuple(main_eval.dip.attacks)
    assert study_cfg.class_set in main_eval.dip.class_sets
    assert study_cfg.seed == main_eval.seed and study_cfg.max_validation == main_eval.max_validation
  assert dp_config.get_config('quick').main_workdir == 'runs/quick'
  with pytest.raises(ValueError, match='full'):
    dp_config.get_config('tiny')


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  """A tiny main-job layout: M for cs3a, FGSM on its first 6 test images, and 4 held-out
  validation images attacked for the LR combiner (which the study must leave out)."""
  root = str(tmp_path_factory.mktemp('main'))
  data_dir = os.path.join(root, 'data')
  m = tiny.get_config('m')
  m.data.data_dir, m.data.class_set = data_dir, 'cs3a'
  pipeline.train(m, os.path.join(root, 'm_cs3a'), expect_task='classifier')
  for split, out, n in (('test', 'attacks_cs3a', 6), ('validation', 'attacks_holdout_cs3a', 4)):
    a = attack_config.get_config()
    a.model_dir, a.data_dir = os.path.join(root, 'm_cs3a'), data_dir
    a.split, a.max_examples, a.batch_size = split, n, 8
    a.attacks = ('FGSM-Linf-8=fgsm(eps=8/255)', 'PGD-Linf-8=pgd_linf(eps=8/255, steps=2)')
    pipeline.attack(a, os.path.join(root, out))
  c = dp_config.get_config()
  c.main_workdir, c.data_dir = root, data_dir
  c.attacks = ('PGD-Linf-8', 'FGSM-Linf-8')
  c.dip.update(TINY_DIP)
  return c


def test_study_reads_the_layout_like_the_evaluation_and_caches(layout, tmp_path):
  wd = str(tmp_path / 'dp')
  result = study.run_study(layout, wd)
  assert result['attacks'] == ['PGD-Linf-8', 'FGSM-Linf-8'] and result['n_images'] == 3
  assert result['class_set'] == 'cs3a' and result['val_size'] == 3

  # The same call by hand: validation images after the 4 held-out ones, the evaluation's key.
  from unmask_jax import data as data_lib
  from unmask_jax import defenses as defenses_lib
  from unmask_jax.eval import attack_runner
  from unmask_jax.models import functional
  model, spec = ckpt.load_model(os.path.join(layout.main_workdir, 'm_cs3a'))
  val = data_lib.load_from_config(spec['data_config'], 'validation', data_dir=layout.data_dir)
  test = data_lib.load_from_config(spec['data_config'], 'test', data_dir=layout.data_dir)
  adv = {l: attack_runner.load_result(os.path.join(layout.main_workdir, 'attacks_cs3a'), l)['x_adv']
         for l in layout.attacks}
  ctx = defenses_lib.Context(logits_fn=functional.logits_fn(model), num_classes=3)
  want = deep_protection_eval.evaluate_stop_rules(
      ctx, data_pipeline.to_float(val.arrays['image'][4:]), val.arrays['label'][4:],
      data_pipeline.to_float(test.arrays['image'][:6]), test.arrays['label'][:6], adv,
      named_key(jax.random.key(0), 'cs3a', 'dip'), cfg=TINY_DIP)
  for k in ('accuracy', 'per_image', 'val_accuracy', 'fixed_iters', 'detection', 'checkpoints'):
    # Through JSON: NaN (no successful attack to detect) then compares equal to itself.
    assert json.dumps(result[k], sort_keys=True) == json.dumps(want[k], sort_keys=True), k

  md = open(os.path.join(wd, study.REPORT_MD)).read()
  assert md.startswith('## CS3A: Deep Protection') and 'upper bound' in md
  # Cached: the same config and inputs give the stored result back without restoring again.
  again = study.run_study(layout, wd)
  assert again['seconds'] == result['seconds'] and again['per_image'] == result['per_image']
  changed = layout.copy_and_resolve_references()
  changed.dip.max_iters = 5
  fresh = study.run_study(changed, wd)
  assert fresh['checkpoints'] == [5] and fresh['stamp'] != result['stamp']
  missing = layout.copy_and_resolve_references()
  missing.attacks = ('PGD-Linf-16',)
  with pytest.raises(ValueError, match='PGD-Linf-16'):
    study.run_study(missing, wd)


def test_script_help_lists_the_config():
  out = subprocess.run([sys.executable, '-m', 'experiments.deep_protection.study', '--help'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  # absl's --help exits with status 1 (as for every script); what it prints is the check.
  assert '--config.dip.max_iters=250' in out.stdout and '--workdir' in out.stdout, out.stderr[-2000:]
