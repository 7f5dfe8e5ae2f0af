"""Training: resume equivalence, determinism, checkpoint errors, scripts, multi-device."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _cfg(kind, data_dir, **over):
  c = tiny.get_config(kind)
  c.data.data_dir = data_dir
  for k, v in over.items():
    c[k] = v
  return c


def _params(workdir):
  """Every leaf of the newest checkpoint: model parameters, BatchNorm stats and optimizer state."""
  return [np.asarray(x) for x in jax.tree.leaves(ckpt.read_raw(workdir, 'latest'))]


def test_same_seed_twice_gives_identical_metrics(data_dir, tmp_path):
  a = trainer.train_and_evaluate(_cfg('m', data_dir), str(tmp_path / 'a'))
  b = trainer.train_and_evaluate(_cfg('m', data_dir), str(tmp_path / 'b'))
  assert a['test'] == b['test']
  rows = lambda d: [{k: v for k, v in json.loads(l).items() if k != 'elapsed_s'}
                    for l in open(tmp_path / d / 'metrics.jsonl')]
  assert rows('a') == rows('b') and len(rows('a')) == 2


def test_killed_run_resumes_to_the_same_parameters(data_dir, tmp_path):
  full = str(tmp_path / 'full')
  trainer.train_and_evaluate(_cfg('m', data_dir, num_epochs=3), full)
  killed = str(tmp_path / 'killed')
  # 6 train examples/class * 3 classes = 18 -> 1 step per epoch at batch 16; stop inside epoch 3.
  cfg = _cfg('m', data_dir, num_epochs=3, debug_stop_after_steps=3)
  with pytest.raises(trainer.SimulatedKill):
    trainer.train_and_evaluate(cfg, killed)
  assert not os.path.exists(os.path.join(killed, 'final.json'))
  final = trainer.train_and_evaluate(_cfg('m', data_dir, num_epochs=3), killed)  # same command again
  for x, y in zip(_params(full), _params(killed)):
    np.testing.assert_array_equal(x, y)
  assert final['test'] == ckpt.read_json(os.path.join(full, 'final.json'))['test']
  epochs = [json.loads(l)['epoch'] for l in open(os.path.join(killed, 'metrics.jsonl'))]
  assert epochs == [1, 2, 3]


def test_checkpoint_of_another_model_is_a_clear_error(data_dir, tmp_path):
  wd = str(tmp_path / 'm')
  trainer.train_and_evaluate(_cfg('m', data_dir, num_epochs=1), wd)
  other = _cfg('m', data_dir, num_epochs=1)
  other.model.kwargs = {'widths': (4, 8, 16), 'feature_dim': 16}
  with pytest.raises(ckpt.CheckpointError, match='model_kwargs'):
    trainer.train_and_evaluate(other, wd)
  cs = _cfg('m', data_dir, num_epochs=1)
  cs.data.class_set = 'cs3b'
  with pytest.raises(ckpt.CheckpointError, match='class_names'):
    trainer.train_and_evaluate(cs, wd)


def test_corrupted_checkpoint_is_a_clear_error_not_a_fresh_start(data_dir, tmp_path):
  wd = str(tmp_path / 'm')
  trainer.train_and_evaluate(_cfg('m', data_dir, num_epochs=1), wd)
  latest = os.path.join(wd, 'ckpt', 'latest')
  step_dir = os.path.join(latest, os.listdir(latest)[0], 'state')
  for root, _, files in os.walk(step_dir):
    for f in files:
      if f not in ('_METADATA', '_CHECKPOINT_METADATA'):
        with open(os.path.join(root, f), 'wb') as fh:
          fh.write(b'garbage')
  with pytest.raises(ckpt.CheckpointError, match='cannot be read'):
    trainer.train_and_evaluate(_cfg('m', data_dir, num_epochs=1), wd)  # same config: resumes -> restores


def test_missing_model_is_a_clear_error(tmp_path):
  with pytest.raises(ckpt.CheckpointError, match='train it first'):
    ckpt.load_model(str(tmp_path / 'nothing'))


def test_segmenter_training_chooses_extraction_thresholds(data_dir, tmp_path):
  wd = str(tmp_path / 'k')
  final = trainer.train_and_evaluate(_cfg('k', data_dir, num_epochs=1), wd)
  ex = ckpt.read_json(os.path.join(wd, 'extraction.json'))
  assert set(ex) >= {'min_area', 'min_conf', 'f1'}
  assert 0 <= final['test']['presence']['f1'] <= 1 and 'per_part_iou' in final['test']
  model, spec = ckpt.load_model(wd)
  assert spec['task'] == 'segmenter' and spec['num_classes'] == 46


def test_scripts_run_one_step_and_reject_the_wrong_task(data_dir, tmp_path):
  env = {**os.environ, 'UNMASK_NO_PROGRESS': '1', 'JAX_PLATFORMS': 'cpu'}
  base = ['--config.data.data_dir=' + data_dir, '--config.num_epochs=1']
  out = subprocess.run([sys.executable, 'train_m.py', '--config=configs/tiny.py:m', f'--workdir={tmp_path}/m'] + base,
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'M test: accuracy' in out.stdout
  out = subprocess.run([sys.executable, 'train_k.py', '--config=configs/tiny.py:k', f'--workdir={tmp_path}/k'] + base,
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'K test: mean IoU' in out.stdout
  out = subprocess.run([sys.executable, 'train_k.py', '--config=configs/tiny.py:m', f'--workdir={tmp_path}/x'] + base,
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and 'task' in out.stderr


def test_one_vs_four_host_devices_same_loss(data_dir, tmp_path):
  code = (
      'import sys, json; sys.path.insert(0, %r)\n'
      'import jax; from configs import tiny; from unmask_jax.train import trainer\n'
      'c = tiny.get_config("m"); c.data.data_dir = %r; c.num_epochs = 1\n'
      'f = trainer.train_and_evaluate(c, sys.argv[1])\n'
      'print(json.dumps({"n": jax.device_count(), "loss": f["test"]["loss"]}))\n') % (ROOT, data_dir)
  res = {}
  for n in (1, 4):
    env = {**os.environ, 'UNMASK_NO_PROGRESS': '1', 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path / f'd{n}')], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r['n'] == n
    res[n] = r['loss']
  assert res[1] == pytest.approx(res[4], rel=1e-4, abs=1e-5)


def test_adversarial_training_line_search_uses_validation_only(data_dir, tmp_path):
  from unmask_jax import pipeline
  c = _cfg('m', data_dir, num_epochs=1)
  out = pipeline.at_line_search(c, str(tmp_path), [2, 8], attack_steps=2)
  assert [r['eps'] for r in out['rows']] == ['2/255', '8/255']
  assert out['chosen']['model_dir'] in {r['model_dir'] for r in out['rows']}
  for r in out['rows']:
    spec = ckpt.read_json(os.path.join(r['model_dir'], 'model.json'))
    assert spec['adv_training'] is True
    idx = ckpt.read_json(os.path.join(r['model_dir'], 'validation_attacks', 'attacks.json'))
    assert idx['split'] == 'validation'
  with pytest.raises(ValueError, match='1/255 units'):
    pipeline.at_line_search(c, str(tmp_path), [0.03])


def test_init_from_starts_from_the_given_weights_and_checks_the_model(data_dir, tmp_path):
  """--config.init_from (fine-tuning, e.g. from converted torchvision weights): the new run starts
  at the other workdir's weights, not at its seeded initialization; another architecture is a
  one-line ConfigError."""
  from flax import nnx
  from unmask_jax import errors, models
  src = str(tmp_path / 'src')
  trainer.train_and_evaluate(_cfg('m', data_dir, seed=3), src)
  src_model, spec = ckpt.load_model(src)
  fresh = models.create(spec['model'], num_classes=spec['num_classes'], in_channels=spec['in_channels'],
                        rngs=nnx.Rngs(0), **spec['model_kwargs'])
  trainer._init_from(fresh, spec, src)
  for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(nnx.state(src_model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A whole run: a different result than from scratch, and keyed by init_from.
  tuned = trainer.train_and_evaluate(_cfg('m', data_dir, init_from=src), str(tmp_path / 'tuned'))
  scratch = trainer.train_and_evaluate(_cfg('m', data_dir), str(tmp_path / 'scratch'))
  assert any(not np.array_equal(x, y) for x, y in zip(_params(str(tmp_path / 'tuned')),
                                                      _params(str(tmp_path / 'scratch'))))
  assert ckpt.read_json(os.path.join(str(tmp_path / 'tuned'), 'config.json'))['init_from'] == src
  assert tuned['test'] is not None and scratch['test'] is not None
  other = dict(spec, model_kwargs={**spec['model_kwargs'], 'feature_dim': 7})
  with pytest.raises(errors.ConfigError, match='another model'):
    trainer._init_from(fresh, other, src)
