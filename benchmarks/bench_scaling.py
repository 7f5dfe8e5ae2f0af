"""Scaling (row 5): the attack's batch sharded over 1, 2 and 4 forced host devices.

Each device count runs in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=N
(the flag must be set before JAX starts). There the images and labels are placed with a
`NamedSharding` that splits the batch axis over a 1-D mesh of the N devices, the weights are
replicated, and the library's jitted PGD-20 L∞ partitions itself from the input shardings (the
library has no sharded-attack helper: jit's sharding propagation is the data-parallel path the
trainer also uses). In the same process the unsharded attack on one device is timed, interleaved,
as the reference; the sharded result must equal the single-device one (the random start uses
partitionable threefry, so it does not depend on the sharding).

On a 2-core CPU the forced devices share the same cores, so this shows that the sharded path works
and what partitioning costs, not a speed-up; on a multi-GPU host the same code splits the batch.
In --smoke one process with 4 devices runs meshes over 1, 2 and 4 of them (fewer JAX start-ups).

Worker mode (used by run()):
  python3 -m benchmarks.bench_scaling --worker --devices 4 --use 1,2,4 --batch 128 --steps 20
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from benchmarks import timing

NAME = 'scaling'


def _worker(args) -> None:
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from benchmarks import victims  # pylint: disable=import-outside-toplevel
  from unmask_jax.attacks import pgd  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == args.devices, (jax.device_count(), args.devices)
  victim = victims.cnn_small(trained=args.trained)
  x = victims.images(args.batch)['image']
  y = victims.predictions(victim.logits_fn, x)
  key = jax.random.key(0)
  attack = jax.jit(functools.partial(pgd.pgd_linf, eps=8 / 255, step_size=2 / 255,
                                     steps=args.steps))
  fns = {'single': functools.partial(attack, victim.logits_fn, jax.numpy.asarray(x),
                                     jax.numpy.asarray(y), key)}
  for use in args.use:
    mesh = Mesh(np.array(jax.devices()[:use]), ('batch',))
    data = NamedSharding(mesh, P('batch'))
    rep = NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, data), jax.device_put(y, data)
    fn = jax.device_put(victim.logits_fn, rep)
    fns[f'sharded{use}'] = functools.partial(attack, fn, xs, ys, jax.device_put(key, rep))
  outs = {}
  t = timing.compare(fns, repeats=args.repeats, warmup=args.warmup, outputs=outs)
  ref = np.asarray(outs['single'])
  out = {'batch': args.batch, 'steps': args.steps, 'devices': args.devices,
         'weights': victim.weights, 'results': {}}
  for name, tm in t.items():
    adv = outs[name]
    shards = len(adv.sharding.device_set)
    adv = np.asarray(adv)
    succ = float(np.mean(victims.predictions(victim.logits_fn, adv) != y))
    out['results'][name] = dict(dataclasses.asdict(tm), max_diff=float(np.max(np.abs(adv - ref))),
                                success=succ, shards=shards)
  print('RESULT ' + json.dumps(out), flush=True)


def _run_worker(devices: int, use: list[int], settings: timing.Settings) -> dict:
  args = ['--worker', '--devices', str(devices), '--use', ','.join(map(str, use)),
          '--batch', str(settings.n(128, 4)), '--steps', str(settings.n(20, 1)),
          '--repeats', str(settings.repeats), '--warmup', str(settings.n(2, 1))] + (
              ['--trained'] if not settings.smoke else [])
  try:
    return timing.run_worker('benchmarks.bench_scaling', args,
                             f'--xla_force_host_platform_device_count={devices}')
  except timing.WorkerError as e:
    raise RuntimeError(f'scaling worker failed ({" ".join(e.cmd)}):\n{e.stderr[-3000:]}') from None


def run(settings: timing.Settings) -> list[timing.Row]:
  plans = [(4, [1, 2, 4])] if settings.smoke else [(1, [1]), (2, [2]), (4, [4])]
  rows = []
  device = timing.device_label()
  for devices, use in plans:
    res = _run_worker(devices, use, settings)
    r = res['results']
    single = r['single']
    for u in use:
      s = r[f'sharded{u}']
      ok = s['max_diff'] <= 1e-5 and s['shards'] == u
      check = (f'x_adv equal to 1-device run (max |diff| {s["max_diff"]:.1e}), {s["shards"]} '
               f'shard(s), success {100 * s["success"]:.1f}%')
      if not ok:
        check = 'CHECK FAILED: ' + check
      print(f'    {u} device(s): sharded {res["batch"] / s["wall"]:.0f} img/s, unsharded '
            f'{res["batch"] / single["wall"]:.0f} img/s; {check}', flush=True)
      rows.append(timing.Row(
          NAME, f'PGD-{res["steps"]} L∞ cnn_small, batch {res["batch"]} sharded over {u} forced host '
          f'device(s) (process with {devices})', 'same attack unsharded on 1 device',
          'jit with NamedSharding(batch axis)', timing.Timing.from_dict(single),
          timing.Timing.from_dict(s), check=check,
          device=f'{device}, {u} virtual device(s)', date=settings.date, unit='img/s',
          work=res['batch'], extra={'failed': not ok}))
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--worker', action='store_true')
  parser.add_argument('--devices', type=int, default=1)
  parser.add_argument('--use', type=lambda s: [int(v) for v in s.split(',')], default=[1])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--trained', action='store_true')
  args = parser.parse_args()
  if not args.worker:
    parser.error('run benchmarks through benchmarks/run.py; --worker is its internal mode')
  _worker(args)


if __name__ == '__main__':
  main()
