"""Both cores by default: the scripts' host device count (unmask_jax.cli) and the batch sharding
(unmask_jax.parallel) whose results must not depend on the device count."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from unmask_jax import cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the attack runner's own path (`attack_runner.compiled` wrapped by `parallel.sharded`) in a
# process whose device count XLA_FLAGS fixes, and saves the adversarial images.
_ATTACKS = (
    'pgd_linf(eps=8/255, steps=3)',           # random start: draws with the batch axis leading
    'pgd_l2(eps=0.5, steps=3, restarts=2)',   # Gaussian start, per-example radius, best of restarts
    'square_linf(eps=8/255, queries=8)',      # random windows per example, early exit on the batch
)
_WORKER = '''
import sys
import jax, numpy as np
from flax import nnx
from unmask_jax import attacks, models, parallel
from unmask_jax.eval import attack_runner
from unmask_jax.models import functional
model = models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), widths=(8, 16, 16), feature_dim=32)
model.eval()
logits_fn = functional.logits_fn(model)
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (6, 16, 16, 3)).astype(np.float32)
y = rng.integers(0, 3, 6).astype(np.int32)
out = {'devices': np.int32(jax.device_count())}
for a_i, spec in enumerate(%r):
  fn = parallel.sharded(attack_runner.compiled(attacks.parse_attack(spec)), batch_argnums=(1, 2))
  for n in (6, 5):   # 6: a multiple of 2 devices; 5: padded to 6 and cut back
    out[f'{a_i}_{n}'] = np.asarray(fn(logits_fn, x[:n], y[:n], jax.random.key(a_i)))
np.savez(sys.argv[1], **out)
''' % (_ATTACKS,)


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', cli.HOST_DEVICES_ENV)}
  env.update({'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, 'UNMASK_NO_PROGRESS': '1'}, **extra)
  return env


def test_attacks_identical_on_one_and_two_devices(tmp_path):
  """The same adversarial images with the batch on 1 device and split over 2 (with and without
  padding): sharding is a layout and padding appends rows (see `unmask_jax.parallel`).

  Equal to float32 rounding, not always bitwise: XLA:CPU compiles each device's shape (3 rows
  instead of 6) and may order a sum differently for another shape, as it does on one device for
  another batch size (PGD-L2 on one device, batch 5 vs the first 5 rows of batch 6: 6e-8 apart).
  Here PGD-L∞ and Square come out bitwise equal and PGD-L2 within one float32 ulp (6e-8).
  """
  res = {}
  for n in (1, 2):
    path = str(tmp_path / f'd{n}.npz')
    out = subprocess.run([sys.executable, '-c', _WORKER, path], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=_env(XLA_FLAGS=f'{cli.DEVICE_COUNT_FLAG}={n}'))
    assert out.returncode == 0, out.stderr[-3000:]
    res[n] = dict(np.load(path))
    assert int(res[n].pop('devices')) == n
  assert res[1].keys() == res[2].keys()
  for k in res[1]:
    assert res[1][k].shape == res[2][k].shape, k
    np.testing.assert_allclose(res[2][k], res[1][k], rtol=0, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(res[2]['0_6'], res[1]['0_6'])   # PGD-L∞ (the sign of the gradient)
  for a_i in range(len(_ATTACKS)):   # the padded batch's real rows are those of the unpadded one
    np.testing.assert_allclose(res[2][f'{a_i}_5'], res[2][f'{a_i}_6'][:5], rtol=0, atol=1e-6)


def test_run_sharded_on_one_device_is_a_plain_call():
  import jax
  import jax.numpy as jnp
  from unmask_jax import parallel
  f = jax.jit(lambda w, x: {'y': x * w, 's': jnp.sum(x)})
  x = np.arange(5, dtype=np.float32)
  out = parallel.run_sharded(f, 2.0, x, batch_argnums=(1,), devs=jax.local_devices()[:1])
  np.testing.assert_array_equal(out['y'], 2 * x)
  assert parallel.padded_size(5, 2) == 6 and parallel.padded_size(6, 2) == 6
  np.testing.assert_array_equal(parallel.pad_rows(x, 7), [0, 1, 2, 3, 4, 0, 0])
  with pytest.raises(ValueError, match='one leading'):
    parallel.run_sharded(f, 2.0, (x, x[:3]), batch_argnums=(1,), devs=jax.local_devices() * 2)


def test_host_device_count_rules(monkeypatch):
  monkeypatch.setattr(cli, '_accelerator_plugin_installed', lambda: False)
  count = lambda req=None, cores=2, **env: cli.host_device_count(req, env, cores=cores)
  assert count() == 2                                  # both cores of a 2-core machine
  assert count(cores=1) is None                        # one core: nothing to do
  assert count(cores=6) == 4 and count(cores=64) == 16  # power of two, at most 16
  assert count(JAX_PLATFORMS='cpu') == 2
  assert count(JAX_PLATFORMS='cuda') is None           # an accelerator is asked for
  assert count(JAX_PLATFORMS='cuda,cpu') is None
  assert count(XLA_FLAGS='--xla_force_host_platform_device_count=1') is None   # the user's own
  assert count(XLA_FLAGS='--xla_cpu_use_onednn=true') == 2
  assert count(3) == 3 and count(1) is None            # --host_devices
  assert count(UNMASK_HOST_DEVICES='4') == 4 and count(UNMASK_HOST_DEVICES='1') is None
  assert count(5, UNMASK_HOST_DEVICES='4') == 5        # the flag over the variable
  with pytest.raises(errors.ConfigError, match='whole number'):
    count(UNMASK_HOST_DEVICES='two')
  with pytest.raises(errors.ConfigError, match='twice'):
    count(2, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  monkeypatch.setattr(cli, '_accelerator_plugin_installed', lambda: True)
  assert count() is None and count(JAX_PLATFORMS='cpu') == 2 and count(3) == 3


def test_scripts_start_with_one_host_device_per_core():
  """`cli.run` (every script's entry point) sets the count before jax starts; the flag, the
  environment variable and the user's XLA_FLAGS override it."""
  code = ('import sys; from unmask_jax import cli\n'
          'def main(argv):\n'
          '  import jax; print("devices", jax.device_count())\n'
          'cli.run(main)\n')
  expect = cli.host_device_count(None, {'JAX_PLATFORMS': 'cpu'}) or 1
  for args, env, want in (([], {}, expect), (['--host_devices=3'], {}, 3),
                          ([], {cli.HOST_DEVICES_ENV: '1'}, 1),
                          ([], {'XLA_FLAGS': f'{cli.DEVICE_COUNT_FLAG}=1'}, 1)):
    out = subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=_env(**env))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'devices {want}' in out.stdout, (args, env, out.stdout)
  out = subprocess.run([sys.executable, '-c', code, '--host_devices=2'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=_env(XLA_FLAGS=f'{cli.DEVICE_COUNT_FLAG}=1'))
  assert out.returncode == cli.EXIT_USER_ERROR and 'twice' in out.stderr


def test_help_lists_host_devices():
  out = subprocess.run([sys.executable, 'attack.py', '--help'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=_env())
  assert '--host_devices' in out.stdout and 'UNMASK_HOST_DEVICES' in out.stdout, out.stdout[-2000:]   # absl's --help exits 1
