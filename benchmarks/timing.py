"""The shared timing protocol of the benchmarks, and the row type they report.

Every measurement: one or more warm-up calls (compilation, caches, allocator), then `repeats`
rounds in which each contender runs once, in a rotating order (so that load from other processes
falls on all of them alike), each call synchronised (`jax.block_until_ready` on JAX outputs;
PyTorch CPU calls return finished tensors). We report the median over rounds of the wall time and
of the process CPU time (all threads): on a shared machine CPU time is the steadier of the two.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax

# How the table reports a missing reference (e.g. torch not installed).
NOT_INSTALLED = 'torch not installed'
# The repository root (benchmarks/ is one level below it).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Timing:
  """Median wall and process-CPU seconds of one contender, with all samples."""
  wall: float
  cpu: float
  walls: list
  cpus: list
  first_call: float | None = None  # wall seconds of the first call (compile + run), if measured

  @property
  def cores(self) -> float:
    """Average cores busy during a call (CPU time / wall time)."""
    return self.cpu / self.wall if self.wall > 0 else float('nan')

  @classmethod
  def from_dict(cls, d: dict) -> Timing:
    """The inverse of `dataclasses.asdict` (other keys of `d`, e.g. a success rate, are ignored)."""
    return cls(d['wall'], d['cpu'], d['walls'], d['cpus'], d.get('first_call'))


def sync(out: Any) -> Any:
  """Blocks until every JAX array in `out` is computed (no-op for numpy / torch values)."""
  return jax.block_until_ready(out)


def timed_call(fn: Callable[[], Any]) -> tuple[float, float, Any]:
  """(wall seconds, process CPU seconds, output) of one synchronised call."""
  w0, c0 = time.perf_counter(), time.process_time()
  out = sync(fn())
  return time.perf_counter() - w0, time.process_time() - c0, out


def compare(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
            budget_s: float | None = None,
            alternatives: tuple[tuple[str, str], ...] = (),
            outputs: dict | None = None) -> dict[str, Timing]:
  """Times several contenders, interleaved; returns {name: Timing}.

  Args:
    fns: name -> zero-argument callable doing one full unit of work.
    repeats: timed rounds (each runs every contender once, in a rotating order).
    warmup: untimed calls per contender before the rounds (the first one's wall time, which
      includes compilation for JAX, is kept as `first_call`).
    budget_s: stop adding rounds once this many seconds were spent (at least one round runs), so
      that a slow reference cannot blow the run's time budget.
    alternatives: pairs of contenders of which only the faster is of interest (PyTorch at all
      cores or at 1 thread): if the last warm-up call of one took over 1.5x the other's, it is
      not timed further (its Timing holds its warm-up calls only).
    outputs: if given, receives name -> the (synchronised) output of each contender's last call,
      so that results can be checked without calling the contenders again.
  """
  names = list(fns)
  warm = {n: ([], []) for n in names}  # wall and CPU seconds of the warm-up calls

  def call(name):
    w, c, out = timed_call(fns[name])
    if outputs is not None:
      outputs[name] = out
    return w, c

  for name in names:
    for _ in range(max(warmup, 1)):
      w, c = call(name)
      warm[name][0].append(w)
      warm[name][1].append(c)
  dropped = set()
  for a, b in alternatives:
    if a in warm and b in warm:
      last_a, last_b = warm[a][0][-1], warm[b][0][-1]
      if last_a > 1.5 * last_b:
        dropped.add(a)
      elif last_b > 1.5 * last_a:
        dropped.add(b)
  names = [n for n in names if n not in dropped]
  walls = {n: [] for n in names}
  cpus = {n: [] for n in names}
  t0 = time.perf_counter()
  for r in range(max(repeats, 1)):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      w, c = call(name)
      walls[name].append(w)
      cpus[name].append(c)
    if budget_s is not None and time.perf_counter() - t0 > budget_s:
      break
  out = {n: Timing(statistics.median(walls[n]), statistics.median(cpus[n]), walls[n], cpus[n],
                   warm[n][0][0]) for n in names}
  for n in dropped:
    out[n] = Timing(statistics.median(warm[n][0]), statistics.median(warm[n][1]), warm[n][0],
                    warm[n][1], warm[n][0][0])
  return out


@dataclasses.dataclass
class Row:
  """One line of the BENCHMARKS.md table.

  `ref` / `ours` are Timings, or a string when not measured (e.g. NOT_INSTALLED). `unit` says how
  to print them: 's' (seconds per call) or a throughput unit with `work` items per call (e.g.
  'img/s' with work=128); ratio = reference time / our time (> 1: ours is faster).
  """
  section: str
  workload: str
  reference: str
  ours_label: str
  ref: Timing | str | None
  ours: Timing | str | None
  check: str = ''
  device: str = ''
  date: str = ''
  unit: str = 's'
  work: float = 1.0
  flops: str = ''
  note: str = ''
  extra: dict = dataclasses.field(default_factory=dict)

  def ratio(self, cpu: bool = False) -> float | None:
    if not isinstance(self.ref, Timing) or not isinstance(self.ours, Timing):
      return None
    a, b = (self.ref.cpu, self.ours.cpu) if cpu else (self.ref.wall, self.ours.wall)
    return a / b if b > 0 else None


def today() -> str:
  return datetime.date.today().isoformat()


def now() -> str:
  return datetime.datetime.now().strftime('%Y-%m-%d %H:%M')


def load_average() -> str:
  try:
    return ' / '.join(f'{v:.2f}' for v in os.getloadavg())
  except OSError:
    return 'n/a'


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def torch_or_none():
  """The torch module with its thread count set to the machine's cores, or None if missing."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.set_num_threads(cores())
  return torch


def with_threads(torch, n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
  """`fn` run with PyTorch's intra-op thread count set to n (restored to all cores after)."""
  def run():
    torch.set_num_threads(n)
    try:
      return fn()
    finally:
      torch.set_num_threads(cores())
  return run


def torch_contenders(torch, fn: Callable[[], Any], name: str = 'ref') -> dict[str, Callable]:
  """The PyTorch reference at all cores (`name`) and at 1 thread (`name`_1t), to time both.

  On an idle machine all cores win; when other jobs oversubscribe the cores, PyTorch's OpenMP
  threads spin at every barrier and a call can take 5-10x longer than on one thread. Reporting the
  faster of the two (`best_torch`) keeps the reference honest under load.
  """
  fns = {name: fn}
  if cores() > 1:
    fns[f'{name}_1t'] = with_threads(torch, 1, fn)
  return fns


def torch_pair(name: str = 'ref') -> tuple[tuple[str, str], ...]:
  """The `alternatives` argument of `compare` for `torch_contenders(..., name)`."""
  return ((name, f'{name}_1t'),)


def best_torch(t: dict[str, Timing], name: str = 'ref') -> tuple[Timing, int]:
  """(the faster of the `torch_contenders` timings by median wall time, its thread count)."""
  one = t.get(f'{name}_1t')
  if one is not None and one.wall < t[name].wall:
    return one, 1
  return t[name], cores()


# The PyTorch references of the levers study (bench_levers.py), by their result names, which are
# also the keys of its raw JSON: channels_last on all cores and on 1 thread.
TORCH_REFERENCES = ('torch_cl', 'torch_cl_1thread')


def fastest_reference(results: dict, names: tuple[str, ...] = TORCH_REFERENCES) -> tuple[Any, str]:
  """(the fastest of `results[name]` for `names` by median wall time, its name), or (None, '').

  The values are Timings or their dicts (as read back from JSON); ties go to the earlier name.
  """
  cands = [(results[k], k) for k in names if k in results]
  if not cands:
    return None, ''
  return min(cands, key=lambda c: c[0]['wall'] if isinstance(c[0], dict) else c[0].wall)


def device_label() -> str:
  """'CPU (2 cores)' or e.g. 'GPU (NVIDIA H100 80GB HBM3)' for the JAX default backend."""
  backend = jax.default_backend()
  if backend == 'cpu':
    return f'CPU ({cores()} cores)'
  kind = jax.devices()[0].device_kind
  return f'{backend.upper()} ({kind})'


# Peak dense float32 FLOP/s (no tensor cores / TF32) of accelerators we may be lent, by device_kind
# substring. Used only to express achieved FLOP/s as a share of the peak.
PEAK_FP32 = {'H200': 67e12, 'H100': 67e12, 'A100': 19.5e12, 'L4': 30.3e12, 'V100': 15.7e12,
             'T4': 8.1e12}


class WorkerError(RuntimeError):
  """A `run_worker` process exited with a non-zero status; `stderr` holds its error output."""

  def __init__(self, cmd: list[str], stderr: str):
    super().__init__(f'worker failed ({" ".join(cmd)}):\n{stderr[-3000:]}')
    self.cmd, self.stderr = cmd, stderr


def run_worker(module: str, args: list[str], xla_flags: str = '') -> dict:
  """Runs `python -m module *args` in a fresh process (XLA_FLAGS is read when JAX starts) and
  returns the JSON of the last stdout line that starts with 'RESULT '.

  The child gets `xla_flags` appended to XLA_FLAGS and the repository on PYTHONPATH. Raises
  WorkerError if it exits with a non-zero status.
  """
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  cmd = [sys.executable, '-m', module] + list(args)
  with tempfile.TemporaryFile('w+') as err:
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                          check=False)
    if proc.returncode != 0:
      err.seek(0)
      raise WorkerError(cmd, err.read())
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def compile_all(jobs: list[tuple[Callable, tuple]], workers: int | None = None) -> list[tuple]:
  """Lowers and compiles jitted functions, `workers` at a time; returns, per job,
  (compiled executable, lowered, wall seconds of its lowering + compilation).

  XLA compiles in C++ without holding the GIL, so two compilations on two cores take about the
  time of one; tracing (lowering) stays serial. The executables are called like the jitted
  functions with arguments of the same shapes.
  """
  import concurrent.futures  # pylint: disable=import-outside-toplevel

  def one(job):
    fn, args = job
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    exe = lowered.compile()
    return exe, lowered, time.perf_counter() - t0

  with concurrent.futures.ThreadPoolExecutor(max_workers=workers or cores()) as ex:
    return list(ex.map(one, jobs))


def flops_of(jitted: Callable, *args) -> float | None:
  """FLOPs of one call of a jitted function, from XLA's cost analysis (None if unavailable)."""
  try:
    return flops_of_lowered(jitted.lower(*args))
  except Exception:  # pylint: disable=broad-except
    return None


def flops_of_lowered(lowered) -> float | None:
  """FLOPs from a `Lowered`'s HLO-level cost analysis (no extra compilation), or None."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def flops_share(flops: float | None, seconds: float) -> str:
  """'12.3 TFLOP/s = 18% of peak' on a GPU; 'CPU, n/a' on CPU (achieved GFLOP/s in brackets)."""
  if flops is None:
    return 'n/a'
  rate = flops / seconds
  if jax.default_backend() == 'cpu':
    return f'CPU, n/a ({rate / 1e9:.1f} GFLOP/s)'
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_FP32.items() if k in kind), None)
  share = f' = {100 * rate / peak:.1f}% of fp32 peak' if peak else ' (peak unknown)'
  return f'{rate / 1e12:.2f} TFLOP/s{share}'


@dataclasses.dataclass
class Settings:
  """What every benchmark module's `run(settings)` receives from run.py."""
  smoke: bool = False
  repeats: int = 5
  date: str = dataclasses.field(default_factory=today)

  def n(self, full: int, smoke: int) -> int:
    """A size: `full` in a real run, `smoke` in --smoke."""
    return smoke if self.smoke else full
