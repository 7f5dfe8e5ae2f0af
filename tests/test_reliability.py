"""Bad input and faults (issue 12): one-line errors, verified outputs, config-keyed caches.

Every script case runs the real script in a subprocess and asserts exit status 2 and a single
`error: ...` line (no traceback). One tiny M is trained once for the module and copied where a
case damages it.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from unmask_jax import cli, errors, pipeline
from unmask_jax.eval import attack_runner
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'UNMASK_NO_PROGRESS': '1', 'JAX_PLATFORMS': 'cpu'}
ATTACKS = '--config.attacks=("F=fgsm(eps=8/255)",)'


def _cfg(data_dir, **over):
  c = tiny.get_config('m')
  c.data.data_dir = data_dir
  for k, v in over.items():
    c[k] = v
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(root, data_dir, model_dir, attacks_dir): a tiny M trained and attacked once."""
  root = tmp_path_factory.mktemp('rel')
  data_dir, model_dir = str(root / 'data'), str(root / 'm')
  trainer.train_and_evaluate(_cfg(data_dir), model_dir)
  attacks_dir = str(root / 'attacks')
  a = attack_runner_config(model_dir, data_dir)
  attack_runner.run_attacks(a, attacks_dir)
  return root, data_dir, model_dir, attacks_dir


def attack_runner_config(model_dir, data_dir, **over):
  from configs import attack
  c = attack.get_config()
  c.model_dir, c.data_dir, c.max_examples, c.batch_size = model_dir, data_dir, 8, 8
  c.attacks = ('F=fgsm(eps=8/255)',)
  c.update(over)
  return c


def _run(script, *args):
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)


def _assert_one_line_error(out, *needles):
  """Exit status 2, no traceback, and exactly one `error:` line (the last) holding every needle."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  errs = [l for l in lines if l.startswith('error: ')]
  assert len(errs) == 1 and lines[-1] == errs[0], out.stderr[-3000:]
  for n in needles:
    assert n in errs[0], errs[0]
  return errs[0]


def _train_args(data_dir, workdir, *extra):
  return ('--config=configs/tiny.py:m', f'--config.data.data_dir={data_dir}', f'--workdir={workdir}', *extra)


def _attack_args(model_dir, data_dir, workdir, *extra):
  return (f'--config.model_dir={model_dir}', f'--config.data_dir={data_dir}', f'--workdir={workdir}',
          '--config.max_examples=8', '--config.batch_size=8', ATTACKS, *extra)


# ----------------------------------------------------------------------------- bad config

def test_unknown_config_field_names_the_field_and_the_valid_ones(tmp_path):
  out = _run('train_m.py', *_train_args(tmp_path / 'd', tmp_path / 'w', '--config.optimizer.nam=adam'))
  _assert_one_line_error(out, "unknown config field 'nam'", "did you mean 'name'")
  # attack.py has a default config file: the override is applied at import, caught there too.
  out = _run('attack.py', f'--workdir={tmp_path}/a', '--config.sed=1')
  _assert_one_line_error(out, "unknown config field 'sed'", "'seed'")
  assert not os.path.exists(tmp_path / 'w') and not os.path.exists(tmp_path / 'a')


def test_bad_values_fail_before_anything_is_written(tmp_path):
  out = _run('train_m.py', *_train_args(tmp_path / 'd', tmp_path / 'w', '--config.num_epochs=-1'))
  _assert_one_line_error(out, '--config.num_epochs must be an integer >= 1, got -1')
  out = _run('train_m.py', *_train_args(tmp_path / 'd', tmp_path / 'w', '--config.data.class_set=cs9'))
  _assert_one_line_error(out, "class_set is 'cs9'", "'cs3a'")
  out = _run('main.py', '--config=configs/quick.py', '--config.at.adv_training.eps=4', f'--workdir={tmp_path}/main')
  _assert_one_line_error(out, '--config.at.adv_training.eps', '4/255')
  for p in ('w', 'main'):
    assert not os.path.exists(tmp_path / p)


def test_failed_run_leaves_no_empty_workdir_and_no_model_json(trained, tmp_path):
  _, data_dir, _, _ = trained
  # Passes the config checks, fails on the data (36 training images < batch 64) before training.
  out = _run('train_m.py', *_train_args(data_dir, tmp_path / 'w', '--config.batch_size=64'))
  _assert_one_line_error(out, 'smaller than batch_size 64')
  assert not os.path.exists(tmp_path / 'w')


def test_workdir_that_is_a_file_or_not_writable(trained, tmp_path):
  _, data_dir, model_dir, _ = trained
  (tmp_path / 'f').write_text('x')
  out = _run('train_m.py', *_train_args(data_dir, tmp_path / 'f'))
  _assert_one_line_error(out, f'--workdir={tmp_path}/f is a file')
  if os.geteuid() == 0:   # root writes through permission bits; /proc refuses everyone
    target = '/proc/unmask_reliability_test/a'
  else:
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o555)
    target = str(ro / 'a')
  out = _run('attack.py', *_attack_args(model_dir, data_dir, target))
  _assert_one_line_error(out, 'is not writable')


# ----------------------------------------------------------------------------- missing / damaged inputs

def test_missing_or_empty_model_dir(trained, tmp_path):
  _, data_dir, _, _ = trained
  out = _run('attack.py', *_attack_args(tmp_path / 'nothing', data_dir, tmp_path / 'a'))
  _assert_one_line_error(out, 'No trained model in', 'train it first')
  (tmp_path / 'empty').mkdir()
  out = _run('attack.py', *_attack_args(tmp_path / 'empty', data_dir, tmp_path / 'a'))
  _assert_one_line_error(out, 'model.json missing')
  out = _run('attack.py', *_attack_args('', data_dir, tmp_path / 'a'))
  _assert_one_line_error(out, '--config.model_dir is empty')
  assert not os.path.exists(tmp_path / 'a')
  out = _run('evaluate.py', f'--workdir={tmp_path}/e', f'--config.k_dir={tmp_path}/nok')
  _assert_one_line_error(out, '--config.k_dir', 'train_k.py')
  assert not os.path.exists(tmp_path / 'e')


def test_truncated_model_json_names_the_file(trained, tmp_path):
  _, data_dir, model_dir, _ = trained
  bad = tmp_path / 'm'
  shutil.copytree(model_dir, bad)
  text = (bad / 'model.json').read_text()
  (bad / 'model.json').write_text(text[:len(text) // 2])
  out = _run('attack.py', *_attack_args(bad, data_dir, tmp_path / 'a'))
  _assert_one_line_error(out, f'{bad}/model.json is damaged')


def test_workdir_holding_another_model(trained, tmp_path):
  _, data_dir, model_dir, _ = trained
  wd = tmp_path / 'm'
  shutil.copytree(model_dir, wd)
  out = _run('train_m.py', *_train_args(data_dir, wd, '--config.model.kwargs.feature_dim=8'))
  _assert_one_line_error(out, 'another model', 'model_kwargs.feature_dim: stored 16, now 8', '--overwrite')


def _array_files(model_dir, which='best'):
  root = os.path.join(model_dir, 'ckpt', which)
  return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
          if os.sep + 'd' == d[-2:] or f'{os.sep}d{os.sep}' in os.path.join(d, f)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax read noise
def test_garbled_checkpoint_bytes_are_never_loaded_silently(trained, tmp_path):
  """Flips bytes across every array data file of the checkpoint: each load either fails with a
  CheckpointError or returns exactly the saved arrays (the byte belonged to no array)."""
  import jax
  from flax import nnx
  _, data_dir, model_dir, _ = trained
  wd = str(tmp_path / 'm')
  shutil.copytree(model_dir, wd)
  want = [np.asarray(x) for x in jax.tree.leaves(nnx.state(ckpt.load_model(wd)[0]))]
  files = _array_files(wd)
  assert files
  hash_error_at = None
  for path in files:
    orig = open(path, 'rb').read()
    for pos in sorted({0, len(orig) // 4, len(orig) // 2, 3 * len(orig) // 4, len(orig) - 1}):
      garbled = bytearray(orig)
      garbled[pos] ^= 0xFF
      open(path, 'wb').write(bytes(garbled))
      try:
        got = [np.asarray(x) for x in jax.tree.leaves(nnx.state(ckpt.load_model(wd)[0]))]
      except ckpt.CheckpointError as e:
        if 'sha256' in str(e) and hash_error_at is None:
          hash_error_at = (path, pos)
      else:
        for a, b in zip(want, got):
          np.testing.assert_array_equal(a, b)
      open(path, 'wb').write(orig)
  # At least one flip changed an array's values without breaking the file format: only the
  # recorded sha256 catches that one. The script reports it in one line.
  assert hash_error_at is not None
  path, pos = hash_error_at
  garbled = bytearray(open(path, 'rb').read())
  garbled[pos] ^= 0xFF
  open(path, 'wb').write(bytes(garbled))
  out = _run('attack.py', *_attack_args(wd, data_dir, tmp_path / 'a'))
  _assert_one_line_error(out, 'is corrupted: array', 'sha256')
  assert not os.path.exists(tmp_path / 'a')


def test_npz_results_are_verified_at_load(trained, tmp_path):
  _, _, _, attacks_dir = trained
  arrays = attack_runner.load_result(attacks_dir, 'F')
  assert set(arrays) >= {'x_adv', 'label', 'adv_pred', 'success'}
  path = str(tmp_path / 'r.npz')
  ckpt.save_npz_verified(path, arrays)
  for k, v in ckpt.load_npz_verified(path).items():
    np.testing.assert_array_equal(v, arrays[k])
  orig = open(path, 'rb').read()
  for pos in np.linspace(0, len(orig) - 1, 40).astype(int):
    garbled = bytearray(orig)
    garbled[pos] ^= 0xFF
    open(path, 'wb').write(bytes(garbled))
    try:
      got = ckpt.load_npz_verified(path)
    except ckpt.CheckpointError as e:
      assert path in str(e)
    else:   # a byte outside every array (zip metadata numpy ignores): the content is intact
      for k, v in got.items():
        np.testing.assert_array_equal(v, arrays[k])
  open(path, 'wb').write(orig)
  os.remove(path + ckpt.SIDECAR)
  with pytest.raises(ckpt.CheckpointError, match='no checksum file'):
    ckpt.load_npz_verified(path)


# ----------------------------------------------------------------------------- caches keyed by config

def test_finished_training_rerun_with_another_config_is_an_error(trained, tmp_path):
  _, data_dir, model_dir, _ = trained
  wd = tmp_path / 'm'
  shutil.copytree(model_dir, wd)
  out = _run('train_m.py', *_train_args(data_dir, wd, '--config.seed=1', '--config.num_epochs=3'))
  _assert_one_line_error(out, 'another config', 'num_epochs: stored 2, now 3', 'seed: stored 0, now 1',
                         '--overwrite')
  metrics = open(wd / 'metrics.jsonl').read()
  # The same config returns the cached result and leaves the log untouched.
  final = trainer.train_and_evaluate(_cfg(data_dir), str(wd))
  assert final == ckpt.read_json(os.path.join(model_dir, 'final.json'))
  assert open(wd / 'metrics.jsonl').read() == metrics
  # --overwrite starts fresh: same parameters as a new run with that config.
  final = trainer.train_and_evaluate(_cfg(data_dir, seed=1, num_epochs=3), str(wd), overwrite=True)
  assert final['epochs'] == 3 and len(open(wd / 'metrics.jsonl').readlines()) == 3
  assert ckpt.read_json(str(wd / 'config.json'))['seed'] == 1


def test_attack_rerun_with_another_seed_is_an_error_and_overwrite_redoes_it(trained, tmp_path):
  _, data_dir, model_dir, attacks_dir = trained
  wd = tmp_path / 'a'
  shutil.copytree(attacks_dir, wd)
  out = _run('attack.py', *_attack_args(model_dir, data_dir, wd, '--config.seed=1'))
  _assert_one_line_error(out, 'F (seed: stored 0, now 1)', '--overwrite')
  out = _run('attack.py', *_attack_args(model_dir, data_dir, wd))
  assert out.returncode == 0 and 'already done with the same parameters' in out.stdout, out.stderr[-2000:]
  before = ckpt.read_json(str(wd / 'attacks.json'))['attacks']['F']
  rows = attack_runner.run_attacks(attack_runner_config(model_dir, data_dir, seed=1), str(wd), overwrite=True)
  assert rows[0]['cache_key']['seed'] == 1 and before['cache_key']['seed'] == 0
  # A damaged stored result is an error on the rerun, never reused.
  npz = str(wd / 'F.npz')
  garbled = bytearray(open(npz, 'rb').read())
  garbled[len(garbled) // 2] ^= 0xFF
  open(npz, 'wb').write(bytes(garbled))
  with pytest.raises(ckpt.CheckpointError, match='F.npz'):
    attack_runner.run_attacks(attack_runner_config(model_dir, data_dir, seed=1), str(wd))


# ----------------------------------------------------------------------------- the wrapper itself

def test_unexpected_errors_keep_their_traceback():
  def bug(argv):
    raise RuntimeError('a bug')
  with pytest.raises(RuntimeError):
    cli.guarded(bug)(['x'])

  def user(argv):
    raise errors.ConfigError('bad\nvalue')
  with pytest.raises(SystemExit) as e:
    cli.guarded(user)(['x'])
  assert e.value.code == cli.EXIT_USER_ERROR
  assert cli.user_message(KeyError("Unknown attack 'pgdd'. Did you mean 'pgd'?")).startswith('Unknown attack')
  assert cli.user_message(KeyError('x')) is None
  assert cli.one_line('a\n  b\n') == 'a b'


def test_config_checks_accept_every_shipped_config():
  from configs import evaluate, main, quick
  pipeline.validate_main_config(main.get_config())
  pipeline.validate_main_config(quick.get_config())
  e = evaluate.get_config()
  e.extra_study = {'enabled': True, 'anything': 1}   # extra sub-configs are the evaluation's own
  pipeline.validate_evaluate_config(e, need_inputs=False)
  # The adaptive block is checked like the rest.
  e.adaptive.targets = 'some'
  with pytest.raises(errors.ConfigError, match='adaptive.targets'):
    pipeline.validate_evaluate_config(e, need_inputs=False)
