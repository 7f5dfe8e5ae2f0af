"""The scripts keep compiled programs between runs (`cli.use_compilation_cache`): where the cache
goes, how it is turned off, and that a second run loads its programs instead of compiling them,
with the same results."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unmask_jax import cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_directory_default_flag_variable_and_off():
  where = cli.compilation_cache_dir
  assert where(None, {'HOME': '/h'}) == os.path.join(os.path.expanduser('~'), '.cache', 'unmask_jax',
                                                     'xla')
  assert where(None, {'XDG_CACHE_HOME': '/xdg'}) == '/xdg/unmask_jax/xla'
  assert where('/mine', {'XDG_CACHE_HOME': '/xdg'}) == '/mine'                 # the flag
  assert where(None, {cli.COMPILATION_CACHE_ENV: '/env'}) == '/env'            # the variable
  assert where('/flag', {cli.COMPILATION_CACHE_ENV: '/env'}) == '/flag'        # flag first
  for off in ('off', 'OFF', 'none', '0', 'false', ''):
    assert where(off, {}) is None and where(None, {cli.COMPILATION_CACHE_ENV: off}) is None
  # The user's own JAX setting is left alone; giving both is an error.
  assert where(None, {'JAX_COMPILATION_CACHE_DIR': '/jax'}) is None
  with pytest.raises(errors.ConfigError, match='twice'):
    where('/flag', {'JAX_COMPILATION_CACHE_DIR': '/jax'})


# A script (through cli.run) that compiles one program; it lowers the size threshold so that a
# program this small is cached (the scripts keep cli.MIN_CACHED_COMPILE_S), and prints what JAX
# reports about the cache.
_SCRIPT = '''
import collections, sys
from unmask_jax import cli
events = collections.Counter()
def main(argv):
  import jax, jax.numpy as jnp
  jax.monitoring.register_event_listener(lambda e, **_: events.update([e]))
  print('dir', jax.config.jax_compilation_cache_dir,
        'min', jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.5)
  print('value', float(f(jnp.arange(12.0).reshape(3, 4) / 7).sum()))
  print('hits', events['/jax/compilation_cache/cache_hits'],
        'misses', events['/jax/compilation_cache/cache_misses'])
cli.run(main)
'''


def _run(*args, **env):
  full = {k: v for k, v in os.environ.items()
          if k not in (cli.COMPILATION_CACHE_ENV, 'JAX_COMPILATION_CACHE_DIR')}
  full.update({'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}, **env)
  out = subprocess.run([sys.executable, '-c', _SCRIPT, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=full)
  assert out.returncode == 0, out.stderr[-2000:]
  return dict(zip(out.stdout.split()[::2], out.stdout.split()[1::2]))


def test_second_run_loads_its_programs_from_the_cache(tmp_path):
  cache = tmp_path / 'xla'
  first = _run(f'--compilation_cache={cache}')
  assert first['dir'] == str(cache) and float(first['min']) == cli.MIN_CACHED_COMPILE_S
  assert int(first['misses']) >= 1 and int(first['hits']) == 0
  assert any(cache.iterdir())
  second = _run(f'--compilation_cache={cache}')
  assert int(second['hits']) >= 1 and int(second['misses']) == 0
  assert second['value'] == first['value']
  # The default: under XDG_CACHE_HOME; off: nothing set, nothing written.
  assert _run(XDG_CACHE_HOME=str(tmp_path / 'xdg'))['dir'] == str(tmp_path / 'xdg' / 'unmask_jax'
                                                                  / 'xla')
  off = _run(**{cli.COMPILATION_CACHE_ENV: 'off', 'XDG_CACHE_HOME': str(tmp_path / 'none')})
  assert off['dir'] == 'None' and not (tmp_path / 'none').exists()


def test_help_lists_the_compilation_cache():
  out = subprocess.run([sys.executable, 'attack.py', '--help'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert '--compilation_cache' in out.stdout and cli.COMPILATION_CACHE_ENV in out.stdout, \
      out.stdout[-2000:]
