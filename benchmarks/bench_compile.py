"""Time to first result per attack: compile, first call, steady state; ours vs PyTorch and foolbox.

Issue #15: every iterative attack of the library (jax.jit) against the PyTorch eager references
and foolbox, at several step counts.

For each attack and step count, on the SynthParts CNN victim (benchmarks/victims.py: trained
weights from runs/main/m_cs3a when present, else a seeded random init; the output says which),
128 SynthParts images, labels = the model's clean predictions, L∞ eps 8/255 and L2 eps 0.5 (as in
benchmarks/bench_attacks.py):

  compile       wall seconds of `jax.jit(fresh partial).lower(...).compile()` (tracing, lowering
                and XLA compilation). A new `functools.partial` per measurement, so that no trace is
                reused, and XLA's persistent compilation cache switched off, so that nothing comes
                from disk: every attack and step count pays its full compilation.
  first result  compile + the first call of the compiled attack (`block_until_ready`): what a user
                waits for before the first x_adv.
  steady        median wall seconds of `--repeats` further calls (interleaved with the references').
  PyTorch       the eager reference of benchmarks/torch_attacks.py where one exists, on the same
                weights (torch_models.from_nnx, logits checked to 1e-4), images, labels,
                hyper-parameters and random start: its first call in this process and its
                steady state. PyTorch has nothing to compile; its first call pays only one-off
                kernel set-up.
  foolbox       foolbox 3 (when importable; not a dependency, see benchmarks/requirements.txt) on
                the same PyTorch twin (`foolbox.PyTorchModel(twin, bounds=(0, 1))`), images,
                labels, eps, absolute step sizes and random start, for the attacks it has: fgsm,
                bim, pgd_linf, pgd_l2, mifgsm_linf, mifgsm_l2 (its momentum accumulates the
                normalised step; same cost), deepfool, cw_l2 (foolbox abort_early=False) and
                cw_l2_abort (the library's cw_l2 with abort_early=True against foolbox's default
                abort_early=True). Timed like PyTorch (first call, steady state, thread counts);
                its success rate is recorded and its eps-bounded outputs checked against eps.
  loop form     how the library compiled the attack's loops at this step count, recorded while
                tracing (unmask_jax.attacks.common: `iterate` -> current_loop_form, `iterate_until`
                -> its unrolled prefix + while loop, `over_runs` -> unrolled or a while over runs).

Attacks (row names): fgsm (once: it has no steps), bim, pgd_linf, pgd_l2, mifgsm_linf,
mifgsm_l2, apgd_linf, apgd_l2, apgd_t_linf, cw_l2 (steps per binary-search round, `--cw-rounds`
rounds), cw_l2_abort (the same with abort_early=True), deepfool, fab_t, square_linf (queries = the
step count), autoattack (L∞ standard composite with steps = the step count and `--aa-queries`
Square queries); also apgd_t_l2 and square_l2 on request. `adaptive` is not timed (it needs a
defense to attack). Without torch (or foolbox) the table says so in those cells.

Goals (issue #15): no attack takes more than 30 s to compile at any step count on the 2-core CPU
(a compile above that is flagged MISS in the table); DeepFool and CW-L2 at >= 1x foolbox (steady
state, same images), stated per step count below the table with the numbers.

Attacks that drive their loops from the host (PGD, BIM, MI-FGSM, APGD, APGD-T, FAB-T, DeepFool,
CW-L2, AutoAttack: `attacks.compiles_itself`) have no single program to compile ahead of time: their compile time is
what JAX reports spent tracing, lowering and compiling during one call with their programs
forgotten, so they are called once at every step count, also above `--call-max-steps`.

Step counts above `--call-max-steps` are compiled only (no calls), to bound the run's length:
on XLA:CPU every step above MAX_UNROLL = 100 runs in a rolled loop at ~85 ms per gradient step
of batch 128, so one call of a 1000-step attack takes ~1.5 min (BENCHMARKS.md).

  python3 -m benchmarks.bench_compile                    # 20, 100 (timed), 1000 (compile only)
  python3 -m benchmarks.bench_compile --call-max-steps 1000 --repeats 3 2 0   # 1000 called too
  python3 -m benchmarks.bench_compile --attacks pgd_linf cw_l2 --steps 20 --out /tmp/t.md
  python3 -m benchmarks.bench_compile --smoke            # tiny model and batch, steps 2 and 3

The default run took ~12 min on 2 cores before the foolbox contenders and the cw_l2_abort rows
were added; expect a few minutes more with foolbox installed (not yet measured). It is also
the 'compile' benchmark of benchmarks/run.py (`run(settings)`), whose BENCHMARKS.md then shows
this run's table. Writes a markdown section (default benchmarks/records/4_time_to_first_result.md,
which benchmarks/report.py includes in BENCHMARKS.md; --smoke writes to a temporary file unless
--out is given) and, with --json, the raw results.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import report, timing, victims  # pylint: disable=wrong-import-position
from unmask_jax import attacks  # pylint: disable=wrong-import-position
from unmask_jax.attacks import common  # pylint: disable=wrong-import-position

LINF_EPS = 8 / 255
L2_EPS = 0.5  # as benchmarks/bench_attacks.py (32x32 images)
GOAL_COMPILE_S = 30.0
DEFAULT_OUT = os.path.join(REPO, 'benchmarks', 'records', '4_time_to_first_result.md')
DEFAULT_STEPS = (20, 100, 1000)
SMOKE_STEPS = (2, 3)
SMOKE_ATTACKS = ('fgsm', 'pgd_linf', 'deepfool', 'cw_l2_abort')
# Columns of the markdown table (the test checks them).
COLUMNS = ('attack', 'steps', 'loop form', 'compile s', 'first result s', 'steady s',
           'PyTorch first s', 'PyTorch steady s', 'ratio steady (PyTorch / ours)',
           'ratio first result (PyTorch / ours)', 'foolbox first s', 'foolbox steady s',
           'ratio steady (foolbox / ours)', 'ratio first result (foolbox / ours)',
           'compile goal (<= 30 s)', 'success ours / PyTorch / foolbox')
# Issue #15's goal against foolbox: these attacks at >= 1x foolbox, steady state, same images.
FOOLBOX_GOAL = ('deepfool', 'cw_l2_abort', 'cw_l2')


# ---------------------------------------------------------------------------------------------
# The attacks: registry parameters at a step count, and their PyTorch references.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
  """One attack of the benchmark.

  params(steps, args) -> the registry parameters; torch(ta, m, x, y, x0, steps, args) -> x_adv
  (NCHW tensors) or None without a reference; start: the references' start point, 'random' (the
  library's random start of restart 0) or 'clean'; foolbox: its foolbox counterpart (below).
  """
  name: str
  norm: str
  eps: float | None
  budget: str                 # what the step count counts: steps, per target, per round, queries
  params: Callable
  torch: Callable | None = None
  start: str = 'clean'
  stepless: bool = False      # fgsm: measured once
  # foolbox(fa, steps, args) -> (foolbox attack, epsilon or None), fa = foolbox.attacks; a random
  # start is replaced by the library's (see _fixed_start). None: foolbox has no such attack.
  foolbox: Callable | None = None
  registry: str | None = None  # the registry name when it differs from `name`

  @property
  def attack(self) -> str:
    return self.registry or self.name


def _alpha(eps, steps):
  return common.default_step_size(eps, steps, None)


def _cw(abort_early: bool):
  return lambda fa, s, a: (fa.L2CarliniWagnerAttack(
      binary_search_steps=a.cw_rounds, steps=s, stepsize=0.01, confidence=0.0,
      initial_const=a.cw_const, abort_early=abort_early), None)  # stepsize = our lr (0.01)


def _cases() -> dict[str, Case]:
  L, E = LINF_EPS, L2_EPS
  cases = [
      Case('fgsm', 'linf', L, 'one step', lambda s, a: dict(eps=L),
           lambda ta, m, x, y, x0, s, a: ta.pgd(m, x, y, x, norm='linf', eps=L, step_size=L,
                                                steps=1), stepless=True,
           foolbox=lambda fa, s, a: (fa.LinfFastGradientAttack(random_start=False), L)),
      Case('bim', 'linf', L, 'steps', lambda s, a: dict(eps=L, steps=s),
           lambda ta, m, x, y, x0, s, a: ta.pgd(m, x, y, x, norm='linf', eps=L,
                                                step_size=_alpha(L, s), steps=s),
           foolbox=lambda fa, s, a: (fa.LinfBasicIterativeAttack(
               abs_stepsize=_alpha(L, s), steps=s, random_start=False), L)),
      Case('pgd_linf', 'linf', L, 'steps', lambda s, a: dict(eps=L, steps=s),
           lambda ta, m, x, y, x0, s, a: ta.pgd(m, x, y, x0, norm='linf', eps=L,
                                                step_size=_alpha(L, s), steps=s), 'random',
           foolbox=lambda fa, s, a: (fa.LinfProjectedGradientDescentAttack(
               abs_stepsize=_alpha(L, s), steps=s, random_start=True), L)),
      Case('pgd_l2', 'l2', E, 'steps', lambda s, a: dict(eps=E, steps=s),
           lambda ta, m, x, y, x0, s, a: ta.pgd(m, x, y, x0, norm='l2', eps=E,
                                                step_size=_alpha(E, s), steps=s), 'random',
           foolbox=lambda fa, s, a: (fa.L2ProjectedGradientDescentAttack(
               abs_stepsize=_alpha(E, s), steps=s, random_start=True), E)),
      Case('mifgsm_linf', 'linf', L, 'steps', lambda s, a: dict(eps=L, steps=s),
           lambda ta, m, x, y, x0, s, a: ta.mifgsm(m, x, y, norm='linf', eps=L,
                                                   step_size=_alpha(L, s), steps=s),
           foolbox=lambda fa, s, a: (fa.LinfMomentumIterativeFastGradientMethod(
               momentum=1.0, abs_stepsize=_alpha(L, s), steps=s, random_start=False), L)),
      Case('mifgsm_l2', 'l2', E, 'steps', lambda s, a: dict(eps=E, steps=s),
           lambda ta, m, x, y, x0, s, a: ta.mifgsm(m, x, y, norm='l2', eps=E,
                                                   step_size=_alpha(E, s), steps=s),
           foolbox=lambda fa, s, a: (fa.L2MomentumIterativeFastGradientMethod(
               momentum=1.0, abs_stepsize=_alpha(E, s), steps=s, random_start=False), E)),
      Case('apgd_linf', 'linf', L, 'steps', lambda s, a: dict(eps=L, steps=s),
           lambda ta, m, x, y, x0, s, a: ta.apgd(m, x, y, x0, norm='linf', eps=L, steps=s),
           'random'),
      Case('apgd_l2', 'l2', E, 'steps', lambda s, a: dict(eps=E, steps=s),
           lambda ta, m, x, y, x0, s, a: ta.apgd(m, x, y, x0, norm='l2', eps=E, steps=s),
           'random'),
      Case('apgd_t_linf', 'linf', L, 'per target', lambda s, a: dict(eps=L, steps=s)),
      Case('apgd_t_l2', 'l2', E, 'per target', lambda s, a: dict(eps=E, steps=s)),
      # CW-L2 as the library runs it by default (every step of every round), against references
      # that do not abort either: the PyTorch one and foolbox with abort_early=False.
      Case('cw_l2', 'l2', None, 'per round',
           lambda s, a: dict(steps=s, binary_search_steps=a.cw_rounds,
                             initial_const=a.cw_const),
           lambda ta, m, x, y, x0, s, a: ta.cw_l2(m, x, y, steps=s,
                                                  binary_search_steps=a.cw_rounds,
                                                  initial_const=a.cw_const),
           foolbox=_cw(False)),
      # CW-L2 with Carlini's early abort on both sides: foolbox's default (abort_early=True; its
      # check is on the batch's summed loss) against the library's abort_early=True (per example).
      Case('cw_l2_abort', 'l2', None, 'per round',
           lambda s, a: dict(steps=s, binary_search_steps=a.cw_rounds,
                             initial_const=a.cw_const, abort_early=True),
           foolbox=_cw(True), registry='cw_l2'),
      Case('deepfool', 'l2', None, 'steps', lambda s, a: dict(steps=s),
           lambda ta, m, x, y, x0, s, a: ta.deepfool(m, x, y, steps=s),
           foolbox=lambda fa, s, a: (fa.L2DeepFoolAttack(
               steps=s, candidates=10, overshoot=0.02, loss='logits'), None)),
      Case('fab_t', 'linf', L, 'per target', lambda s, a: dict(eps=L, steps=s)),
      Case('square_linf', 'linf', L, 'queries', lambda s, a: dict(eps=L, queries=s)),
      Case('square_l2', 'l2', E, 'queries', lambda s, a: dict(eps=E, queries=s)),
      Case('autoattack', 'linf', L, 'steps',
           lambda s, a: dict(eps=L, steps=s, queries=a.aa_queries or s)),
  ]
  return {c.name: c for c in cases}


CASES = _cases()
DEFAULT_ATTACKS = tuple(n for n in CASES if n not in ('apgd_t_l2', 'square_l2'))


# ---------------------------------------------------------------------------------------------
# The loop form the library chose, recorded while tracing.
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def record_loop_forms():
  """Records, while attacks are traced inside, how `unmask_jax.attacks.common` compiles their
  loops; yields the list of events (strings, in trace order).

  `iterate` -> '<current_loop_form(steps)> <steps>' (e.g. 'unrolled 20', 'scan 1000');
  `iterate_until` -> 'unrolled <n>' when its unrolled prefix covers the loop, else
  'exit <n> (<prefix> unrolled + while)'; `over_runs` -> '<runs> runs unrolled' or '<runs> runs in
  a while'; `host_loop` (a loop driven from the host, recorded per call) -> 'host <n> in chunks
  of <k>' or 'host <n> as one chunk', '+ with exit' when it checks "all done" between programs.
  The library's functions are wrapped (module attributes, which the attacks and common
  itself look up at call time) and restored on exit; what they compute is unchanged.
  """
  names = ('iterate', 'iterate_until', 'over_runs', 'loop_until', 'host_loop')
  orig = {n: getattr(common, n) for n in names}
  events: list[str] = []
  in_exit = [0]  # > 0 while iterate_until (not over_runs) is about to call loop_until

  def iterate(body, carry, steps):
    events.append(f'{common.current_loop_form(steps)} {steps}')
    return orig['iterate'](body, carry, steps)

  def iterate_until(body, carry, steps, done, **kw):
    in_exit[0] += 1
    try:
      return orig['iterate_until'](body, carry, steps, done, **kw)
    finally:
      in_exit[0] -= 1

  def loop_until(body, carry, n, done, *, prefix=0, chunk=1):
    exiting, in_exit[0] = in_exit[0], 0  # loops nested in the body are recorded on their own
    try:
      if exiting:
        p = max(0, min(int(prefix), n))
        events.append(f'unrolled {n}' if p >= n else f'exit {n} ({p} unrolled + while)')
      return orig['loop_until'](body, carry, n, done, prefix=prefix, chunk=chunk)
    finally:
      in_exit[0] = exiting

  def over_runs(body, carry, runs, steps_per_run, done):
    form = common.current_loop_form(runs * steps_per_run)
    events.append(f'{runs} runs unrolled' if form == 'unrolled' else f'{runs} runs in a while')
    return orig['over_runs'](body, carry, runs, steps_per_run, done)

  def host_loop(step, consts, carry, n, *, chunk=None, done=None, first=None, **params):
    size = chunk or common.HOST_CHUNK
    events.append(f'host {n}' + (f' in chunks of {size}' if n > size else ' as one chunk')
                  + (' with exit' if done is not None else ''))
    return orig['host_loop'](step, consts, carry, n, chunk=chunk, done=done, first=first,
                             **params)

  wrappers = {'iterate': iterate, 'iterate_until': iterate_until, 'over_runs': over_runs,
              'loop_until': loop_until, 'host_loop': host_loop}
  for n in names:
    setattr(common, n, wrappers[n])
  try:
    yield events
  finally:
    for n in names:
      setattr(common, n, orig[n])


def summarize_loops(events: list[str]) -> str:
  """The events in trace order, consecutive repeats counted: 'unrolled 20', 'scan 1000',
  '2 runs unrolled; unrolled 20 x2', ...; 'single step' when the attack has no loop."""
  if not events:
    return 'single step'
  runs = [(e, len(list(g))) for e, g in itertools.groupby(events)]
  return '; '.join(e + (f' x{n}' if n > 1 else '') for e, n in runs)


# ---------------------------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------------------------
def _clear_host_programs() -> None:
  """Forgets the programs that host-driven attacks cached (AutoAttack's members too), so that
  the next call compiles."""
  common.host_program.cache_clear()


def compile_host_driven(spec, logits_fn, x, y, key) -> dict:
  """For an attack that compiles itself (`attacks.compiles_itself`: its loops run from the host
  as several jitted programs), the first call after forgetting its programs: compile = the time
  JAX reports spent tracing, lowering and compiling during that call (jax.monitoring), and
  `cold_call_s` = the call's wall time, compilation included (the first result)."""
  _clear_host_programs()
  fn = spec.compile()   # the attack itself, as compile_attack and the runner return it
  spent = {'trace': 0.0, 'lower': 0.0, 'xla': 0.0}
  names = {'/jax/core/compile/jaxpr_trace_duration': 'trace',
           '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
           '/jax/core/compile/backend_compile_duration': 'xla'}

  def listener(name, secs, **_):
    if name in names:
      spent[names[name]] += secs

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with record_loop_forms() as events:
      t0 = time.perf_counter()
      jax.block_until_ready(fn(logits_fn, x, y, key))
      cold = time.perf_counter() - t0
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  lower = spent['trace'] + spent['lower']
  return {'exe': fn, 'lower_s': lower, 'xla_compile_s': spent['xla'],
          'compile_s': lower + spent['xla'], 'cold_call_s': cold, 'host_driven': True,
          'loop_events': list(events), 'loop_form': summarize_loops(events)}


def compile_fresh(spec, logits_fn, x, y, key) -> dict:
  """Compiles a fresh `jax.jit` of the attack; returns the executable, timings and loop form.
  Attacks that compile themselves are measured by `compile_host_driven` instead."""
  if attacks.compiles_itself(spec.fn):
    return compile_host_driven(spec, logits_fn, x, y, key)
  fn = jax.jit(spec.partial())  # a new functools.partial: no trace cache can hit
  with record_loop_forms() as events:
    t0 = time.perf_counter()
    lowered = fn.lower(logits_fn, x, y, key)
    t1 = time.perf_counter()
  exe = lowered.compile()
  t2 = time.perf_counter()
  return {'exe': exe, 'lower_s': t1 - t0, 'xla_compile_s': t2 - t1, 'compile_s': t2 - t0,
          'loop_events': list(events), 'loop_form': summarize_loops(events)}


def _perturbation(norm, adv, x):
  d = (adv - x).reshape(len(x), -1)
  return np.abs(d).max(1) if norm == 'linf' else np.sqrt((d * d).sum(1))


def _timing_dict(t: timing.Timing, first: float, repeats: int) -> dict:
  """First call and steady state (None without timed calls) of one contender, with samples."""
  steady = repeats > 0
  return {'first_call': first, 'steady': t.wall if steady else None,
          'steady_cpu': t.cpu if steady else None, 'walls': t.walls if steady else [],
          'cpus': t.cpus if steady else []}


def _fixed_start(attack, x0t):
  """`attack` (a foolbox gradient-descent attack with random_start=True) starting from the NCHW
  tensor x0t, the library's random start, instead of its own draw (as the PyTorch references
  are given it): the same attack object with `get_random_start` overridden on the instance."""
  import eagerpy as ep  # pylint: disable=import-outside-toplevel
  attack.get_random_start = lambda x0, epsilon: ep.astensor(x0t)
  return attack


def _foolbox_call(case: Case, steps: int, ctx: dict, args, x0t):
  """The zero-argument call of case's foolbox attack: its `run` (the attack itself; `__call__`
  adds a forward pass for the success check and the eps clipping, which `run`'s outputs meet
  already), on the same twin, images and labels as the PyTorch reference."""
  attack, eps = case.foolbox(ctx['foolbox'].attacks, steps, args)
  if case.start == 'random':
    attack = _fixed_start(attack, x0t)
  fmodel, xt, yt = ctx['fmodel'], ctx['xt'], ctx['yt']
  if eps is None:  # a minimisation attack (DeepFool, CW)
    return lambda: attack.run(fmodel, xt, yt)
  return lambda: attack.run(fmodel, xt, yt, epsilon=eps)


def _check(case: Case, adv: np.ndarray, ctx: dict, prefix: str, row: dict) -> None:
  """Success rate (prediction != label), eps check and, for minimum-norm attacks, the median L2
  of the successful examples, of one contender's x_adv (NHWC), into row[prefix + ...]."""
  x, y = ctx['x'], ctx['y']
  if prefix == 'foolbox' and case.eps is None:
    # foolbox's CW returns zeros for an example it never fooled (best_advs starts at zeros); the
    # library returns x there. Count those as failures, as for the library, not as whatever class
    # a black image gets.
    zero = ~adv.reshape(len(adv), -1).any(1) & x.reshape(len(x), -1).any(1)
    row['foolbox_unfound'] = int(zero.sum())
    adv = np.where(zero[:, None, None, None], x, adv)
  succ = victims.predictions(ctx['logits_fn'], adv) != y
  row[f'success_{prefix}'] = float(succ.mean())
  size = _perturbation(case.norm, adv, x)
  if case.eps is not None:
    row[f'{prefix}_max_perturbation'] = float(size.max())
    row[f'{prefix}_eps_exceeded'] = bool(size.max() > case.eps * (1 + 1e-5) + 1e-6)
  else:
    row[f'{prefix}_median_l2'] = float(np.median(size[succ])) if succ.any() else None


def measure(case: Case, steps: int, call: bool, repeats: int, ctx: dict, args) -> dict:
  """One row: compile (always), then (if `call`) the first call and `repeats` timed calls of ours,
  of the PyTorch reference and of foolbox, interleaved."""
  spec = attacks.parse_attack(case.attack, **case.params(steps, args))
  logits_fn, xj, yj, key = (ctx[k] for k in ('logits_fn', 'xj', 'yj', 'key'))
  c = compile_fresh(spec, logits_fn, xj, yj, key)
  exe = c.pop('exe')
  has_torch = case.torch is not None and ctx['tmodel'] is not None
  has_fb = case.foolbox is not None and ctx['fmodel'] is not None
  row = {'attack': case.name, 'spec': str(spec), 'steps': None if case.stepless else steps,
         'budget': case.budget, 'norm': case.norm, 'eps': case.eps, **c,
         'goal_miss': c['compile_s'] > GOAL_COMPILE_S, 'called': call, 'repeats': repeats,
         'ours': None, 'torch': None, 'foolbox': None,
         'torch_reference': 'none in benchmarks/torch_attacks.py' if case.torch is None else
         ('torch not installed' if ctx['tmodel'] is None else 'torch_attacks'),
         'foolbox_reference': (f'none in foolbox {ctx["foolbox_version"]}' if case.foolbox is None
                               and ctx['fmodel'] is not None else
                               'none in foolbox' if case.foolbox is None else
                               ctx['foolbox_missing'] if ctx['fmodel'] is None else 'foolbox')}
  print(f'  {case.name} {row["steps"] or ""}: compile {c["compile_s"]:.1f} s '
        f'(lower {c["lower_s"]:.1f} + XLA {c["xla_compile_s"]:.1f}); loop form: {c["loop_form"]}'
        + ('  ** over the 30 s goal **' if row['goal_miss'] else ''), flush=True)
  if not call:
    return row
  fns = {'ours': lambda: exe(logits_fn, xj, yj, key)}
  x0t = None
  if has_torch or has_fb:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    if case.start == 'random':  # restart 0 of the library starts from fold_in(key, 0)
      x0 = np.asarray(common.random_start(case.norm, jax.random.fold_in(key, 0), xj, case.eps))
      x0t = torch_models.to_torch_images(x0, channels_last=True)
    else:
      x0t = ctx['xt']
  refs = []  # the PyTorch-based contenders: (name, zero-argument call)
  if has_torch:
    from benchmarks import torch_attacks as ta  # pylint: disable=import-outside-toplevel
    tm, xt, yt = ctx['tmodel'], ctx['xt'], ctx['yt']
    refs.append(('torch', lambda: case.torch(ta, tm, xt, yt, x0t, steps, args)))
  if has_fb:
    refs.append(('foolbox', _foolbox_call(case, steps, ctx, args, x0t)))
  pairs = ()
  for name, ref in refs:  # each at one thread count as asked, else at all cores and at 1 thread
    if args.torch_threads:
      fns[name] = timing.with_threads(ctx['torch_module'], args.torch_threads, ref)
    else:  # the slower of the two is dropped after its first call (timing.compare)
      fns.update(timing.torch_contenders(ctx['torch_module'], ref, name))
      pairs += timing.torch_pair(name)
  outs = {}
  if repeats > 0:
    t = timing.compare(fns, repeats=repeats, warmup=1, budget_s=args.budget_s,
                       alternatives=pairs, outputs=outs)
    firsts = {n: t[n].first_call for n in fns}
  else:  # first calls only
    t, firsts = {}, {}
    for n, f in fns.items():
      wall, cpu, outs[n] = timing.timed_call(f)
      firsts[n] = wall
      t[n] = timing.Timing(wall, cpu, [], [], wall)  # no steady-state samples
  for name, _ in refs:
    threads = args.torch_threads or timing.cores()
    if f'{name}_1t' in t or not args.torch_threads:
      # the faster of the two thread counts (by steady state, or first call)
      best, threads = timing.best_torch(t, name)
      chosen = f'{name}_1t' if threads == 1 and f'{name}_1t' in t else name
      row[f'{name}_all_threads'] = _timing_dict(t[name], firsts[name], repeats)
      if f'{name}_1t' in t:
        row[f'{name}_1_thread'] = _timing_dict(t[f'{name}_1t'], firsts[f'{name}_1t'], repeats)
      t[name], firsts[name], outs[name] = best, firsts[chosen], outs.get(chosen, outs[name])
    row[name] = _timing_dict(t[name], firsts[name], repeats)
    row[f'{name}_threads'] = threads
  row['ours'] = _timing_dict(t['ours'], firsts['ours'], repeats)
  # A host-driven attack's first result is its cold call (its programs compile as it runs).
  row['ours']['first_result'] = c.get('cold_call_s') or c['compile_s'] + firsts['ours']
  _check(case, np.asarray(outs['ours']), ctx, 'ours', row)
  row['eps_exceeded'] = row.get('ours_eps_exceeded', False)
  if refs:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    for name, _ in refs:
      _check(case, torch_models.to_nhwc(outs[name]), ctx, name, row)
  o = row['ours']

  def said(name, label):
    r = row[name]
    if r is None:
      return ''
    return (f'; {label}: first {r["first_call"]:.2f} s'
            + (f', steady {r["steady"]:.3f} s' if r['steady'] is not None else '')
            + f' ({row[name + "_threads"]} thr), success {100 * row["success_" + name]:.0f}%')
  print(f'    ours: first result {o["first_result"]:.2f} s (first call {o["first_call"]:.2f} s)'
        + (f', steady {o["steady"]:.3f} s' if o['steady'] is not None else '')
        + f', success {100 * row["success_ours"]:.0f}%' + said('torch', 'PyTorch')
        + said('foolbox', 'foolbox'), flush=True)
  return row


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
def _s(v) -> str:
  return '-' if v is None else report._num(v)   # the main table's number format


def _ratio(a, b) -> str:
  return f'{_s(a / b)}x' if a is not None and b else '-'


def _ref_cells(r: dict, name: str) -> list[str]:
  """first, steady, ratio steady, ratio first result of the reference `name` (torch, foolbox)."""
  t, o = r[name], r['ours']
  if t is None:
    return [r[f'{name}_reference']] * 2 + ['-', '-']
  th = f' ({r[name + "_threads"]} thread{"s" * (r[name + "_threads"] > 1)})'
  return [_s(t['first_call']) + th, _s(t['steady']) + (th if t['steady'] is not None else ''),
          _ratio(t['steady'], o['steady']), _ratio(t['first_call'], o['first_result'])]


def _success(r: dict) -> str:
  cells = [f'{100 * r[k]:.0f}%' if k in r else '-'
           for k in ('success_ours', 'success_torch', 'success_foolbox')]
  out = ' / '.join(cells)
  for k, who in (('ours', 'ours'), ('torch', 'PyTorch'), ('foolbox', 'foolbox')):
    if r.get(f'{k}_eps_exceeded'):
      out += f' ({who} exceeds eps!)'
  return out


def table_rows(rows: list[dict]) -> list[list[str]]:
  out = []
  for r in rows:
    o = r['ours']
    steps = '-' if r['steps'] is None else f'{r["steps"]:,}'
    if r['budget'] not in ('steps', 'one step') and r['steps'] is not None:
      steps += f' {r["budget"]}'
    if not r['called']:
      first = steady = 'compile only'
      refs = ['-'] * 8
      success = '-'
    else:
      first, steady = _s(o['first_result']), _s(o['steady'])
      refs = _ref_cells(r, 'torch') + _ref_cells(r, 'foolbox')
      success = _success(r)
    goal = f'**MISS** ({r["compile_s"]:.1f} s)' if r['goal_miss'] else 'met'
    out.append([r['attack'], steps, r['loop_form'], _s(r['compile_s']), first, steady, *refs,
                goal, success])
  return out


def _where(r: dict) -> str:
  return r['attack'] if r['steps'] is None else f'{r["attack"]} at {r["steps"]:,} {r["budget"]}'


def _median_l2(r: dict, who: str) -> str:
  v = r.get(f'{who}_median_l2')
  return '-' if v is None else f'{v:.3f}'


def foolbox_goal(rows: list[dict], meta: dict) -> list[str]:
  """The lines of issue #15's goal against foolbox: per attack of FOOLBOX_GOAL and step count,
  foolbox's steady state / ours (wall and CPU), met or not, with success and median L2."""
  head = 'Goal (issue #15): DeepFool and CW-L2 at >= 1x foolbox (steady state, same images): '
  if not meta.get('foolbox_timed'):
    return [head + f'not measured (foolbox: {meta["foolbox"]}).']
  sel = [r for r in rows if r['attack'] in FOOLBOX_GOAL and r['called'] and r['foolbox']
         and r['foolbox']['steady'] and r['ours']['steady']]
  if not sel:
    return [head + 'not measured in this run (no called DeepFool or CW-L2 row).']
  what = {'deepfool': 'DeepFool',
          'cw_l2_abort': 'CW-L2 with early abort (foolbox\'s default abort_early=True; ours '
                         'abort_early=True)',
          'cw_l2': 'CW-L2 without early abort (foolbox abort_early=False; ours as default)'}
  lines, missed = [], []
  for r in sel:
    o, f = r['ours'], r['foolbox']
    ratio = f['steady'] / o['steady']
    cpu = (f' (CPU time {f["steady_cpu"] / o["steady_cpu"]:.2f}x)'
           if o.get('steady_cpu') and f.get('steady_cpu') else '')
    budget = '' if r['budget'] == 'steps' else f' {r["budget"]}'
    if ratio >= 1:
      verdict = 'met'
    else:
      verdict = f'**not met**: ours needs {1 / ratio:.2f}x less time'
      missed.append(f'{r["attack"]} at {r["steps"]:,}')
    lines.append(
        f'- {what[r["attack"]]}, {r["steps"]:,} steps{budget}: foolbox {_s(f["steady"])} s '
        f'({r["foolbox_threads"]} thread{"s" * (r["foolbox_threads"] > 1)}) / ours '
        f'{_s(o["steady"])} s = **{ratio:.2f}x**{cpu} -> {verdict}; first result foolbox '
        f'{_s(f["first_call"])} s vs ours {_s(o["first_result"])} s (compile '
        f'{_s(r["compile_s"])} s); success ours {100 * r["success_ours"]:.0f}% / foolbox '
        f'{100 * r["success_foolbox"]:.0f}%, median L2 of the fooled ours {_median_l2(r, "ours")}'
        f' / foolbox {_median_l2(r, "foolbox")}')
  verdict = ('met at every measured step count' if not missed else
             '**not met** at ' + ', '.join(missed))
  return [head + verdict + '.', ''] + lines


def markdown(rows: list[dict], meta: dict) -> str:
  misses = [r for r in rows if r['goal_miss']]
  worst = max(rows, key=lambda r: r['compile_s']) if rows else None
  lines = [
      f'## Time to first result: compile, first call and steady state per attack '
      f'(`benchmarks/bench_compile.py`, measured {meta["date"]})', '',
      f'Command: `{meta["command"]}` ({meta["duration_s"] / 60:.1f} min). '
      f'{meta["victim"]}, batch {meta["batch"]} {meta["size"]}x{meta["size"]}, labels = its clean '
      f'predictions; L∞ eps 8/255, L2 eps {L2_EPS}. Compile = wall time of `jax.jit(fresh '
      'partial).lower(...).compile()` (tracing + lowering + XLA); for the attacks that drive '
      'their loops from the host in jitted chunks (`host ...` loop forms: PGD, BIM, MI-FGSM, '
      'APGD, APGD-T, FAB-T, DeepFool, CW-L2, AutoAttack), the tracing, lowering and XLA time JAX reports (jax.monitoring) '
      'during their first call with their programs forgotten, and first result = that call\'s '
      f'wall time. XLA\'s persistent compilation cache off ({meta["compilation_cache"]}); first '
      'result = compile + the first call; '
      f'steady = median wall time of {meta["repeats_text"]} further calls after it (interleaved '
      'with PyTorch\'s and foolbox\'s, `block_until_ready`; fewer when a measurement passed '
      f'{meta["budget_s"]:.0f} s); step counts above {meta["call_max_steps"]} were compiled only. '
      f'PyTorch: the eager references of `benchmarks/torch_attacks.py` on the same weights '
      f'({meta["torch_note"]}), images, labels, hyper-parameters and random start, '
      f'{meta["torch_threads"]}; its "first" is its first call at that thread count in this '
      'process (nothing to compile). foolbox: '
      f'{meta["foolbox"]}. Ratios: reference time / ours (above 1: ours faster).', '',
      f'- Date: {meta["started"]} to {meta["finished"]}; load average (1/5/15 min, as `uptime`) '
      f'{meta["load_start"]} at the start, {meta["load_end"]} at the end',
      f'- Machine: {meta["cpu"]}; JAX device: {meta["device"]} ({meta["jax_devices"]} JAX '
      f'device(s)); XLA_FLAGS {meta["xla_flags"]}',
      '- Versions: ' + ', '.join(f'{k} {v}' for k, v in meta['versions'].items()),
      f'- Library loop settings: LOOP_FORM = {meta["loop"]["LOOP_FORM"]!r}, MAX_UNROLL = '
      f'{meta["loop"]["MAX_UNROLL"]}, EXIT_PREFIX = {meta["loop"]["EXIT_PREFIX"]}, HOST_CHUNK = '
      f'{meta["loop"].get("HOST_CHUNK", "-")}, HOST_EXIT_CHUNK = '
      f'{meta["loop"].get("HOST_EXIT_CHUNK", "-")}; '
      f'CW-L2: {meta["cw_rounds"]} binary-search rounds, initial const {meta["cw_const"]}; '
      f'AutoAttack: L∞ standard, Square queries {meta["aa_queries"]}', '',
      '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(c) + ' |' for c in table_rows(rows)]
  lines.append('')
  if worst is not None:
    if misses:
      lines.append(f'Goal (every attack compiles in at most {GOAL_COMPILE_S:.0f} s at any step '
                   'count): **not met**: ' + ', '.join(
                       f'{_where(r)} ({r["compile_s"]:.1f} s)' for r in misses)
                   + '.')
    else:
      lines.append(f'Goal (every attack compiles in at most {GOAL_COMPILE_S:.0f} s at any step '
                   f'count): met; longest: {_where(worst)}, {worst["compile_s"]:.1f} s.')
  lines += [''] + foolbox_goal(rows, meta)
  lines += [
      '',
      'Loop form, as recorded while tracing: `unrolled N` / `scan N` = `common.iterate` over N '
      'steps, unrolled into the program or a rolled `lax.scan` (above MAX_UNROLL steps per '
      'program); `exit N (P unrolled + while)` = `common.iterate_until`: P steps unrolled, the '
      'rest a while loop that stops once every example is done; `R runs unrolled` / `R runs in a '
      'while` = `common.over_runs` over CW\'s rounds or the target runs of APGD-T / FAB-T '
      '(a while loop stops once every example is fooled); `xK` = K consecutive copies in the '
      'program (e.g. one per round or target); `host N in chunks of K` = `common.host_loop`: '
      'N steps run from the host as jitted programs of K unrolled steps (`as one chunk`: N <= '
      'K), `with exit` = "every example done" checked on the host after each program; events in '
      'trace (or, for host loops, call) order.',
      '']
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def _victim(smoke: bool):
  if not smoke:
    return victims.cnn_small(trained=True), 128, 32
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from unmask_jax import models  # pylint: disable=import-outside-toplevel
  from unmask_jax.models import functional  # pylint: disable=import-outside-toplevel
  model = models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), widths=(4, 8, 8),
                        feature_dim=16)
  model.eval()
  v = victims.Victim('cnn_small (smoke: widths 4-8-8)', model, functional.logits_fn(model),
                     'random init (seed 0)', functional.param_count(model))
  return v, 4, 32


def _repeats_for(args, steps: list[int]) -> dict[int, int]:
  if args.repeats is None:
    if args.smoke:
      return {s: 1 for s in steps}
    return {s: 3 if s <= 20 else 2 if s <= 100 else 1 for s in steps}
  if len(args.repeats) == 1:
    return {s: args.repeats[0] for s in steps}
  if len(args.repeats) != len(steps):
    raise SystemExit(f'--repeats takes one value or one per --steps value ({len(steps)}), '
                     f'got {len(args.repeats)}')
  return dict(zip(steps, args.repeats))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python3 -m benchmarks.bench_compile', description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n', 2)[2])
  parser.add_argument('--smoke', action='store_true',
                      help='seconds-long toy run: a 4-8-8 CNN, batch 4 at 32x32, steps 2 and 3, '
                      f'attacks {" ".join(SMOKE_ATTACKS)}, 1 repeat; writes to a temporary file '
                      'unless --out is given')
  parser.add_argument('--steps', nargs='+', type=int, metavar='N',
                      help=f'step counts (default {" ".join(map(str, DEFAULT_STEPS))}; smoke '
                      f'{" ".join(map(str, SMOKE_STEPS))})')
  parser.add_argument('--attacks', nargs='+', choices=list(CASES), metavar='NAME',
                      help=f'attacks to time (default: {" ".join(DEFAULT_ATTACKS)}); also '
                      'apgd_t_l2, square_l2')
  parser.add_argument('--repeats', nargs='+', type=int, metavar='R',
                      help='timed calls after the first, per step count (one value for all, or '
                      'one per --steps value; 0: first call only). Default 3 at <= 20 steps, 2 at '
                      '<= 100, 1 above; smoke 1')
  parser.add_argument('--call-max-steps', type=int, default=100, metavar='N',
                      help='call (first result, steady state, PyTorch, foolbox) only at step '
                      'counts <= N; larger ones are compiled only (default 100: a 1000-step call '
                      'takes ~1.5 min on 2 cores)')
  parser.add_argument('--budget-s', type=float, default=60.0,
                      help='stop adding timed calls to a measurement after this many seconds (at '
                      'least one round runs; default 60)')
  parser.add_argument('--cw-rounds', type=int, default=2,
                      help='CW-L2 binary-search rounds (default 2, as BENCHMARKS.md row 2; the '
                      'library default is 9)')
  parser.add_argument('--cw-const', type=float, default=0.1,
                      help='CW-L2 initial constant (default 0.1, as row 2)')
  parser.add_argument('--aa-queries', type=int, default=None,
                      help='Square queries inside AutoAttack (default 5000, the standard '
                      'version; smoke: the step count)')
  parser.add_argument('--torch-threads', type=int, default=None,
                      help='PyTorch (and foolbox) intra-op threads (default: all cores and 1 '
                      'thread, the faster of the two)')
  parser.add_argument('--no-torch', action='store_true',
                      help='skip the PyTorch references and foolbox')
  parser.add_argument('--no-foolbox', action='store_true', help='skip foolbox')
  parser.add_argument('--out', help=f'markdown file to write (default '
                      f'{os.path.relpath(DEFAULT_OUT, REPO)}; smoke: a temporary file)')
  parser.add_argument('--json', help='also write the raw results to this JSON file (rewritten '
                      'after every row, so an interrupted run keeps its rows)')
  return parser


def _foolbox(torch, skip: bool):
  """(the foolbox module or None, why not / its description)."""
  if skip:
    return None, 'skipped with --no-foolbox'
  if torch is None:
    return None, 'not timed (it runs on the PyTorch twin, and torch is not installed)'
  try:
    import foolbox  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, ('not installed here (not a dependency; benchmarks/requirements.txt says '
                  'how to install it), so no foolbox timings')
  import eagerpy  # pylint: disable=import-outside-toplevel
  return foolbox, (
      f'foolbox {foolbox.__version__} (eagerpy {eagerpy.__version__}) on the same PyTorch twin '
      '(`foolbox.PyTorchModel(twin, bounds=(0, 1))`, the same channels_last images and labels), '
      'timed like PyTorch (its thread counts, its first call); the call is the attack\'s `run` '
      '(`__call__` would add a forward pass for the success check and the eps clipping, which '
      '`run`\'s outputs meet already). Same hyper-parameters as ours: absolute step sizes '
      '(`abs_stepsize`), steps, no random start for FGSM / BIM / MI-FGSM, and for PGD the '
      'library\'s random start (foolbox\'s `get_random_start` returns it, as the PyTorch '
      'references are given it); FGSM = LinfFastGradientAttack; BIM = LinfBasicIterativeAttack; '
      'PGD = LinfPGD / L2PGD; MI-FGSM = L∞ / L2 MomentumIterativeFastGradientMethod, momentum 1 '
      '(foolbox accumulates the normalised gradient, sign(g) for L∞ and g / ||g||_2 for L2, where '
      'ours, as Dong et al., accumulates g / ||g||_1: the same cost per step, other iterates); '
      'DeepFool = L2DeepFoolAttack(steps, candidates=10, overshoot=0.02, loss="logits"), as ours '
      '(it also stops once every example is fooled; it runs a forward and backward pass per '
      'candidate class, ours one forward pass and one VJP per candidate other than the label, '
      'one step per host program); CW-L2 = '
      'L2CarliniWagnerAttack(steps, binary_search_steps, stepsize = our lr 0.01, initial_const, '
      'confidence 0) with abort_early=False in the `cw_l2` row (no early abort on any side) and '
      'abort_early=True, foolbox\'s default, in the `cw_l2_abort` row against the library\'s '
      '`cw_l2(..., abort_early=True)` (foolbox checks the loss summed over the batch and stops '
      'the whole batch\'s round, the library checks each example; the PyTorch reference has no '
      'abort, hence no PyTorch cells there); foolbox\'s CW returns zeros for an example it never '
      'fooled, counted as a failure (the library returns x). APGD, APGD-T, FAB-T, Square and '
      'AutoAttack: none in foolbox. Success = share of predictions flipped; the outputs of the '
      'eps-bounded attacks are checked to lie inside eps (a note in the success cell otherwise)')


def measure_all(args, command: str) -> tuple[list[dict], dict, str]:
  """Runs the benchmark as `args` (from _parser()) asks; returns (rows, meta, markdown)."""
  steps = list(args.steps or (SMOKE_STEPS if args.smoke else DEFAULT_STEPS))
  if any(s < 1 for s in steps):
    raise SystemExit('--steps must be >= 1')
  names = list(args.attacks or (SMOKE_ATTACKS if args.smoke else DEFAULT_ATTACKS))
  repeats = _repeats_for(args, steps)
  if args.aa_queries is None and not args.smoke:
    args.aa_queries = 5000

  # Nothing may come from XLA's persistent compilation cache (on only if a directory is set).
  jax.config.update('jax_enable_compilation_cache', False)
  jax.config.update('jax_compilation_cache_dir', None)
  cache = (f'jax_enable_compilation_cache={jax.config.jax_enable_compilation_cache}, '
           f'jax_compilation_cache_dir={jax.config.jax_compilation_cache_dir}')

  torch = None if args.no_torch else timing.torch_or_none()
  foolbox, foolbox_note = _foolbox(torch, args.no_foolbox)

  meta = report.environment(command, timing.Settings(smoke=args.smoke))
  if foolbox is not None:
    meta['versions']['foolbox'] = foolbox.__version__
  meta.update(date=timing.today(), load_end=None, finished=None, duration_s=0.0,
              compilation_cache=cache, foolbox=foolbox_note, foolbox_timed=foolbox is not None,
              budget_s=args.budget_s,
              call_max_steps=args.call_max_steps, cw_rounds=args.cw_rounds,
              cw_const=args.cw_const, aa_queries=args.aa_queries or 'the step count',
              torch_threads=(f'{args.torch_threads} thread(s)' if args.torch_threads else
                             f'on all {timing.cores()} cores and on 1 thread, the faster of the '
                             'two per row (slower one dropped after its first call; thread count '
                             'in the cells)'),
              jax_devices=jax.device_count(), steps=steps, attacks=names,
              repeats={str(k): v for k, v in repeats.items()},
              loop={'LOOP_FORM': common.LOOP_FORM, 'MAX_UNROLL': common.MAX_UNROLL,
                    'EXIT_PREFIX': common.EXIT_PREFIX, 'HOST_CHUNK': common.HOST_CHUNK,
                    'HOST_EXIT_CHUNK': common.HOST_EXIT_CHUNK})
  called = [s for s in steps if s <= args.call_max_steps]
  meta['repeats_text'] = ', '.join(f'{repeats[s]} (at {s})' for s in called) or 'no'
  t_start = time.time()
  print(f'{meta["device"]}, {meta["cpu"]}; jax {meta["versions"]["jax"]}, torch '
        f'{meta["versions"]["torch"]}; load average {meta["load_start"]}; foolbox: '
        f'{foolbox.__version__ if foolbox else foolbox_note}; {cache}', flush=True)

  victim, batch, size = _victim(args.smoke)
  x = victims.images(batch, size=size)['image']
  y = victims.predictions(victim.logits_fn, x)  # also warms up JAX's backend before timing
  ctx = {'logits_fn': victim.logits_fn, 'x': x, 'y': y, 'xj': jnp.asarray(x),
         'yj': jnp.asarray(y), 'key': jax.random.key(0), 'tmodel': None,
         'torch_module': torch, 'foolbox': foolbox, 'fmodel': None,
         'foolbox_version': foolbox.__version__ if foolbox else '',
         'foolbox_missing': ('torch not installed' if torch is None and not args.no_torch else
                             'skipped' if args.no_torch or args.no_foolbox else
                             'foolbox not installed')}
  meta.update(victim=f'{victim.name} ({victim.params:,} params, {victim.weights})', batch=batch,
              size=size, torch_note='torch not installed' if torch is None else '')
  if torch is not None:
    from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
    ctx['tmodel'] = torch_models.from_nnx(victim.model)
    diff = torch_models.check_same_logits(victim.model, ctx['tmodel'], x)
    meta['torch_note'] = f'`torch_models.from_nnx`, max |logit difference| {diff:.1e}'
    ctx['xt'] = torch_models.to_torch_images(x, channels_last=True)
    ctx['yt'] = torch.from_numpy(y).long()
    if foolbox is not None:
      ctx['fmodel'] = foolbox.PyTorchModel(ctx['tmodel'], bounds=(0, 1), device='cpu')
  print(f'{meta["victim"]}, batch {batch} {size}x{size}; steps {steps}; repeats '
        f'{meta["repeats"]}; calls at <= {args.call_max_steps} steps', flush=True)

  rows = []
  for name in names:
    case = CASES[name]
    for s in (steps[:1] if case.stepless else steps):
      if case.stepless:  # one step whatever the step counts: always called
        call, r = True, max(repeats.values())
      else:
        call = s <= args.call_max_steps
        r = repeats[s] if call else 0
      rows.append(measure(case, s, call, r, ctx, args))
      if args.json:
        _dump(args.json, rows, meta)
  meta.update(load_end=timing.load_average(), finished=timing.now(),
              duration_s=time.time() - t_start)
  return rows, meta, markdown(rows, meta)


def _write(args, rows, meta, text) -> str:
  out = args.out or (os.path.join(tempfile.mkdtemp(prefix='bench_compile_'), 'compile.md')
                     if args.smoke else DEFAULT_OUT)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    f.write(text)
  if args.json:
    _dump(args.json, rows, meta)
  return out


def main(argv=None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.steps and any(s < 1 for s in args.steps):
    parser.error('--steps must be >= 1')
  command = 'python3 -m benchmarks.bench_compile' + (
      ' ' + ' '.join(argv if argv is not None else sys.argv[1:])).rstrip()
  rows, meta, text = measure_all(args, command)
  out = _write(args, rows, meta, text)
  print('\n' + text, flush=True)
  print(f'wrote {out} ({len(rows)} rows) in {meta["duration_s"]:.0f} s', flush=True)
  return 0


def run(settings: timing.Settings) -> list[timing.Row]:
  """benchmarks/run.py's entry: the default measurement (under settings.smoke, smoke sizes at 2
  steps only; the per-step-count repeats of this module, not settings.repeats), written to its record file
  (DEFAULT_OUT; a temporary file in a smoke run). Returns one Row of section 'compile' that holds
  the markdown (extra['markdown'], extra['record']): report.py puts it where the record file would
  go, so BENCHMARKS.md shows this run's table, and the raw JSON re-renders it."""
  argv = ['--smoke', '--steps', str(SMOKE_STEPS[0])] if settings.smoke else []  # smoke: ~10 s
  args = _parser().parse_args(argv)
  saved = {k: getattr(jax.config, k)
           for k in ('jax_enable_compilation_cache', 'jax_compilation_cache_dir')}
  try:
    rows, meta, text = measure_all(
        args, 'python3 benchmarks/run.py' + (' --smoke' if settings.smoke else '')
        + ', this section = ' + ' '.join(['python3 -m benchmarks.bench_compile'] + argv))
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
  out = _write(args, rows, meta, text)
  print(f'  wrote {out} ({len(rows)} rows)', flush=True)
  bad = [_where(r) for r in rows if r.get('eps_exceeded')]
  misses = [_where(r) for r in rows if r['goal_miss']]
  return [timing.Row(
      section='compile', workload='Time to first result per attack (compile, first call, '
      'steady state)', reference='PyTorch eager references, foolbox', ours_label='unmask_jax',
      ref=None, ours=None,
      check=('CHECK FAILED: ours exceeds eps at ' + ', '.join(bad) if bad else
             f'compile goal: {"missed at " + ", ".join(misses) if misses else "met"}'),
      device=meta['device'], date=meta['date'],
      extra={'markdown': text, 'record': os.path.basename(DEFAULT_OUT), 'out': out,
             'failed': bool(bad), 'duration_s': meta['duration_s']})]


def _dump(path: str, rows: list[dict], meta: dict) -> None:
  with open(path, 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1, default=str)


if __name__ == '__main__':
  sys.exit(main())
