"""How many steps a host program should hold (`unmask_jax.attacks.common.HOST_CHUNK`).

Attacks called with arrays run their loops from the host as jitted programs of HOST_CHUNK unrolled
steps (`common.host_loop`); a loop of at most HOST_CHUNK steps is one program. For each attack,
step count and chunk size this measures, on the trained SynthParts victim M (as the other
benchmarks; random weights when runs/main is absent) and batch 128 of its test images:
  compile  the tracing + lowering + XLA time JAX reports (jax.monitoring) during a cold call
           with every host program forgotten, the persistent compilation cache off;
  cold     that call's wall time;
  steady   median wall time of `--repeats` further calls (block_until_ready);
  max diff the largest |x_adv - x_adv at the first chunk size| (0: the same iterates).
Chunk sizes are timed one after another in one process, after a warm-up call of the model.

Run:  python3 -m benchmarks.bench_host_chunk [--attacks pgd_linf ...] [--steps 20 100]
                                            [--chunks 1 2 5 10 20] [--repeats 3] [--out FILE]
      python3 -m benchmarks.bench_host_chunk --smoke     (seconds: a toy CNN, batch 4)
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unmask_jax import attacks  # pylint: disable=wrong-import-position
from unmask_jax.attacks import common  # pylint: disable=wrong-import-position

DEFAULT_ATTACKS = ('pgd_linf', 'pgd_l2', 'mifgsm_linf', 'apgd_linf',
                   'cw_l2(steps=STEPS, binary_search_steps=2, initial_const=0.1)')
EPS = {'linf': '8/255', 'l2': '0.5'}


def spec_of(name: str, steps: int) -> str:
  """An attack spec: `name` with STEPS replaced, or `name(eps=<its norm's eps>, steps=steps)`."""
  if 'STEPS' in name:
    return name.replace('STEPS', str(steps))
  return f'{name}(eps={EPS[attacks.norm_of(name)]}, steps={steps})'


def measure(spec: str, logits_fn, x, y, chunks, repeats: int) -> list[dict]:
  """One row per chunk size for one attack spec (see the module docstring)."""
  attack = attacks.parse_attack(spec).partial()
  key = jax.random.key(0)
  spent = collections.Counter()

  def listen(event, secs, **_):
    if event.startswith('/jax/core/compile/'):
      spent['compile'] += secs

  rows, first = [], None
  saved = common.HOST_CHUNK
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for chunk in chunks:
      common.HOST_CHUNK = chunk
      common.host_program.cache_clear()
      spent.clear()
      t = time.perf_counter()
      out = np.asarray(attack(logits_fn, x, y, key))
      cold = time.perf_counter() - t
      compile_s = spent['compile']
      times = []
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(attack(logits_fn, x, y, key))
        times.append(time.perf_counter() - t)
      first = out if first is None else first
      rows.append({'spec': spec, 'chunk': chunk, 'compile_s': compile_s, 'cold_s': cold,
                   'steady_s': float(np.median(times)) if times else float('nan'),
                   'max_diff': float(np.abs(out - first).max())})
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
    common.HOST_CHUNK = saved
    common.host_program.cache_clear()
  return rows


def render(rows: list[dict], meta: dict) -> str:
  lines = [f'## Steps per host program (`benchmarks/bench_host_chunk.py`, measured {meta["date"]})',
           '',
           f'Command: `{meta["command"]}` ({meta["minutes"]:.1f} min). {meta["victim"]}, batch '
           f'{meta["batch"]}; {meta["machine"]}. Compile = tracing + lowering + XLA time of a cold '
           'call with the host programs forgotten (persistent cache off); steady = median of '
           f'{meta["repeats"]} calls after it; max diff = largest |x_adv - x_adv at chunk '
           f'{rows[0]["chunk"] if rows else "-"}|. Chunk = steps per host program '
           '(`common.HOST_CHUNK`); a loop of at most that many steps is one program.',
           '',
           '| attack | chunk | compile s | cold s | steady s | steady vs largest chunk | max diff |',
           '|---|---|---|---|---|---|---|']
  largest = {}
  for r in rows:
    if r['spec'] not in largest or r['chunk'] > largest[r['spec']]['chunk']:
      largest[r['spec']] = r
  for r in rows:
    ref = largest[r['spec']]['steady_s']
    lines.append(f'| {r["spec"]} | {r["chunk"]} | {r["compile_s"]:.2f} | {r["cold_s"]:.2f} | '
                 f'{r["steady_s"]:.3f} | {ref / r["steady_s"]:.2f}x | {r["max_diff"]:.1e} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--attacks', nargs='+', default=list(DEFAULT_ATTACKS), metavar='SPEC',
                      help='attack names (eps 8/255 L∞, 0.5 L2) or specs with STEPS for the '
                           'step count (default: %(default)s)')
  parser.add_argument('--steps', nargs='+', type=int, default=[20, 100], metavar='N',
                      help='step counts (default: 20 100)')
  parser.add_argument('--chunks', nargs='+', type=int, default=[1, 2, 5, 10, 20], metavar='K',
                      help='steps per host program to compare (default: 1 2 5 10 20)')
  parser.add_argument('--repeats', type=int, default=3, help='timed calls after the cold one')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: a random 4-8-8 CNN, batch 4, PGD L∞ at 3 steps, chunks 1 2 '
                           '5, one repeat')
  parser.add_argument('--out', help='write the markdown table here (default: print it)')
  args = parser.parse_args(argv)
  for v, name in ((args.steps, '--steps'), (args.chunks, '--chunks')):
    if any(n < 1 for n in v):
      parser.error(f'{name} values must be >= 1')
  if args.repeats < 0:
    parser.error('--repeats must be >= 0')
  jax.config.update('jax_enable_compilation_cache', False)
  from benchmarks import victims  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  if args.smoke:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from unmask_jax import models  # pylint: disable=import-outside-toplevel
    from unmask_jax.models import functional  # pylint: disable=import-outside-toplevel
    model = models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), widths=(4, 8, 8),
                          feature_dim=8)
    model.eval()
    logits_fn, victim = functional.logits_fn(model), 'random 4-8-8 cnn_small'
    args.attacks, args.steps, args.chunks, args.repeats = ['pgd_linf'], [3], [1, 2, 5], 1
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
  else:
    v = victims.cnn_small()
    logits_fn, victim = v.logits_fn, f'{v.name} ({v.weights})'
    x = jnp.asarray(victims.images(128)['image'])
  y = jnp.asarray(victims.predictions(logits_fn, np.asarray(x)))
  rows = []
  for name in args.attacks:
    for steps in args.steps:
      for r in measure(spec_of(name, steps), logits_fn, x, y, args.chunks, args.repeats):
        rows.append(r)
        print(f'{r["spec"]} chunk {r["chunk"]}: compile {r["compile_s"]:.2f} s, cold '
              f'{r["cold_s"]:.2f} s, steady {r["steady_s"]:.3f} s, max diff {r["max_diff"]:.1e}',
              flush=True)
  meta = {'date': datetime.date.today().isoformat(), 'minutes': (time.time() - t0) / 60,
          'command': 'python3 -m benchmarks.bench_host_chunk ' + ' '.join(sys.argv[1:] if argv is None
                                                                          else argv),
          'victim': victim, 'batch': int(x.shape[0]), 'repeats': args.repeats,
          'machine': f'{os.cpu_count()} CPU cores, jax {jax.__version__}'}
  text = render(rows, meta)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
    print(f'wrote {args.out}')
  else:
    print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
