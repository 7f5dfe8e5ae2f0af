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
import pytest

from benchmarks import bench_compile
from unmask_jax.attacks import common, deepfool, pgd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def _has_foolbox() -> bool:
  try:
    import foolbox  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return _has_torch()
  except ImportError:
    return False


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip('|').split('|')]


SMOKE_ROWS = [('fgsm', '-'), ('pgd_linf', '2'), ('pgd_linf', '3'), ('deepfool', '2'),
              ('deepfool', '3'), ('cw_l2_abort', '2 per round'), ('cw_l2_abort', '3 per round')]


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """One smoke run for the tests below: (markdown text, table rows by (attack, steps), raw JSON)."""
  tmp = tmp_path_factory.mktemp('bench_compile')
  out, raw = tmp / 'compile.md', tmp / 'compile.json'
  # Step 2 is called (first result, steady state, PyTorch, foolbox), step 3 compiled only.
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.bench_compile', '--smoke', '--attacks', 'fgsm',
       'pgd_linf', 'deepfool', 'cw_l2_abort', '--steps', '2', '3', '--call-max-steps', '2',
       '--out', str(out), '--json', str(raw)], cwd=ROOT, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  text = out.read_text()
  lines = text.splitlines()
  head = lines.index('| ' + ' | '.join(bench_compile.COLUMNS) + ' |')
  body = []
  for line in lines[head + 2:]:
    if not line.startswith('| '):
      break
    body.append(_cells(line))
  assert all(len(r) == len(bench_compile.COLUMNS) for r in body), body
  assert [(r[0], r[1]) for r in body] == SMOKE_ROWS, body
  return text, {(r[0], r[1]): r for r in body}, json.loads(raw.read_text())


COL = {name: i for i, name in enumerate(bench_compile.COLUMNS)}


def test_smoke_writes_every_row_and_column(smoke):
  text, rows, data = smoke
  for header in ('Command:', 'Machine:', 'Versions:', 'load average', 'foolbox', 'Versions: jax',
                 'compilation cache off', 'Goal (every attack compiles in at most 30 s',
                 'Goal (issue #15): DeepFool and CW-L2 at >= 1x foolbox'):
    assert header in text, header
  assert rows[('fgsm', '-')][COL['loop form']] == 'single step'
  assert rows[('pgd_linf', '2')][COL['loop form']] == 'unrolled 2'
  # DeepFool and CW (and APGD) run their loops from the host: one check per step at 2-3 steps.
  assert rows[('cw_l2_abort', '2 per round')][COL['loop form']] == 'host 2 in chunks of 1 with exit x2'
  assert rows[('deepfool', '2')][COL['loop form']] == 'host 2 in chunks of 1 with exit'
  for key, r in rows.items():
    compile_s = float(r[COL['compile s']])
    assert compile_s > 0
    assert r[COL['compile goal (<= 30 s)']] == 'met'
    if key[1].startswith('3'):  # compiled only
      assert r[COL['first result s']] == r[COL['steady s']] == 'compile only', r
      continue
    assert float(r[COL['first result s']]) >= compile_s
    assert float(r[COL['steady s']]) > 0
    # Success rates of ours / PyTorch / foolbox: numbers, '-' where a contender is missing.
    success = r[COL['success ours / PyTorch / foolbox']].split(' / ')
    assert len(success) == 3 and 0 <= float(success[0].rstrip('%')) <= 100, r
    if key[0] == 'cw_l2_abort':  # no PyTorch reference aborts early
      assert r[COL['PyTorch steady s']] == 'none in benchmarks/torch_attacks.py', r
    elif _has_torch():  # every other smoke attack has one (fgsm: one PGD step)
      assert 'thread' in r[COL['PyTorch steady s']], r
      assert r[COL['ratio steady (PyTorch / ours)']].endswith('x'), r
      assert 0 <= float(success[1].rstrip('%')) <= 100, r
    else:
      assert r[COL['PyTorch steady s']] == 'torch not installed', r
    if not _has_foolbox():
      assert r[COL['foolbox steady s']] in ('foolbox not installed', 'torch not installed'), r
      assert success[2] == '-', r
  assert data['meta']['steps'] == [2, 3]
  assert [(r['attack'], r['steps'], r['called']) for r in data['rows']] == [
      ('fgsm', None, True), ('pgd_linf', 2, True), ('pgd_linf', 3, False),
      ('deepfool', 2, True), ('deepfool', 3, False), ('cw_l2_abort', 2, True),
      ('cw_l2_abort', 3, False)]
  for r in data['rows']:
    assert r['compile_s'] >= r['xla_compile_s'] > 0
    assert r['goal_miss'] is False
    if r['attack'] == 'cw_l2_abort':
      assert 'abort_early=True' in r['spec'], r['spec']
      assert r['loop_form'] == f'host {r["steps"]} in chunks of 1 with exit x2', r
      assert r['host_driven'] and r['cold_call_s'] >= r['compile_s'], r
    elif r['attack'] == 'deepfool':
      assert r['loop_form'] == f'host {r["steps"]} in chunks of 1 with exit', r
    else:
      assert r['loop_form'] in ('single step', f'unrolled {r["steps"]}'), r  # 2-3 steps: unrolled


def test_smoke_foolbox_columns(smoke):
  """With foolbox installed (CI does not install it): every called row has foolbox's timings,
  ratios and success rate, and its eps-bounded outputs stay inside eps."""
  pytest.importorskip('torch')
  pytest.importorskip('foolbox')
  text, rows, data = smoke
  assert 'foolbox 3.' in text and 'L2CarliniWagnerAttack' in text
  for key, r in rows.items():
    if key[1].startswith('3'):  # compiled only
      assert r[COL['foolbox steady s']] == r[COL['ratio steady (foolbox / ours)']] == '-', r
      continue
    for col in ('foolbox first s', 'foolbox steady s'):
      assert 'thread' in r[COL[col]], r
      float(r[COL[col]].split(' (')[0])
    for col in ('ratio steady (foolbox / ours)', 'ratio first result (foolbox / ours)'):
      assert r[COL[col]].endswith('x'), r
      assert float(r[COL[col]][:-1]) > 0, r
    success = r[COL['success ours / PyTorch / foolbox']]
    assert 'exceeds eps' not in success, r
    assert 0 <= float(success.split(' / ')[2].rstrip('%')) <= 100, r
  called = [r for r in data['rows'] if r['called']]
  for r in called:
    assert r['foolbox_reference'] == 'foolbox'
    assert isinstance(r['success_foolbox'], float) and 0 <= r['success_foolbox'] <= 1, r
    assert isinstance(r['success_ours'], float)
    assert r['foolbox']['steady'] > 0 and r['foolbox']['first_call'] > 0
    assert r['foolbox_threads'] >= 1
    if r['eps'] is not None:
      assert r['foolbox_eps_exceeded'] is False, r
      assert r['foolbox_max_perturbation'] <= r['eps'] * (1 + 1e-5) + 1e-6, r
  # The goal against foolbox is stated per attack and step count, with numbers.
  goal = [l for l in text.splitlines() if l.startswith('- DeepFool, 2 steps: foolbox')
          or l.startswith('- CW-L2 with early abort')]
  assert len(goal) == 2, text
  assert all('x**' in l and ('-> met' in l or '**not met**' in l) for l in goal), goal


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
