"""Attacks: the library's jitted batch attacks against PyTorch eager references (rows 1 and 2).

For each victim (the SynthParts CNN M and a ResNet-18) the PyTorch twin gets the same weights
(`torch_models.from_nnx`, logits checked to 1e-4 first), the same 128 images and labels, the same
hyper-parameters and the same random start. Both sides are timed interleaved (timing.compare);
their success rates must agree within a few points or the row is marked CHECK FAILED (and run.py
exits non-zero), since a faster attack that finds fewer adversarial examples proves nothing.

  PGD-20 L∞: eps 8/255, step 2/255; PGD-20 L2: eps 0.5, step 0.1; both with a random start.
  MI-FGSM-20 L∞ (decay 1), APGD-CE-20 L∞ (eps 8/255), CW-L2 (2 rounds x 20 Adam steps, lr 0.01,
  c0 = 0.1), DeepFool (up to 20 steps, overshoot 0.02): on the SynthParts victim.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing, victims
from unmask_jax import attacks
from unmask_jax.attacks import apgd, common, cw, deepfool, mifgsm, pgd

NAME = 'attacks'
LINF_EPS, LINF_STEP = 8 / 255, 2 / 255
L2_EPS, L2_STEP = 0.5, 0.1
DEEPFOOL_INFO: dict = {}  # iterations the eager DeepFool ran before every example was fooled


@dataclasses.dataclass
class Case:
  section: str
  label: str
  norm: str
  eps: float | None
  jax_attack: Callable          # not jitted; (logits_fn, x, y, key) -> x_adv
  torch_attack: Callable | None  # (tmodel, x, y, x0) -> x_adv, NCHW tensors
  random_start: bool
  minimal_norm: bool = False


def _cases(steps: int, smoke: bool) -> dict[str, list[Case]]:
  try:  # The references are only called when torch is importable.
    from benchmarks import torch_attacks as ta  # pylint: disable=import-outside-toplevel
  except ImportError:
    ta = None
  p = functools.partial
  # Budgets a little below the papers' (APGD 100 steps, CW 9 x 1000, DeepFool 50) keep the unrolled
  # programs' compile times and the run's length reasonable on 2 cores; both sides use the same.
  apgd_steps = 1 if smoke else 20
  cw_steps, cw_rounds = (1, 1) if smoke else (20, 2)
  df_steps = 1 if smoke else 20
  pgd_rows = [
      Case('pgd', f'PGD-{steps} L∞', 'linf', LINF_EPS,
           p(pgd.pgd_linf, eps=LINF_EPS, step_size=LINF_STEP, steps=steps),
           lambda m, x, y, x0: ta.pgd(m, x, y, x0, norm='linf', eps=LINF_EPS,
                                      step_size=LINF_STEP, steps=steps), True),
      Case('pgd', f'PGD-{steps} L2', 'l2', L2_EPS,
           p(pgd.pgd_l2, eps=L2_EPS, step_size=L2_STEP, steps=steps),
           lambda m, x, y, x0: ta.pgd(m, x, y, x0, norm='l2', eps=L2_EPS, step_size=L2_STEP,
                                      steps=steps), True),
  ]
  others = [
      Case('other', f'MI-FGSM-{steps} L∞', 'linf', LINF_EPS,
           p(mifgsm.mifgsm_linf, eps=LINF_EPS, step_size=LINF_STEP, steps=steps),
           lambda m, x, y, x0: ta.mifgsm(m, x, y, norm='linf', eps=LINF_EPS,
                                         step_size=LINF_STEP, steps=steps), False),
      Case('other', f'APGD-CE-{apgd_steps} L∞', 'linf', LINF_EPS,
           p(apgd.apgd_linf, eps=LINF_EPS, steps=apgd_steps),
           lambda m, x, y, x0: ta.apgd(m, x, y, x0, norm='linf', eps=LINF_EPS,
                                       steps=apgd_steps), True),
      Case('other', f'CW-L2 ({cw_rounds}x{cw_steps} steps)', 'l2', None,
           p(cw.cw_l2, steps=cw_steps, binary_search_steps=cw_rounds, initial_const=0.1),
           lambda m, x, y, x0: ta.cw_l2(m, x, y, steps=cw_steps, binary_search_steps=cw_rounds,
                                        initial_const=0.1), False, minimal_norm=True),
      Case('other', f'DeepFool (≤{df_steps} steps)', 'l2', None,
           p(deepfool.deepfool, steps=df_steps),
           lambda m, x, y, x0: ta.deepfool(m, x, y, steps=df_steps, info=DEEPFOOL_INFO), False,
           minimal_norm=True),
  ]
  return {'cnn_small': pgd_rows + others, 'resnet18': pgd_rows}


def _perturbation(norm: str, x_adv: np.ndarray, x: np.ndarray) -> np.ndarray:
  d = (x_adv - x).reshape(len(x), -1)
  return np.abs(d).max(1) if norm == 'linf' else np.sqrt((d * d).sum(1))


def _describe(case: Case, succ: np.ndarray, size: np.ndarray) -> str:
  s = f'{100 * succ.mean():.1f}%'
  if case.minimal_norm:
    s += f' (median L2 {np.median(size[succ]):.3f})' if succ.any() else ''
  return s


def _prepare(victim, x, torch, batch):
  """Per-victim inputs for both sides (and the PyTorch twin, checked), or no twin without torch."""
  y = victims.predictions(victim.logits_fn, x)
  v = {'victim': victim, 'y': y, 'xj': jnp.asarray(x), 'yj': jnp.asarray(y), 'tmodel': None,
       'where': f'{victim.name} ({victim.params:,} params, {victim.weights}), batch {batch} 32x32'}
  print(f'  {v["where"]}', flush=True)
  if torch is not None:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    v['tmodel'] = torch_models.from_nnx(victim.model)
    diff = torch_models.check_same_logits(victim.model, v['tmodel'], x)
    print(f'    PyTorch twin: max |logit difference| {diff:.2e}', flush=True)
    v['xt'] = torch_models.to_torch_images(x, channels_last=True)
    v['yt'] = torch.from_numpy(y).long()
  return v


def run(settings: timing.Settings) -> list[timing.Row]:
  torch = timing.torch_or_none()
  batch = settings.n(128, 4)
  steps = settings.n(20, 1)
  tol = 0.05 if not settings.smoke else 1.0  # success-rate agreement (share of the batch)
  x = victims.images(batch)['image']
  key = jax.random.key(0)
  device = timing.device_label()
  cases = _cases(steps, settings.smoke)
  prepared = [_prepare(v, x, torch, batch)
              for v in (victims.cnn_small(trained=not settings.smoke), victims.resnet18())]
  jobs = [(p, case) for p in prepared for case in cases[p['victim'].name]]
  # Compile every attack first, two at a time (XLA compiles in C++ without the GIL): compilation
  # is excluded from the timings anyway, and this halves its wall time on 2 cores.
  # Attacks that drive their loops from the host (DeepFool, CW-L2, long APGD runs:
  # `attacks.compiles_itself`) are timed as compile_attack returns them: called, not jitted whole;
  # their first call compiles their programs (its wall time is the "compile" column).
  host = [attacks.compiles_itself(case.jax_attack.func) for _, case in jobs]
  print(f'  compiling {len(jobs)} attacks', flush=True)
  compiled = iter(timing.compile_all(
      [(jax.jit(case.jax_attack), (p['victim'].logits_fn, p['xj'], p['yj'], key))
       for (p, case), h in zip(jobs, host) if not h]))
  rows = []
  for (p, case), h in zip(jobs, host):
    if h:
      t0 = time.perf_counter()
      jax.block_until_ready(case.jax_attack(p['victim'].logits_fn, p['xj'], p['yj'], key))
      exe, lowered, compile_s = case.jax_attack, None, time.perf_counter() - t0
    else:
      exe, lowered, compile_s = next(compiled)
    victim, y, xj, yj, tmodel = p['victim'], p['y'], p['xj'], p['yj'], p['tmodel']
    fns = {'ours': lambda exe=exe, f=victim.logits_fn, xj=xj, yj=yj: exe(f, xj, yj, key)}
    if tmodel is not None:
      from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
      # The JAX attack's restart 0 starts from random_start(fold_in(key, 0)): give the
      # reference the very same start.
      x0 = (np.asarray(common.random_start(case.norm, jax.random.fold_in(key, 0), xj, case.eps))
            if case.random_start else x)
      x0t = torch_models.to_torch_images(x0, channels_last=True)
      fns.update(timing.torch_contenders(
          torch, lambda case=case, tmodel=tmodel, xt=p['xt'], yt=p['yt'], x0t=x0t:
          case.torch_attack(tmodel, xt, yt, x0t)))
    # Compiled above, so one warm-up call per contender suffices.
    outs = {}
    t = timing.compare(fns, repeats=settings.repeats, warmup=1,
                       budget_s=None if settings.smoke else 60, alternatives=timing.torch_pair(),
                       outputs=outs)
    ref_t, threads = timing.best_torch(t) if tmodel is not None else (timing.NOT_INSTALLED, 0)
    adv = np.asarray(outs['ours'])
    succ = victims.predictions(victim.logits_fn, adv) != y
    size = _perturbation(case.norm, adv, x)
    check = f'success ours {_describe(case, succ, size)}'
    failed = False
    if case.eps is not None and size.max() > case.eps * (1 + 1e-5) + 1e-6:
      check += f'; ours exceeds eps ({size.max():.4g} > {case.eps:.4g})'
      failed = True
    if tmodel is not None:
      adv_ref = torch_models.to_nhwc(outs['ref'])
      succ_ref = victims.predictions(victim.logits_fn, adv_ref) != y
      size_ref = _perturbation(case.norm, adv_ref, x)
      check += f', ref {_describe(case, succ_ref, size_ref)}'
      if case.label.startswith('DeepFool') and 'iterations' in DEEPFOOL_INFO:
        check += f'; ref stopped after {DEEPFOOL_INFO["iterations"]} iterations (all fooled)'
      if abs(succ.mean() - succ_ref.mean()) > tol:
        failed = True
    if failed:
      check = 'CHECK FAILED: ' + check
    flops = None if lowered is None else timing.flops_of_lowered(lowered)
    ours_t = t['ours']
    ours_t.first_call = compile_s
    rows.append(timing.Row(
        section=NAME, workload=f'{case.label}, {victim.name}, batch {batch}',
        reference=(f'PyTorch eager (channels_last, {threads} thread{"s" * (threads > 1)})'
                   if tmodel is not None else timing.NOT_INSTALLED),
        ours_label=('library attack, host-driven loops' if h else 'jax.jit attack (library)'),
        ref=ref_t,
        ours=ours_t, check=check, device=device, date=settings.date,
        flops=timing.flops_share(flops, ours_t.wall),
        extra={'case': case.section, 'victim': victim.name, 'weights': victim.weights,
               'compile_s': compile_s, 'failed': failed, 'flops': flops,
               'torch_all_threads': t.get('ref'), 'torch_1_thread': t.get('ref_1t')}))
    r = rows[-1].ratio()
    print(f'    {case.label}, {victim.name}: ours {ours_t.wall:.3f} s (compile {compile_s:.1f} s)'
          + (f', ref {ref_t.wall:.3f} s ({threads} thread(s); all-core {t["ref"].wall:.3f} s), '
             f'ratio {r:.2f}x' if r else '') + f'; {check}',
          flush=True)
  return rows
