"""Measures how the loop over attack steps should be compiled (see attacks/common.py: LOOP_FORM).

PGD L∞ (default 20 steps) on a small pure-JAX CNN (lax.conv), batch 128 at 32x32x3, for each form:
  unrolled       Python for-loop inside the jitted attack (XLA sees `steps` copies of the step)
  scan_unrolled  lax.scan(..., unroll=True)
  scan           lax.scan, rolled (a compiled while loop)
  fori           lax.fori_loop (a compiled while loop)
  host_loop      a Python loop on the host calling one jitted step (dispatch per step)
Each form is compiled once (the time of that first call, tracing and compiling included, is reported
as "first call"). Then --repeats rounds each time every form once, in a rotating order, every call
synchronised with block_until_ready; the table gives the median over rounds of the wall time and of
the process CPU time. Interleaving the forms and reporting CPU time keep the comparison fair on a
shared machine where other processes come and go.

Run:  python3 benchmarks/bench_loop_form.py [--steps 20] [--batch 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unmask_jax.attacks import common
from unmask_jax.attacks.pgd import pgd_linf

# (out_channels, stride) of the 3x3 convolutions; then global average pooling and two dense layers.
CONVS = ((32, 1), (64, 2), (64, 2))
HIDDEN = 128
NUM_CLASSES = 10


def init_cnn(key, in_ch=3):
  params = []
  for out_ch, _ in CONVS:
    key, k = jax.random.split(key)
    w = jax.random.normal(k, (3, 3, in_ch, out_ch)) * jnp.sqrt(2.0 / (9 * in_ch))
    params.append((w, jnp.zeros((out_ch,))))
    in_ch = out_ch
  for n_in, n_out in ((in_ch, HIDDEN), (HIDDEN, NUM_CLASSES)):
    key, k = jax.random.split(key)
    params.append((jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in), jnp.zeros((n_out,))))
  return params


def cnn_apply(params, x):
  h = x
  for (w, b), (_, stride) in zip(params[:len(CONVS)], CONVS):
    h = jax.lax.conv_general_dilated(h, w, (stride, stride), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    h = jax.nn.relu(h + b)
  h = jnp.mean(h, axis=(1, 2))
  (w1, b1), (w2, b2) = params[len(CONVS):]
  return jax.nn.relu(h @ w1 + b1) @ w2 + b2


def timed(fn):
  """(wall seconds, process CPU seconds) of one synchronised call."""
  w0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - w0, time.process_time() - c0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--forms', default='unrolled,scan_unrolled,scan,fori,host_loop')
  args = parser.parse_args()

  kp, kx, ky, ka = jax.random.split(jax.random.key(0), 4)
  params = init_cnn(kp)
  n_params = sum(w.size + b.size for w, b in params)
  x = jax.random.uniform(kx, (args.batch, args.size, args.size, 3))
  y = jax.random.randint(ky, (args.batch,), 0, NUM_CLASSES)
  logits_fn = jax.tree_util.Partial(cnn_apply, params)
  eps = 8 / 255
  print(f'PGD-{args.steps} L∞ eps=8/255, CNN {n_params} params, batch {args.batch} at '
        f'{args.size}x{args.size}x3, backend {jax.default_backend()}, '
        f'{jax.device_count()} device(s), jax {jax.__version__}')

  runners, first = {}, {}
  for form in args.forms.split(','):
    if form == 'host_loop':
      alpha = common.default_step_size(eps, args.steps, None)

      @jax.jit
      def step(fn, x_adv, x0):
        _, g, _ = common.loss_and_grad(fn, common.cross_entropy, x_adv, y)
        return common.project_linf(x_adv + alpha * jnp.sign(g), x0, eps)

      start = jax.jit(lambda k, x0: common.random_start('linf', k, x0, eps))

      def run(step=step, start=start):
        x_adv = start(ka, x)
        for _ in range(args.steps):
          x_adv = step(logits_fn, x_adv, x)
        return x_adv

      first[form] = timed(run)[0]
    else:
      # The form is read while tracing, so the first (compiling) call must be inside the context;
      # later calls hit the jit cache and run the program compiled with this form.
      with common.loop_form(form):
        attack = jax.jit(functools.partial(pgd_linf, eps=eps, steps=args.steps))
        run = functools.partial(attack, logits_fn, x, y, ka)
        first[form] = timed(run)[0]
    timed(run)  # one more warm-up call
    runners[form] = run
    print(f'  {form:14s} compiled: first call {first[form]:.2f} s', flush=True)

  forms = list(runners)
  wall = {f: [] for f in forms}
  cpu = {f: [] for f in forms}
  for r in range(args.repeats):
    for f in forms[r % len(forms):] + forms[:r % len(forms)]:
      w, c = timed(runners[f])
      wall[f].append(w)
      cpu[f].append(c)

  med = {f: statistics.median(wall[f]) for f in forms}
  best = min(med.values())
  print('\n| form | first call (s) | median wall (s) | min wall (s) | median CPU (s) '
        '| wall vs best |')
  print('|---|---|---|---|---|---|')
  for f in forms:
    print(f'| {f} | {first[f]:.2f} | {med[f]:.3f} | {min(wall[f]):.3f} | '
          f'{statistics.median(cpu[f]):.3f} | {med[f] / best:.2f}x |')


if __name__ == '__main__':
  main()
