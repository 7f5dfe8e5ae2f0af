"""The time-to-first-result benchmark (benchmarks/bench_compile.py) runs end to end at smoke sizes
and writes the table it promises; its loop-form recorder reports what the library compiles.

No timing is asserted: timings on a shared CI machine mean nothing at toy sizes.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_compile
from unmask_jax.attacks import common, deepfool, pgd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip('|').split('|')]


def test_smoke_writes_every_row_and_column(tmp_path):
  out, raw = tmp_path / 'compile.md', tmp_path / 'compile.json'
  # Step 2 is called (first result, steady state, PyTorch), step 3 compiled only.
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.bench_compile', '--smoke', '--attacks', 'fgsm',
       'pgd_linf', 'deepfool', '--steps', '2', '3', '--call-max-steps', '2', '--out', str(out),
       '--json', str(raw)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  text = out.read_text()
  for header in ('Command:', 'Machine:', 'Versions:', 'load average', 'foolbox', 'Versions: jax',
                 'compilation cache off', 'Goal (every attack compiles in at most 30 s'):
    assert header in text, header
  lines = text.splitlines()
  head = lines.index('| ' + ' | '.join(bench_compile.COLUMNS) + ' |')
  body = []
  for line in lines[head + 2:]:
    if not line.startswith('| '):
      break
    body.append(_cells(line))
  assert all(len(r) == len(bench_compile.COLUMNS) for r in body), body
  assert [(r[0], r[1]) for r in body] == [('fgsm', '-'), ('pgd_linf', '2'), ('pgd_linf', '3'),
                                          ('deepfool', '2'), ('deepfool', '3')], body
  col = {name: i for i, name in enumerate(bench_compile.COLUMNS)}
  rows = {(r[0], r[1]): r for r in body}
  assert rows[('fgsm', '-')][col['loop form']] == 'single step'
  assert rows[('pgd_linf', '2')][col['loop form']] == 'unrolled 2'
  for key, r in rows.items():
    compile_s = float(r[col['compile s']])
    assert compile_s > 0
    assert r[col['compile goal (<= 30 s)']] == 'met'
    if key[1] == '3':  # compiled only
      assert r[col['first result s']] == r[col['steady s']] == 'compile only', r
      continue
    assert float(r[col['first result s']]) >= compile_s
    assert float(r[col['steady s']]) > 0
    if _has_torch():  # every smoke attack has a PyTorch reference (fgsm: one PGD step)
      assert 'thread' in r[col['PyTorch steady s']], r
      assert r[col['ratio steady (PyTorch / ours)']].endswith('x'), r
    else:
      assert r[col['PyTorch steady s']] == 'torch not installed', r
  data = json.loads(raw.read_text())
  assert data['meta']['steps'] == [2, 3]
  assert [(r['attack'], r['steps'], r['called']) for r in data['rows']] == [
      ('fgsm', None, True), ('pgd_linf', 2, True), ('pgd_linf', 3, False),
      ('deepfool', 2, True), ('deepfool', 3, False)]
  for r in data['rows']:
    assert r['compile_s'] >= r['xla_compile_s'] > 0
    assert r['goal_miss'] is False
    assert r['loop_form'] in ('single step', f'unrolled {r["steps"]}'), r  # 2-3 steps: unrolled


def _logits_fn():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((8 * 8 * 3, 3)), jnp.float32)
  return jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)


def _forms(fn, **kw) -> str:
  x = jnp.full((2, 8, 8, 3), 0.5, jnp.float32)
  y = jnp.zeros((2,), jnp.int32)
  import functools  # pylint: disable=import-outside-toplevel
  with bench_compile.record_loop_forms() as events:
    jax.eval_shape(functools.partial(fn, **kw), _logits_fn(), x, y, jax.random.key(0))
  return bench_compile.summarize_loops(events)


def test_loop_form_recorder_reports_the_library_choice():
  originals = (common.iterate, common.iterate_until, common.over_runs, common.loop_until)
  n = common.MAX_UNROLL
  assert _forms(pgd.pgd_linf, eps=8 / 255, steps=3) == 'unrolled 3'
  assert _forms(pgd.pgd_linf, eps=8 / 255, steps=n + 1) == f'scan {n + 1}'
  assert _forms(pgd.pgd_linf, eps=8 / 255, steps=2, restarts=2) == 'unrolled 2 x2'
  assert _forms(deepfool.deepfool, steps=common.EXIT_PREFIX + 5) == (
      f'exit {common.EXIT_PREFIX + 5} ({common.EXIT_PREFIX} unrolled + while)')
  # The library's functions are restored afterwards.
  assert (common.iterate, common.iterate_until, common.over_runs, common.loop_until) == originals


def test_summarize_loops():
  assert bench_compile.summarize_loops([]) == 'single step'
  assert bench_compile.summarize_loops(['2 runs unrolled', 'unrolled 20', 'unrolled 20']) == (
      '2 runs unrolled; unrolled 20 x2')
