"""Early exit of DeepFool and CW-L2: compile and run time before / after, on the SynthParts CNN.

"Before" is the library at a given commit (default: the one before the early exit), loaded in the
same process from `git show <rev>:unmask_jax/attacks/{common,cw,deepfool}.py`, so that both
versions run interleaved on the same model, images and labels (victims.cnn_small, 128 SynthParts
images, labels = the model's predictions). "After" is the working tree. Per case:

  compile  wall seconds of `jax.jit(attack).lower(...).compile()`, once per contender, serially
  run      median wall (and process CPU) seconds over `--repeats` interleaved rounds of the
           compiled attack, each call synchronised (rounds rotate the contenders' order)
  result   success rate, median L2 of the successes, max |x_adv - x_adv(before)|

Cases: DeepFool-50 (before: 50 steps unrolled; after: early exit), CW-L2 5 x 100 and the default
9 x 100 (before: one rolled scan; after: rounds of steps, with and without abort_early), and the
PyTorch eager references of benchmarks/torch_attacks.py on the same weights (DeepFool with its
early exit; CW without abort; on all cores and on 1 thread) when torch is installed, and foolbox
3's L2DeepFoolAttack / L2CarliniWagnerAttack (abort_early=True) on the same PyTorch twin when
foolbox is importable (it is not a dependency; the output says whether it was). Then
compile-only checks of long budgets (DeepFool-1000, CW 9 x 1000 with abort_early): the early
exit's compile time does not grow with the step count.

  python3 benchmarks/bench_early_exit.py                      # everything (~1 h on 2 busy cores)
  python3 benchmarks/bench_early_exit.py --cases deepfool50 cw5x100 --repeats 3
  python3 benchmarks/bench_early_exit.py --smoke              # toy sizes: checks that it runs
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import timing, victims  # pylint: disable=wrong-import-position
from unmask_jax.attacks import apgd, autoattack, cw, deepfool  # pylint: disable=wrong-import-position

BEFORE_REV = '3b23e86'  # the library before the early exit
MODULES = ('common', 'cw', 'deepfool')


def load_before(rev: str):
  """(cw module, deepfool module) of the library at `rev`, importable beside the current one."""
  root = tempfile.mkdtemp(prefix='early_exit_before_')
  pkg = os.path.join(root, 'attacks_before')
  os.makedirs(pkg)
  open(os.path.join(pkg, '__init__.py'), 'w').close()
  for m in MODULES:
    src = subprocess.run(['git', 'show', f'{rev}:unmask_jax/attacks/{m}.py'], cwd=timing.REPO,
                         check=True, capture_output=True, text=True).stdout
    src = src.replace('from unmask_jax.attacks import common', 'from attacks_before import common')
    src = src.replace('from unmask_jax.attacks.common import', 'from attacks_before.common import')
    with open(os.path.join(pkg, f'{m}.py'), 'w') as f:
      f.write(src)
  sys.path.insert(0, root)
  return (importlib.import_module('attacks_before.cw'),
          importlib.import_module('attacks_before.deepfool'))


def cases(smoke: bool) -> dict:
  """name -> (label, {contender: (attack fn or None, kwargs, context factory)})."""
  df, cw5, cw9 = (3, (2, 3), (2, 3)) if smoke else (50, (5, 100), (9, 100))
  nullctx = contextlib.nullcontext
  return {
      'deepfool50': (f'DeepFool-{df}', {
          'before': ('before_deepfool', dict(steps=df), nullctx),
          'after': (deepfool.deepfool, dict(steps=df), nullctx),
          'torch': ('torch_deepfool', dict(steps=df), nullctx)}),
      'cw5x100': (f'CW-L2 {cw5[0]} x {cw5[1]}', {
          'before': ('before_cw', dict(binary_search_steps=cw5[0], steps=cw5[1]), nullctx),
          'after': (cw.cw_l2, dict(binary_search_steps=cw5[0], steps=cw5[1]), nullctx),
          'after, abort_early': (cw.cw_l2, dict(binary_search_steps=cw5[0], steps=cw5[1],
                                                abort_early=True), nullctx),
          'torch': ('torch_cw', dict(binary_search_steps=cw5[0], steps=cw5[1]), nullctx)}),
      'cw9x100': (f'CW-L2 {cw9[0]} x {cw9[1]} (default)', {
          'before': ('before_cw', dict(binary_search_steps=cw9[0], steps=cw9[1]), nullctx),
          'after': (cw.cw_l2, dict(binary_search_steps=cw9[0], steps=cw9[1]), nullctx),
          'after, abort_early': (cw.cw_l2, dict(binary_search_steps=cw9[0], steps=cw9[1],
                                                abort_early=True), nullctx),
          'torch': ('torch_cw', dict(binary_search_steps=cw9[0], steps=cw9[1]), nullctx)}),
  }


COMPILE_ONLY = {  # name -> (label, attack, kwargs): long budgets, compile time only
    'deepfool1000': ('DeepFool-1000', lambda: deepfool.deepfool, dict(steps=1000)),
    'cw9x1000_abort': ('CW-L2 9 x 1000, abort_early', lambda: cw.cw_l2,
                       dict(binary_search_steps=9, steps=1000, abort_early=True)),
    # The longest unrolled loops of the other attacks, for the compile-time goal (<= 30 s).
    'apgd100': ('APGD-CE L∞ 100 steps (default, unrolled)', lambda: apgd.apgd_linf,
                dict(eps=8 / 255, steps=100)),
    'autoattack': ('AutoAttack L∞ (standard: 100 steps, 9 targets, 5000 queries)',
                   lambda: autoattack.autoattack, dict(eps=8 / 255)),
}


def _foolbox(tmodel, xt, yt, case: str, kw: dict):
  """foolbox 3's attack of the same kind on the PyTorch twin (its defaults otherwise: DeepFool
  stops when all are fooled, CW aborts early), as a zero-argument call returning NHWC x_adv."""
  import foolbox as fb  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
  fmodel = fb.PyTorchModel(tmodel.eval(), bounds=(0, 1))
  if case.startswith('deepfool'):
    attack = fb.attacks.L2DeepFoolAttack(steps=kw['steps'], candidates=10, overshoot=0.02)
  else:
    attack = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=kw['binary_search_steps'], steps=kw['steps'], stepsize=1e-2,
        initial_const=1e-3, abort_early=True)
  return lambda: torch_models.to_nhwc(attack(fmodel, xt, yt, epsilons=None)[1])


def _l2(a, b):
  return np.sqrt(((a - b) ** 2).reshape(len(a), -1).sum(1))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', nargs='*', default=['deepfool50', 'cw5x100', 'cw9x100'],
                      help='timed cases: deepfool50 cw5x100 cw9x100')
  parser.add_argument('--compile_only', nargs='*', default=list(COMPILE_ONLY),
                      help=f'compile-only checks: {", ".join(COMPILE_ONLY)}')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--before', default=BEFORE_REV, help='git revision of "before"')
  parser.add_argument('--smoke', action='store_true', help='batch 4, toy step counts')
  parser.add_argument('--json', help='write the raw results here')
  args = parser.parse_args(argv)

  before_cw, before_df = load_before(args.before)
  torch = timing.torch_or_none()
  try:
    import foolbox  # pylint: disable=import-outside-toplevel,unused-import
    has_foolbox = True
  except ImportError:
    has_foolbox = False
  batch = 4 if args.smoke else 128
  victim = victims.cnn_small(trained=not args.smoke)
  x_np = victims.images(batch)['image']
  y_np = victims.predictions(victim.logits_fn, x_np)
  x, y, key = jnp.asarray(x_np), jnp.asarray(y_np), jax.random.key(0)
  print(f'{timing.device_label()}; jax {jax.__version__}; {victim.name} ({victim.params:,} params, '
        f'{victim.weights}), batch {batch}; before = {args.before}; load {timing.load_average()}; '
        f'foolbox {"importable" if has_foolbox else "not importable"}', flush=True)
  tmodel = xt = yt = None
  if torch is not None:
    from benchmarks import torch_attacks, torch_models  # pylint: disable=import-outside-toplevel
    tmodel = torch_models.from_nnx(victim.model)
    torch_models.check_same_logits(victim.model, tmodel, x_np)
    xt = torch_models.to_torch_images(x_np, channels_last=True)
    yt = torch.from_numpy(y_np).long()

  results = {'meta': {'device': timing.device_label(), 'weights': victim.weights, 'batch': batch,
                      'before': args.before, 'load_start': timing.load_average(),
                      'foolbox': has_foolbox, 'date': timing.now()}, 'cases': {}, 'compile': {}}
  for name in args.cases:
    label, contenders = cases(args.smoke)[name]
    fns, compile_s, info = {}, {}, {}
    for who, (fn, kw, ctx) in contenders.items():
      if fn in ('torch_deepfool', 'torch_cw'):
        if tmodel is None:
          continue
        attack = torch_attacks.deepfool if fn == 'torch_deepfool' else torch_attacks.cw_l2
        extra = {'info': info} if fn == 'torch_deepfool' else {}
        run = (lambda attack=attack, kw=kw, extra=extra:
               torch_models.to_nhwc(attack(tmodel, xt, yt, **kw, **extra)))
        # All cores and 1 thread: on busy cores PyTorch's OpenMP threads spin (timing.py).
        fns[f'{who} ({timing.cores()} threads)'] = run
        fns[f'{who} (1 thread)'] = timing.with_threads(torch, 1, run)
        continue
      fn = {'before_deepfool': before_df.deepfool, 'before_cw': before_cw.cw_l2}.get(fn, fn)
      if who == 'after' and has_foolbox and tmodel is not None:
        fns['foolbox'] = _foolbox(tmodel, xt, yt, name, kw)
      with ctx():
        t0 = time.perf_counter()
        exe = jax.jit(functools.partial(fn, **kw)).lower(victim.logits_fn, x, y, key).compile()
        compile_s[who] = time.perf_counter() - t0
      print(f'  {label}: {who} compiled in {compile_s[who]:.1f} s', flush=True)
      fns[who] = lambda exe=exe: exe(victim.logits_fn, x, y, key)
    names = list(fns)
    walls, cpus, outs = {n: [] for n in names}, {n: [] for n in names}, {}
    timed = list(names)
    for r in range(max(args.repeats, 1)):
      k = r % len(timed)
      for n in timed[k:] + timed[:k]:
        w, c, out = timing.timed_call(fns[n])
        walls[n].append(w)
        cpus[n].append(c)
        outs[n] = np.asarray(out)
      print(f'  {label}: round {r + 1}: ' + ', '.join(f'{n} {walls[n][-1]:.2f} s' for n in timed),
            flush=True)
      if r == 0:  # of the two PyTorch thread counts, only the faster is timed further
        pair = [n for n in timed if n.startswith('torch')]
        if len(pair) == 2:
          a, b = pair
          if walls[a][0] > 1.5 * walls[b][0]:
            timed.remove(a)
          elif walls[b][0] > 1.5 * walls[a][0]:
            timed.remove(b)
    rows = {}
    for n in names:
      adv = outs[n]
      succ = victims.predictions(victim.logits_fn, adv) != y_np
      d = _l2(adv, x_np)
      rows[n] = {'wall': statistics.median(walls[n]), 'cpu': statistics.median(cpus[n]),
                 'walls': walls[n], 'compile_s': compile_s.get(n), 'success': float(succ.mean()),
                 'median_l2': float(np.median(d[succ])) if succ.any() else None,
                 'max_diff_vs_before': float(np.abs(adv - outs['before']).max())}
    if 'iterations' in info:
      results['meta']['torch_deepfool_iterations'] = info['iterations']
      print(f'  PyTorch DeepFool stopped after {info["iterations"]} iterations', flush=True)
    results['cases'][name] = {'label': label, 'rows': rows}
    _dump(results, args.json)
    print(f'\n| {label} | compile (s) | run, median wall (s) | CPU (s) | success | median L2 | '
          'max abs diff vs before |\n|---|---|---|---|---|---|---|')
    for n, v in rows.items():
      comp = f'{v["compile_s"]:.1f}' if v['compile_s'] is not None else '-'
      l2 = f'{v["median_l2"]:.4f}' if v['median_l2'] is not None else '-'
      print(f'| {n} | {comp} | {v["wall"]:.2f} | {v["cpu"]:.2f} | {100 * v["success"]:.1f}% | '
            f'{l2} | {v["max_diff_vs_before"]:.1e} |')
    print(flush=True)

  for name in args.compile_only or []:
    label, fn, kw = COMPILE_ONLY[name]
    if args.smoke:
      kw = {k: (min(v, 3) if isinstance(v, int) and not isinstance(v, bool) else v)
            for k, v in kw.items()}
    t0 = time.perf_counter()
    jax.jit(functools.partial(fn(), **kw)).lower(victim.logits_fn, x, y, key).compile()
    results['compile'][name] = {'label': label, 'compile_s': time.perf_counter() - t0}
    print(f'  compile only: {label}: {results["compile"][name]["compile_s"]:.1f} s', flush=True)
    _dump(results, args.json)
  results['meta']['load_end'] = timing.load_average()
  _dump(results, args.json)
  return 0


def _dump(results: dict, path: str | None) -> None:
  """Writes the results so far (a long run that is interrupted keeps its finished cases)."""
  if path:
    with open(path, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  sys.exit(main())
