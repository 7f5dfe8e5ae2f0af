"""Measures how the loop over attack steps should be compiled (see attacks/common.py: LOOP_FORM).

PGD L∞ (default 20 steps) on a small pure-JAX CNN (lax.conv), batch 128 at 32x32x3, for each form:
  unrolled       Python for-loop inside the jitted attack (XLA sees `steps` copies of the step)
  scan_unrolled  lax.scan(..., unroll=True)
  scan           lax.scan, rolled (a compiled while loop)
  fori           lax.fori_loop (a compiled while loop)
  host_loop      a Python loop on the host calling one jitted step (dispatch per step)
Each form is compiled once (the time of the first call is reported as "first call"), then timed
as the median of --repeats calls, each synchronised with block_until_ready.

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


def time_calls(fn, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times), times


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

  results = {}
  for form in args.forms.split(','):
    if form == 'host_loop':
      alpha = common.default_step_size(eps, args.steps, None)

      @jax.jit
      def step(fn, x_adv, x0):
        _, g, _ = common.loss_and_grad(fn, common.cross_entropy, x_adv, y)
        return common.project_linf(x_adv + alpha * jnp.sign(g), x0, eps)

      start = jax.jit(lambda k, x0: common.random_start('linf', k, x0, eps))

      def run():
        x_adv = start(ka, x)
        for _ in range(args.steps):
          x_adv = step(logits_fn, x_adv, x)
        return x_adv

      first, median, times = time_calls(run, args.repeats)
    else:
      # The form is read while tracing, so the first (compiling) call must be inside the context.
      with common.loop_form(form):
        attack = jax.jit(functools.partial(pgd_linf, eps=eps, steps=args.steps))
        first, median, times = time_calls(
            functools.partial(attack, logits_fn, x, y, ka), args.repeats)
    results[form] = (first, median, min(times), max(times))
    print(f'  {form:14s} done: median {median:.3f} s', flush=True)

  best = min(results.values(), key=lambda r: r[1])[1]
  print('\n| form | first call (s) | median (s) | min (s) | max (s) | vs best |')
  print('|---|---|---|---|---|---|')
  for form, (first, median, lo, hi) in results.items():
    print(f'| {form} | {first:.2f} | {median:.3f} | {lo:.3f} | {hi:.3f} | {median / best:.2f}x |')


if __name__ == '__main__':
  main()
