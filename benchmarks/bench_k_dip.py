"""Part extractor K and Deep Image Prior throughput (row 4).

  K     images/s of the U-Net K (configs/synthparts_k.py: width 16, 3 levels; random weights, which
        cost the same as trained ones) plus the part-extraction rule, at 32x32 (batch 128) and
        150x150 (the paper's size; batch 16): one jitted program vs the PyTorch eager twin
        (`torch_models.TorchUNet`, same weights, output checked) with the same extraction in torch.
  DIP   images restored per minute by deep_protection.dip_restore, a batch restored at once
        (vmapped generators, chunk = batch) vs the same images one by one (chunk = 1), with the
        same keys, so the restorations must agree.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing, victims
from unmask_jax.defenses import deep_protection
from unmask_jax.models import functional, part_extraction

NAME = 'k_dip'
# The extraction thresholds of a trained K are read from its extraction.json; these are typical.
MIN_AREA, MIN_CONF = 3.0, 0.5


@jax.jit
def _k_parts(segment_fn, x):
  return part_extraction.extract_parts(segment_fn(x), MIN_AREA, MIN_CONF)


def _torch_parts(torch, tmodel, xt):
  with torch.no_grad():
    logits = tmodel(xt)                                  # [N, P+1, H, W]
    probs = torch.softmax(logits, 1)
    winner = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2)
    confident = winner * (probs >= MIN_CONF)
    area = confident.sum((2, 3))[:, 1:]
    return (area >= MIN_AREA).float()


def _k_rows(settings, device, torch):
  k = victims.unet()
  seg = functional.segment_fn(k)
  rows = []
  tmodel = None
  if torch is not None:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    tmodel = torch_models.from_nnx(k)
  for size, batch in ((32, settings.n(128, 4)), (150, settings.n(16, 2))):
    x = victims.images(batch, size=size)['image']
    xj = jnp.asarray(x)
    fns = {'ours': lambda xj=xj: _k_parts(seg, xj)}
    check = ''
    if tmodel is not None:
      torch_models.check_same_logits(k, tmodel, x[:2])
      xt = torch_models.to_torch_images(x, channels_last=True)
      fns.update(timing.torch_contenders(torch, lambda xt=xt: _torch_parts(torch, tmodel, xt)))
    outs = {}
    t = timing.compare(fns, repeats=settings.repeats, warmup=settings.n(2, 1),
                       alternatives=timing.torch_pair(), outputs=outs)
    ref_t, threads = timing.best_torch(t) if tmodel is not None else (timing.NOT_INSTALLED, 0)
    if tmodel is not None:
      agree = float(np.mean(np.asarray(outs['ours']) == outs['ref'].numpy()))
      check = f'part sets agree on {100 * agree:.2f}% of (image, part) pairs'
      if agree < 0.99:
        check = 'CHECK FAILED: ' + check
    ours = t['ours']
    print(f'    K {size}x{size}: ours {batch / ours.wall:.0f} img/s'
          + (f', torch {batch / ref_t.wall:.0f} img/s ({threads} thread(s))' if 'ref' in t
             else ''), flush=True)
    rows.append(timing.Row(
        NAME, f'K (U-Net) forward + part extraction, {size}x{size}, batch {batch}',
        (f'PyTorch eager (channels_last, {threads} thread{"s" * (threads > 1)})'
         if tmodel is not None else timing.NOT_INSTALLED),
        'jit(segment_fn + extract_parts)', ref_t, ours, check=check,
        device=device, date=settings.date, unit='img/s', work=batch,
        extra={'failed': check.startswith('CHECK FAILED')}))
  return rows


def _dip_rows(settings, device):
  # Smoke: one image, so that 'batch' and 'one by one' share one (small) compiled program.
  n = settings.n(16, 1)
  iters = settings.n(50, 2)
  cfg = deep_protection.DIPConfig() if not settings.smoke else deep_protection.DIPConfig(
      widths=(4,), input_depth=2, skip_channels=2)
  x = victims.images(n)['image']
  key = jax.random.key(0)
  fns = {'batch': lambda: deep_protection.dip_restore(x, key, iters=iters, cfg=cfg,
                                                      check_every=iters, chunk=n),
         'single': lambda: deep_protection.dip_restore(x, key, iters=iters, cfg=cfg,
                                                       check_every=iters, chunk=1)}
  outs = {}
  t = timing.compare(fns, repeats=settings.n(3, 1), warmup=1, outputs=outs)
  diff = float(np.max(np.abs(outs['batch']['restored'] - outs['single']['restored'])))
  per_min = lambda tm: 60 * n / tm.wall
  print(f'    DIP: batch {per_min(t["batch"]):.1f} img/min, one by one '
        f'{per_min(t["single"]):.1f} img/min; max |difference| {diff:.1e}', flush=True)
  widths = ','.join(map(str, cfg.widths))
  return [timing.Row(
      NAME, f'DIP restoration, {n} images 32x32, {iters} iterations (widths {widths}, '
      f'input depth {cfg.input_depth})', 'dip_restore one image at a time (chunk=1)',
      f'dip_restore batch (chunk={n})', t['single'], t['batch'],
      check=f'restorations agree to {diff:.1e}', device=device, date=settings.date,
      unit='img/min', work=n * 60)]


def run(settings: timing.Settings) -> list[timing.Row]:
  torch = timing.torch_or_none()
  device = timing.device_label()
  return _k_rows(settings, device, torch) + _dip_rows(settings, device)
