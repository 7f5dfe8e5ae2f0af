"""Where PGD-20's time goes, and which levers move it (the analysis behind the goal of row 1).

PGD-20 L∞ (eps 8/255, step 2/255), batch 128, on the SynthParts victim, all variants with the same
weights and inputs, timed interleaved in one process:

  library            the library's jitted attack as shipped (unrolled steps; the 2x2 max-pool as
                     the maximum of 4 strided slices, `models.base.max_pool_2x2`)
  old_pool           the same model with `nnx.max_pool` (a reduce_window), the library's form
                     before this study: the lever that moved the most
  scan               the library traced under attacks.common.loop_form('scan') (a rolled loop)
  nchw               a pure-JAX copy of the model computing in NCHW instead of NHWC
  col2im             the model with the first convolution's input gradient computed as 9 padded
                     slices of one matmul (col2im) instead of XLA:CPU's skinny Eigen convolution
  torch_cl / torch_nchw / torch_cl_1thread   the PyTorch eager reference, layouts and threads

then, each in a fresh process (XLA_FLAGS is read at start-up), `library` and `old_pool` against the
PyTorch reference under XLA:CPU flags, and a profile of one gradient step: forward vs backward time
on both sides, the XLA:CPU thunks by kind (from a jax.profiler trace), and PyTorch's top operators.

  python3 -m benchmarks.bench_levers --worker --flags="--xla_cpu_use_onednn=true"   (internal)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing, victims
from unmask_jax.attacks import common, pgd
from unmask_jax.models import cnn, functional

NAME = 'levers'
EPS, STEP = 8 / 255, 2 / 255
# XLA:CPU flags tried (each in its own process). '' = defaults, as the main table.
# With --xla_force_host_platform_device_count=2 the worker shards the batch over the 2 devices.
FLAGS = (
    '',
    '--xla_force_host_platform_device_count=2',
    '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution',
    '--xla_cpu_use_onednn=true',
    '--xla_cpu_multi_thread_eigen=false',
)


class CNNSmallOldPool(cnn.CNNSmall):
  """cnn.CNNSmall with `nnx.max_pool` (reduce_window), the library's pooling before this study."""

  def features(self, x, *, dropout_key=None):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    del dropout_key
    x = self._normalize(x)
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = jax.nn.relu(bn(conv(x)))
      if i < len(self.convs) - 1:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return jax.nn.relu(self.fc1(jnp.mean(x, axis=(1, 2))))


def old_pool_twin(model):
  """A CNNSmallOldPool holding `model`'s weights (eval mode)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  state = nnx.state(model)
  twin = nnx.eval_shape(lambda: CNNSmallOldPool(
      num_classes=model.num_classes, in_channels=model.in_channels,
      widths=[c.out_features for c in model.convs], feature_dim=model.feature_dim,
      dropout=model.dropout.rate, mean=model.mean, std=model.std, rngs=nnx.Rngs(0)))
  nnx.update(twin, state)
  twin.eval()
  return twin


_DN = ('NHWC', 'HWIO', 'NHWC')


def _im2col_conv(x, k, pads):
  """The stride-1 NHWC convolution of x with k as one matmul over 9 shifted slices (im2col):
  sum_{a,b} pad(x)[:, a:a+H, b:b+W, :] @ k[a, b]. Its transpose (what the input gradient runs) is
  one matmul of the cotangent with k^T and 9 padded slices summed (col2im)."""
  kh, kw, ci, co = k.shape
  (pt, pb), (pl, pr) = pads
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  h, w = x.shape[1] + pt + pb - kh + 1, x.shape[2] + pl + pr - kw + 1
  cols = jnp.concatenate([xp[:, a:a + h, b:b + w] for a in range(kh) for b in range(kw)], -1)
  return jnp.einsum('nhwc,co->nhwo', cols, k.reshape(kh * kw * ci, co))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_col2im_grad(x, k, pads):
  return jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_DN)


def _conv_col2im_jvp(pads, primals, tangents):
  # The forward pass stays XLA's convolution; only the x-tangent is written as im2col, so that its
  # transpose, the input gradient, is col2im. Symbolic zeros: an attack's kernel tangent is zero
  # and must not cost a convolution.
  (x, k), (dx, dk) = primals, tangents
  y = _conv_col2im_grad(x, k, pads)
  zero = jax.custom_derivatives.SymbolicZero
  terms = ([] if isinstance(dx, zero) else [_im2col_conv(dx, k, pads)]) + (
      [] if isinstance(dk, zero) else
      [jax.lax.conv_general_dilated(x, dk, (1, 1), pads, dimension_numbers=_DN)])
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_conv_col2im_grad.defjvp(_conv_col2im_jvp, symbolic_zeros=True)


def col2im_conv(lhs, rhs, window_strides, padding, **_):
  """A `conv_general_dilated` for nnx.Conv (stride 1, explicit padding) using the above."""
  assert tuple(window_strides) == (1, 1), window_strides
  return _conv_col2im_grad(lhs, rhs, tuple(tuple(p) for p in padding))


def col2im_twin(model):
  """`model` (a CNNSmall) with its first convolution's input gradient computed as col2im."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  twin = nnx.clone(model)
  twin.convs[0].conv_general_dilated = col2im_conv
  twin.eval()
  return twin


def nchw_apply(params, x_nhwc):
  """The victim as a pure function computing in NCHW (the batch-layout lever)."""
  mean, std, convs, bns, (w1, b1), (w2, b2) = params
  h = jnp.transpose((x_nhwc - mean) / std, (0, 3, 1, 2))
  for i, (k, (scale, bias, mu, var)) in enumerate(zip(convs, bns)):
    h = jax.lax.conv_general_dilated(h, k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
    inv = scale * jax.lax.rsqrt(var + 1e-5)
    h = jax.nn.relu(h * inv[:, None, None] + (bias - mu * inv)[:, None, None])
    if i < len(convs) - 1:
      a = jnp.maximum(h[:, :, 0::2], h[:, :, 1::2])
      h = jnp.maximum(a[:, :, :, 0::2], a[:, :, :, 1::2])
  h = jax.nn.relu(jnp.mean(h, axis=(2, 3)) @ w1 + b1)
  return h @ w2 + b2


def nchw_params(model):
  g = lambda v: jnp.asarray(v[...])
  return (jnp.asarray(model.mean), jnp.asarray(model.std),
          [jnp.transpose(g(c.kernel), (3, 2, 0, 1)) for c in model.convs],
          [(g(b.scale), g(b.bias), g(b.mean), g(b.var)) for b in model.bns],
          (g(model.fc1.kernel), g(model.fc1.bias)), (g(model.fc2.kernel), g(model.fc2.bias)))


def _setup(settings, torch):
  victim = victims.cnn_small(trained=not settings.smoke)
  batch, steps = settings.n(128, 4), settings.n(20, 1)
  x = victims.images(batch)['image']
  y = victims.predictions(victim.logits_fn, x)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  key = jax.random.key(0)
  if jax.device_count() > 1:  # forced host devices: split the batch over them (data parallel)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
    mesh = Mesh(np.array(jax.devices()), ('batch',))
    xj, yj = (jax.device_put(v, NamedSharding(mesh, PartitionSpec('batch'))) for v in (xj, yj))
    place = lambda tree: jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
  else:
    place = lambda tree: tree
  attack = functools.partial(pgd.pgd_linf, eps=EPS, step_size=STEP, steps=steps)
  s = {'victim': victim, 'x': x, 'y': y, 'xj': xj, 'yj': yj, 'key': key, 'attack': attack,
       'batch': batch, 'steps': steps, 'place': place,
       'old_fn': functional.logits_fn(old_pool_twin(victim.model))}  # the nnx.max_pool model
  if torch is not None:
    from benchmarks import torch_attacks, torch_models  # pylint: disable=import-outside-toplevel
    tm = torch_models.from_nnx(victim.model)
    x0 = np.asarray(common.random_start('linf', jax.random.fold_in(key, 0), xj, EPS))
    yt = torch.from_numpy(y).long()
    s['torch'] = {}
    for cl in (True, False):
      xt, x0t = (torch_models.to_torch_images(v, channels_last=cl) for v in (x, x0))
      s['torch'][cl] = functools.partial(torch_attacks.pgd, tm, xt, yt, x0t, norm='linf', eps=EPS,
                                         step_size=STEP, steps=steps)
  return s


def _bf16_apply(fn, x):
  return fn(x.astype(jnp.bfloat16)).astype(jnp.float32)


def bf16_logits_fn(fn):
  """`fn` with its weights and activations in bfloat16 (inputs cast on entry, logits back)."""
  low = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating)
                     else a, fn)
  return jax.tree_util.Partial(_bf16_apply, low)


def _variants(s, torch, include=('library', 'scan', 'old_pool', 'nchw')):
  victim, xj, yj, key, attack = s['victim'], s['xj'], s['yj'], s['key'], s['attack']
  place = s['place']  # replicates weights when the batch is sharded over forced host devices
  fns = {}
  if 'library' in include:
    lib = jax.jit(attack)
    lfn = place(victim.logits_fn)
    fns['library'] = lambda: lib(lfn, xj, yj, key)
  if 'scan' in include:
    # A fresh function object: JAX caches traces per function, so jitting `attack` itself here
    # would hand the rolled trace to every other variant that jits `attack` (it did, once).
    scan = jax.jit(functools.partial(attack))
    with common.loop_form('scan'):  # the form is read at trace time: compile inside
      timing.sync(scan(victim.logits_fn, xj, yj, key))
    fns['scan'] = lambda: scan(victim.logits_fn, xj, yj, key)
  if 'old_pool' in include:
    old = jax.jit(attack)
    ofn = place(s['old_fn'])
    fns['old_pool'] = lambda: old(ofn, xj, yj, key)
  if 'nchw' in include:
    nchw = jax.jit(attack)
    nfn = jax.tree_util.Partial(nchw_apply, nchw_params(victim.model))
    fns['nchw'] = lambda: nchw(nfn, xj, yj, key)
  if 'col2im' in include:
    c2i = jax.jit(attack)
    cfn = place(functional.logits_fn(col2im_twin(victim.model)))
    fns['col2im'] = lambda: c2i(cfn, xj, yj, key)
  if 'bf16' in include:
    low = jax.jit(attack)
    bfn = bf16_logits_fn(victim.logits_fn)
    fns['bf16'] = lambda: low(bfn, xj, yj, key)
  if 'donate' in include:
    # x donated to the attack (its buffer may hold x_adv); each call donates a fresh copy.
    donated = jax.jit(attack, donate_argnums=(1,))
    fns['donate'] = lambda: donated(victim.logits_fn, jnp.copy(xj), yj, key)
  if torch is not None:
    fns['torch_cl'] = s['torch'][True]
    fns['torch_cl_1thread'] = timing.with_threads(torch, 1, s['torch'][True])
    if 'library' in include and 'scan' in include:  # the full in-process study only
      fns['torch_nchw'] = s['torch'][False]
  return fns


def _success(s, out):
  if hasattr(out, 'permute'):
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    out = torch_models.to_nhwc(out)
  return float(np.mean(victims.predictions(s['victim'].logits_fn, np.asarray(out)) != s['y']))


def _measure(settings, torch, include):
  """Times the variants: ({name: Timing}, {name: attack success rate}, the setup)."""
  s = _setup(settings, torch)
  fns = _variants(s, torch, include)
  outs = {}
  t = timing.compare(fns, repeats=settings.repeats, warmup=settings.n(2, 1),
                     alternatives=(timing.TORCH_REFERENCES,), outputs=outs)
  return t, {name: _success(s, outs[name]) for name in t}, s


# ---------------------------------------------------------------------------------------------
# Profile of one gradient step.


def _thunk_kind(name: str) -> str | None:
  n = name.lower()
  if n.startswith('threadexecutor') or n.startswith('thunkexecutor') or n.startswith('$') or (
      'pjrt' in n) or n.startswith('pjitfunction') or n in ('parsearguments',):
    return None
  if 'reduce-window' in n or 'select-and-scatter' in n or 'iota' in n or 'scatter' in n:
    return 'max-pool backward (reduce-window, iota, scatter)'
  if 'convolution' in n:
    return 'convolutions (Eigen)'
  if 'ynn' in n or 'xnn' in n or 'onednn' in n:
    return 'library fusions (YNNPACK/oneDNN: dots, convolutions)'
  if 'broadcast' in n or 'fusion' in n or 'copy' in n or 'concatenate' in n:
    return 'elementwise / broadcast / copy fusions'
  return 'other'


def xla_profile(fn, calls: int = 10) -> dict[str, float] | None:
  """Seconds per call by thunk kind, summed over threads, from a jax.profiler trace of `fn`."""
  d = tempfile.mkdtemp(prefix='bench_trace_')
  try:
    timing.sync(fn())
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(calls):
        timing.sync(fn())
    files = glob.glob(os.path.join(d, '**', '*.trace.json.gz'), recursive=True)
    if not files:
      return None
    with gzip.open(files[0]) as f:
      data = json.load(f)
    events = data['traceEvents'] if isinstance(data, dict) else data
    tot = collections.Counter()
    for e in events:
      if e.get('ph') == 'X':
        kind = _thunk_kind(str(e.get('name', '')))
        if kind:
          tot[kind] += e.get('dur', 0) / 1e6 / calls
    return dict(tot)
  except Exception as e:  # pylint: disable=broad-except
    print(f'    (XLA profile failed: {type(e).__name__}: {e})')
    return None
  finally:
    shutil.rmtree(d, ignore_errors=True)


def torch_profile(torch, step, calls: int = 5) -> list[tuple[str, float]]:
  """[(operator, self CPU seconds per call)] of the top PyTorch operators of `step`."""
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  step()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      step()
  rows = [(e.key, e.self_cpu_time_total / 1e6 / calls) for e in prof.key_averages()]
  return sorted(rows, key=lambda r: -r[1])[:8]


def _profile(settings, torch, s):
  victim, xj, yj = s['victim'], s['xj'], s['yj']
  out = {}
  grad = jax.jit(lambda f, v: common.loss_and_grad(f, common.cross_entropy, v, yj)[1])
  fwd = jax.jit(lambda f, v: f(v))
  old_fn = s['old_fn']
  fns = {'jax fwd': lambda: fwd(victim.logits_fn, xj), 'jax grad': lambda: grad(victim.logits_fn, xj),
         'jax fwd (nnx.max_pool)': lambda: fwd(old_fn, xj),
         'jax grad (nnx.max_pool)': lambda: grad(old_fn, xj)}
  if torch is not None:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    tm = torch_models.from_nnx(victim.model)
    xt = torch_models.to_torch_images(s['x'], channels_last=True)
    yt = torch.from_numpy(s['y']).long()

    def tfwd():
      with torch.no_grad():
        return tm(xt)

    def tgrad():
      xx = xt.detach().requires_grad_(True)
      return torch.autograd.grad(torch.nn.functional.cross_entropy(tm(xx), yt, reduction='sum'),
                                 xx)[0]

    fns['torch fwd'], fns['torch grad'] = tfwd, tgrad
  t = timing.compare(fns, repeats=settings.n(7, 1), warmup=2)
  out['steps'] = {k: {'wall': v.wall, 'cpu': v.cpu} for k, v in t.items()}
  out['flops_grad'] = timing.flops_of(grad, victim.logits_fn, xj)
  out['xla'] = xla_profile(fns['jax grad'], settings.n(10, 1))
  out['xla_old'] = xla_profile(fns['jax grad (nnx.max_pool)'], settings.n(10, 1))
  if torch is not None:
    out['torch'] = torch_profile(torch, fns['torch grad'], settings.n(5, 1))
  return out


# ---------------------------------------------------------------------------------------------
# Driver.


def _flag_worker(args) -> None:
  settings = timing.Settings(smoke=args.smoke, repeats=args.repeats)
  torch = timing.torch_or_none()
  t, success, _ = _measure(settings, torch, ('library', 'old_pool'))
  out = {name: dict(dataclasses.asdict(tm), success=success[name]) for name, tm in t.items()}
  out['devices'] = jax.device_count()
  print('RESULT ' + json.dumps(out), flush=True)


def _run_flag(flags: str, settings) -> dict:
  """The worker's results under XLA_FLAGS += `flags`, or {'error': its stderr's tail}."""
  args = ['--worker', '--repeats', str(settings.repeats)] + (['--smoke'] if settings.smoke else [])
  try:
    return timing.run_worker('benchmarks.bench_levers', args, flags)
  except timing.WorkerError as e:
    return {'error': e.stderr[-400:]}


LABELS = {
    'library': 'ours: library attack as shipped (unrolled, max-pool as 4 strided slices)',
    'old_pool': 'ours: the same with nnx.max_pool (reduce_window; the form before this study)',
    'scan': 'ours: traced under loop_form("scan") (rolled loop)',
    'nchw': 'ours: pure-JAX model in NCHW',
    'col2im': 'ours: first convolution\'s input gradient as col2im (9 padded slices, one matmul)',
    'bf16': 'ours: weights and activations in bfloat16',
    'donate': 'ours: x donated to the jitted attack (fresh copy per call)',
    'torch_cl': 'PyTorch eager, channels_last, all cores',
    'torch_nchw': 'PyTorch eager, NCHW, 2 threads',
    'torch_cl_1thread': 'PyTorch eager, channels_last, 1 thread',
}


def run(settings: timing.Settings) -> list[timing.Row]:
  """Returns one Row per variant; the flag study and profile ride in rows[0].extra."""
  torch = timing.torch_or_none()
  device = timing.device_label()
  print('  in-process variants', flush=True)
  t, success, s = _measure(settings, torch, ('library', 'old_pool', 'col2im') if settings.smoke
                           else ('library', 'old_pool', 'scan', 'nchw', 'col2im', 'bf16', 'donate'))
  ref, ref_name = timing.fastest_reference(t)
  ref_label, ref_t = ((LABELS[ref_name], ref) if ref is not None
                      else (timing.NOT_INSTALLED, timing.NOT_INSTALLED))
  victim = s['victim']
  same = float(np.max(np.abs(
      np.asarray(s['old_fn'](s['x'])) - np.asarray(victim.logits_fn(s['x'])))))
  print(f'    nnx.max_pool model: max |logit difference| to the library model {same:.1e}',
        flush=True)
  rows = []
  for name, tm in t.items():
    rows.append(timing.Row(
        NAME, f'PGD-{s["steps"]} L∞ cnn_small, batch {s["batch"]}: {LABELS[name]}',
        ref_label, name, ref_t, tm,
        check=f'success {100 * success[name]:.1f}%', device=device, date=settings.date,
        extra={'variant': name, 'old_pool_logit_diff': same}))
    print(f'    {name}: {tm.wall:.3f} s wall, {tm.cpu:.3f} s CPU, success '
          f'{100 * success[name]:.1f}%', flush=True)
  flags = {}
  for f in (FLAGS if not settings.smoke else ()):  # smoke: no extra processes
    print(f'  XLA_FLAGS={f or "(defaults)"}', flush=True)
    flags[f] = _run_flag(f, settings)
    print('    ' + ', '.join(f'{k} {v["wall"]:.3f} s' for k, v in flags[f].items()
                             if isinstance(v, dict)), flush=True)
  print('  profile of one gradient step', flush=True)
  prof = _profile(settings, torch, s)
  rows[0].extra.update(flags=flags, profile=prof)
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--worker', action='store_true')
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  if not args.worker:
    parser.error('run benchmarks through benchmarks/run.py; --worker is its internal mode')
  _flag_worker(args)


if __name__ == '__main__':
  main()
