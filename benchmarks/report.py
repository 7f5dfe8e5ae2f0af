"""BENCHMARKS.md: the header, the main table, and the goal / profile sections, from the rows."""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics

from benchmarks import timing

GOAL = 1.25  # PGD-20: ours >= 1.25x the PyTorch reference on the 2-core CPU
KDE_GOAL = 30.0  # KDE: ours >= 30x scikit-learn KernelDensity (detectors issue)
MC_GOAL = 5.0  # MC dropout: vmapped >= 5x a Python loop of T passes (detectors issue)

SECTIONS = [
    ('attacks', 'pgd', '1. PGD-20 L∞ / L2 vs PyTorch eager'),
    ('attacks', 'other', '2. MI-FGSM, APGD, CW-L2, DeepFool vs PyTorch eager'),
    ('detection', None, '3. Detection stage'),
    ('k_dip', None, '4. K and DIP throughput'),
    ('scaling', None, '5. Scaling over forced host devices'),
    ('e2e', None, '6. End-to-end main job'),
]


def _versions() -> dict:
  out = {}
  for mod in ('jax', 'jaxlib', 'flax', 'torch', 'sklearn', 'numpy'):
    try:
      out[mod] = __import__(mod).__version__
    except ImportError:
      out[mod] = 'not installed'
  return out


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown CPU'


def _memory() -> str:
  try:
    with open('/proc/meminfo') as f:
      kb = int(f.readline().split()[1])
    return f'{kb / 2**20:.0f} GiB'
  except (OSError, ValueError, IndexError):
    return '?'


def environment(command: str, settings: timing.Settings) -> dict:
  return {
      'command': command, 'started': timing.now(), 'device': timing.device_label(),
      'cpu': f'{cpu_model()}, {timing.cores()} cores, {_memory()} RAM',
      'versions': _versions(), 'xla_flags': os.environ.get('XLA_FLAGS', '') or '(none)',
      'load_start': timing.load_average(), 'smoke': settings.smoke, 'repeats': settings.repeats,
  }


def to_json(rows, meta) -> dict:
  return {'meta': meta, 'rows': [dataclasses.asdict(r) for r in rows]}


def from_json(data: dict) -> tuple[list[timing.Row], dict]:
  """The inverse of `to_json`: (rows, meta), timings as `timing.Timing` again."""
  def as_timing(v):
    return timing.Timing.from_dict(v) if isinstance(v, dict) else v
  rows = [timing.Row(**dict(r, ref=as_timing(r['ref']), ours=as_timing(r['ours'])))
          for r in data['rows']]
  return rows, data['meta']


# ---------------------------------------------------------------------------------------------
# Cells.


def _num(v: float) -> str:
  if v >= 100:
    return f'{v:,.0f}'
  if v >= 10:
    return f'{v:.1f}'
  if v >= 0.1:
    return f'{v:.2f}'
  return f'{v:.3g}'


def cell(t, row) -> str:
  if t is None:
    return '-'
  if isinstance(t, str):
    return t
  if row.unit == 's':
    cpu = f' (CPU {_num(t.cpu)} s)' if t.cpu == t.cpu and t.cpus else ''
    return f'{_num(t.wall)} s{cpu}'
  return f'{_num(row.work / t.wall)} {row.unit} ({_num(t.wall)} s, CPU {_num(t.cpu)} s)'


def ratio_cell(row) -> str:
  r = row.ratio()
  if r is None:
    return 'n/a'
  rc = row.ratio(cpu=True)
  return f'**{r:.2f}x**' + (f' (CPU {rc:.2f}x)' if rc else '')


def _sel(rows, section, case=None):
  return [r for r in rows if r.section == section and (case is None or r.extra.get('case') == case)]


def main_table(rows) -> list[str]:
  out = ['| # | Workload | Reference | Ours | Ratio (ref time / ours) | Check | Device '
         '| FLOP/s (share of peak) | Date |', '|---|---|---|---|---|---|---|---|---|']
  for section, case, title in SECTIONS:
    sel = _sel(rows, section, case)
    num = title.split('.')[0]
    for r in sel:
      ref = r.reference if isinstance(r.ref, str) else f'{r.reference}: {cell(r.ref, r)}'
      ours = f'{r.ours_label}: {cell(r.ours, r)}'
      out.append(f'| {num} | {r.workload} | {ref} | {ours} | {ratio_cell(r)} | {r.check} | '
                 f'{r.device} | {r.flops or "-"} | {r.date} |')
  return out


# ---------------------------------------------------------------------------------------------
# Sections.


def _fmt_ratio(r) -> str:
  a, c = r.ratio(), r.ratio(cpu=True)
  if a is None:
    return 'n/a'
  return f'{a:.2f}x' + (f' (CPU time {c:.2f}x)' if c else '')


def _lever(rows, name):
  return next((r for r in _sel(rows, 'levers') if r.extra.get('variant') == name), None)


def _goal_section(rows) -> list[str]:
  pgd = _sel(rows, 'attacks', 'pgd')
  out = [f'## Goal: PGD-20 at >= {GOAL}x the PyTorch reference on the 2-core CPU', '']
  if not pgd:
    return out + ['Not measured in this run.', '']
  measured = [(r, r.ratio()) for r in pgd if r.ratio() is not None]
  if not measured:
    return out + ['No PyTorch reference in this run (torch not installed).', '']
  for r, ratio in measured:
    verdict = 'met' if ratio >= GOAL else f'**not met**: ours needs {GOAL / ratio:.2f}x less time'
    out.append(f'- {r.workload}: {_fmt_ratio(r)} -> {verdict}')
  lib, old = _lever(rows, 'library'), _lever(rows, 'old_pool')
  first = (_sel(rows, 'levers') or [None])[0]
  prof = first.extra.get('profile', {}) if first else {}
  flags = first.extra.get('flags', {}) if first else {}
  if lib and old and isinstance(lib.ours, timing.Timing) and isinstance(old.ours, timing.Timing):
    kinds = prof.get('xla_old') or {}
    pool = kinds.get('max-pool backward (reduce-window, iota, scatter)')
    share = (f' ({100 * pool / sum(kinds.values()):.0f}% of the gradient step\'s XLA:CPU thunk '
             'time)' if pool and kinds else '')
    fresh = flags.get('') or {}
    ref, _ = timing.fastest_reference(fresh)
    if fresh.get('library') and fresh.get('old_pool') and ref is not None:
      l_w, f_w, r_w = fresh['old_pool']['wall'], fresh['library']['wall'], ref['wall']
      where = 'in a fresh process with only these contenders'
    else:
      l_w, f_w = old.ours.wall, lib.ours.wall
      r_w = lib.ref.wall if isinstance(lib.ref, timing.Timing) else float('nan')
      where = 'in the levers process'
    out += ['', 'Where the time goes (details in the levers section below):', '',
            f'1. The 2x2 max-pool gradient of the SynthParts CNN (done). `nnx.max_pool` is a '
            f'`reduce_window`, whose gradient XLA:CPU lowers to select-and-scatter with iotas and '
            f'a scatter{share}. The library now writes it as the maximum of four strided slices '
            '(`unmask_jax.models.base.max_pool_2x2`: the same function, and the same gradient '
            'except at ties, which after the ReLU are zeros whose gradient the ReLU kills): '
            f'PGD-20 takes {f_w:.3f} s instead of {l_w:.3f} s with `nnx.max_pool` '
            f'({l_w / f_w:.1f}x less) {where}, i.e. {r_w / f_w:.2f}x PyTorch ({r_w:.3f} s) where '
            f'the old form is at {r_w / l_w:.2f}x. The U-Net K and the digits CNN use the same '
            'helper. The ResNet-18 (CIFAR stem) has no max-pool: its gap is that of the next item '
            '(profiled on the CNN).']
    steps = prof.get('steps') or {}
    if steps.get('jax grad') and steps.get('torch grad'):
      j, t = steps['jax grad'], steps['torch grad']
      conv_x, conv_t = _conv_times(prof)
      out.append(
          f'2. Convolutions. One gradient step takes {1e3 * j["wall"]:.1f} ms '
          f'({1e3 * j["cpu"]:.1f} ms CPU) against PyTorch\'s {1e3 * t["wall"]:.1f} ms '
          f'({1e3 * t["cpu"]:.1f} ms CPU). XLA:CPU\'s convolution thunks take {1e3 * conv_x:.1f} ms '
          '(YNNPACK fusions, and Eigen for the input gradient of the first layer, whose 3 output '
          'channels make a skinny matrix product) where PyTorch\'s oneDNN convolutions take '
          f'{1e3 * conv_t:.1f} ms (profiled operator times). On 2 cores PyTorch also splits every '
          'operator over both threads (CPU/wall '
          f'{t["cpu"] / t["wall"]:.2f}), while XLA:CPU runs the small thunks of this network '
          f'mostly one at a time (CPU/wall {j["cpu"] / j["wall"]:.2f}, part of it spinning).')
    shard = next((v for k, v in flags.items() if 'device_count=2' in k and 'library' in v), None)
    if shard and shard.get('torch_cl'):
      shard = dict(shard, torch_cl=timing.fastest_reference(shard)[0])
      out.append(
          f'3. Using both cores from JAX: sharding the batch over 2 forced host devices runs the '
          f'two halves in parallel; PGD-20 then takes '
          f'{shard["library"]["wall"]:.3f} s against PyTorch\'s {shard["torch_cl"]["wall"]:.3f} s '
          f'in that process ({shard["torch_cl"]["wall"] / shard["library"]["wall"]:.2f}x). '
          'The scripts (train, attack, evaluate, main) do this by default on a CPU-only machine '
          '(one host device per core, `unmask_jax.parallel`), so this is the ratio a user of the '
          'scripts gets; the main table times the library called on one device, as from a '
          'Python session that does not set the device count.')
    names = {'scan': 'a rolled `lax.scan`', 'nchw': 'the NCHW layout',
             'col2im': 'the first convolution\'s input gradient as col2im', 'bf16': 'bfloat16',
             'donate': 'donating the input'}
    parts = [f'{label} {r.ours.wall / lib.ours.wall:.2f}x'
             for k, label in names.items()
             if (r := _lever(rows, k)) is not None and isinstance(r.ours, timing.Timing)]
    base = (flags.get('') or {}).get('library')
    for f, res in flags.items():
      if f and 'device_count' not in f and base and isinstance(res.get('library'), dict):
        parts.append(f'`{f}` {res["library"]["wall"] / base["wall"]:.2f}x')
    if parts:
      out.append('4. The other levers, as time relative to the library as shipped (below 1 would '
                 'be a gain; flags against the defaults, each in its own process): '
                 + '; '.join(parts) + '. A gain of a few percent is within the run-to-run noise '
                 'of these timings (compare the library rows of the two tables below).')
    need = _lever_needs(prof, shard)
    if need:
      out.append(need)
  out.append('')
  return out


def _conv_times(prof: dict) -> tuple[float, float]:
  """Seconds per gradient step in convolutions: XLA:CPU's thunks (library fusions, which hold the
  convolutions and dots, and Eigen convolutions) and PyTorch's convolution operators."""
  kinds, tops = prof.get('xla') or {}, dict(prof.get('torch') or [])
  return (sum(v for k, v in kinds.items() if 'convolution' in k or 'library' in k),
          sum(v for k, v in tops.items() if 'convolution' in k))


def _conv_factor(total: float, conv: float, shrink: float) -> float | None:
  """How many times faster the convolution thunks must run for the step's thunk time `total` to
  shrink `shrink` times, the rest unchanged; None if even free convolutions would not do."""
  left = total / shrink - (total - conv)
  return conv / left if left > 0 else None


def _lever_needs(prof: dict, shard: dict | None) -> str:
  """Item 5 of the goal section: what each remaining lever would need to reach GOAL, from the
  profile of one gradient step (wall time taken proportional to XLA:CPU's summed thunk time)."""
  steps, kinds = prof.get('steps') or {}, prof.get('xla') or {}
  if not (steps.get('jax grad') and steps.get('torch grad') and kinds):
    return ''
  j, t = steps['jax grad']['wall'], steps['torch grad']['wall']
  total = sum(kinds.values())
  conv, conv_t = _conv_times(prof)
  shrink = GOAL * j / t  # the step must take t / GOAL

  def conv_need(s):
    f = _conv_factor(total, conv, s)
    return (f'{f:.2f}x faster convolution thunks ({1e3 * conv:.1f} -> {1e3 * conv / f:.1f} ms)'
            if f else f'more than free convolutions (the other thunks alone take '
            f'{1e3 * (total - conv):.1f} ms)')

  text = (f'5. What each remaining lever would need (one gradient step, wall time taken as '
          f'proportional to the summed thunk time): {GOAL}x PyTorch means a step of '
          f'{1e3 * t / GOAL:.1f} ms instead of {1e3 * j:.1f} ms ({shrink:.2f}x less). On one '
          f'device that takes {conv_need(shrink)}')
  if conv_t:
    text += (f'; PyTorch\'s oneDNN convolutions take {1e3 * conv_t:.1f} ms, '
             f'{conv / conv_t:.2f}x less than XLA:CPU\'s')
  if shard and shard.get('torch_cl') and shard.get('library'):
    s_ratio = shard['torch_cl']['wall'] / shard['library']['wall']
    if s_ratio >= GOAL:
      text += f'. With the batch sharded over 2 devices the goal is met ({s_ratio:.2f}x)'
    else:
      text += (f'. With the batch sharded over 2 devices ({s_ratio:.2f}x), '
               f'{GOAL / s_ratio:.2f}x less time per step remains: {conv_need(GOAL / s_ratio)}')
  return text + ('. The remaining levers are XLA:CPU\'s convolution kernels (not in this '
                 'library\'s hands short of writing its own) and how it spreads small thunks '
                 'over the cores.')


def _findings(rows) -> list[str]:
  out = ['## Findings per row', '']
  att = _sel(rows, 'attacks', 'other')
  if att:
    out.append('- **2. Other attacks**: ' + '; '.join(
        f'{r.workload.split(",")[0]} {_fmt_ratio(r)}' for r in att) + '. Called with arrays, '
        'as here, every attack runs its loop from the host in jitted programs of a few unrolled '
        'steps (`attacks.common.host_loop`, `HOST_CHUNK` steps per program, chosen with '
        '`benchmarks/bench_host_chunk.py`); DeepFool checks after every step whether every '
        'example is fooled and stops there, as the eager reference does (see its check column); '
        'CW-L2 runs every step of both rounds on both sides (no early abort in this row). So the '
        'loops do the same work as the references\', and what separates the ratios is the cost '
        'of one step: '
        'the convolution kernels profiled in the levers section below (CPU time is near parity; '
        'PyTorch keeps both cores busier). CW and APGD also carry per-iteration bookkeeping '
        '(Adam state, best iterates, step-size checkpoints): elementwise work that XLA fuses and '
        'eager PyTorch launches op by op.')
  det = _sel(rows, 'detection')
  for key, what in (('KDE', 'KDE'), ('MC dropout', 'MC dropout'), ('Jaccard', 'UnMask Jaccard')):
    sel = [r for r in det if key in r.workload]
    if sel:
      out.append(f'- **3. {what}**: ' + '; '.join(f'vs {r.reference.split(":")[0]} '
                                                   f'{_fmt_ratio(r)}' for r in sel) + '.')
  kde = [r for r in det if 'KDE' in r.workload and 'err_ours' in r.extra]
  if kde:
    e = kde[0].extra
    out.append(f'  KDE exactness against float64 brute force: ours is off by at most '
               f'{e["err_ours"]:.1e} nats, {e.get("rel_ours", float("nan")):.1e} relative to '
               '|log p| (float32 on device, centred features). scikit-learn\'s '
               f'tree KDE (float64, default rtol=0) is off by up to {e["err_sklearn"]:.0f} nats, on '
               f'{e.get("bad_sklearn", "?")} of {e.get("queries", "?")} queries by more than 1 nat. '
               'The bad ones are low-density queries, far from their class\'s training points, '
               'where the answer depends on the tree walk (in a check, the default breadth-first '
               'kd_tree overestimated one by ~100 nats that a depth-first walk got right): exactly '
               'the inputs a detector must score. '
               'Ours is a matmul plus a running log-sum-exp per block of training points, each '
               'query against its predicted class\'s points only; NumPy\'s float64 brute force is '
               'the same computation on multithreaded BLAS.')
  goals = []
  skl = next((r for r in det if 'KDE' in r.workload and 'scikit' in r.reference), None)
  if skl and skl.ratio():
    rel = skl.extra.get('rel_ours', float('nan'))
    goals.append(f'KDE >= {KDE_GOAL:g}x scikit-learn: {skl.ratio():.1f}x -> '
                 + ('met' if skl.ratio() >= KDE_GOAL else '**not met**')
                 + f'; KDE exact to 1e-3 (relative, vs float64): {rel:.1e} -> '
                 + ('met' if rel <= 1e-3 else '**not met**'))
  loop = next((r for r in det if 'MC dropout' in r.workload and 'loop of' in r.reference
               and 'JAX' in r.reference), None)
  if loop and loop.ratio():
    goals.append(f'MC dropout vmapped >= {MC_GOAL:g}x a loop of T passes: {loop.ratio():.1f}x -> '
                 + ('met' if loop.ratio() >= MC_GOAL else '**not met**'))
  if goals:
    out.append('  Goals of the detectors issue: ' + '; '.join(goals) + '.')
  if any('MC dropout' in r.workload for r in det):
    out.append('  MC dropout: M\'s only dropout is before its last layer, so with the T keys '
               'vmapped XLA computes the convolutional trunk once and only the head T times; a '
               'loop of passes (JAX or PyTorch) repeats the whole network T times.')
  if any('Jaccard' in r.workload for r in det):
    out.append('  Jaccard: a [N, P] x [P, C] product and a few reductions, a few milliseconds for '
               'both the jitted function and NumPy (host-to-device transfer and dispatch are a '
               'good part of the jitted call at this size); both are far ahead of per-image '
               'Python sets.')
  kd = _sel(rows, 'k_dip')
  if kd:
    out.append('- **4. K and DIP**: ' + '; '.join(
        f'{r.workload.split(",")[0] + ("," + r.workload.split(",")[1] if "K (" in r.workload else "")}'
        f' {_fmt_ratio(r)}' for r in kd) + '. DIP is compute-bound on 2 cores, so restoring '
        'images as one vmapped batch mostly saves dispatch and small-op overhead; batching pays '
        'on accelerators.')
  sc = _sel(rows, 'scaling')
  if sc:
    out.append('- **5. Scaling**: ' + '; '.join(
        f'{r.device.split(", ")[-1]}: {r.work / r.ours.wall:,.0f} img/s vs {r.work / r.ref.wall:,.0f}'
        ' unsharded' for r in sc if isinstance(r.ours, timing.Timing)) + '. The forced host '
        'devices share the same 2 cores, so the sharded path is shown to work (same x_adv) and '
        'to cost little; any speed-up comes from running the shards\' small thunks in parallel, '
        'which one device does not do well (see the cores-busy column of the levers table).')
  e2e = _sel(rows, 'e2e')
  timed = [r for r in e2e if isinstance(r.ours, timing.Timing)]
  if timed:
    total = next((r for r in timed if r.workload.endswith('total')), None)
    stages = sorted((r for r in timed if r is not total), key=lambda r: -r.ours.wall)[:3]
    out.append(f'- **6. End-to-end**: the main job took {total.ours.wall / 60:.1f} min '
               if total else '- **6. End-to-end**: ')
    out[-1] += ('(' + ', '.join(f'{r.workload.split(": ", 1)[1]} {r.ours.wall:.0f} s'
                                for r in stages) + f' the longest stages; {timed[0].check}, '
                f'{timed[0].date}).')
  elif e2e:
    out.append('- **6. End-to-end**: not measured: run `python3 main.py --workdir=runs/main` '
               'first.')
  out.append('')
  return out


def _levers_section(rows) -> list[str]:
  lev = _sel(rows, 'levers')
  if not lev:
    return []
  ref_label = lev[0].reference
  out = ['## Levers and profile of PGD-20 L∞ on the SynthParts CNN (`benchmarks/bench_levers.py`)',
         '', 'Same weights, inputs and random start for every variant, timed interleaved in one '
         'process; ratio = PyTorch reference time / variant time, the reference being the faster '
         f'of PyTorch on all cores and on 1 thread (here: {ref_label}). A PyTorch variant that was '
         'over 1.5x slower than the other after warm-up is not timed further (its row shows its '
         'warm-up calls).', '',
         '| Variant | Wall (s) | CPU (s) | Cores busy | Success | vs PyTorch (wall) | '
         'vs PyTorch (CPU) |', '|---|---|---|---|---|---|---|']
  for r in lev:
    t = r.ours
    out.append(f'| {r.workload.split(": ", 1)[1]} | {t.wall:.3f} | {t.cpu:.3f} | '
               f'{t.cores:.2f} | {r.check.replace("success ", "")} | '
               f'{r.ratio() or float("nan"):.2f}x | {r.ratio(cpu=True) or float("nan"):.2f}x |')
  extra = lev[0].extra
  flags = extra.get('flags') or {}
  if flags:
    out += ['', 'XLA:CPU flags, each in a fresh process (the flag is read at start-up), same '
            'protocol:', '',
            '| XLA_FLAGS | library (s) | with nnx.max_pool (s) | PyTorch (s) | library vs PyTorch | '
            'nnx.max_pool vs PyTorch |', '|---|---|---|---|---|---|']
    for f, res in flags.items():
      if 'error' in res:
        out.append(f'| `{f or "(defaults)"}` | failed: {res["error"][-120:]!r} | | | | |')
        continue
      if res.get('devices', 1) > 1:
        f += f' (batch sharded over {res["devices"]} devices)'
      lib, fast = res.get('library'), res.get('old_pool')
      ref, _ = timing.fastest_reference(res)
      rr = lambda a: f'{ref["wall"] / a["wall"]:.2f}x' if (ref and a) else 'n/a'
      out.append(f'| `{f or "(defaults)"}` | {lib["wall"]:.3f} | {fast["wall"]:.3f} | '
                 f'{ref["wall"] if ref else float("nan"):.3f} | {rr(lib)} | {rr(fast)} |')
  prof = extra.get('profile') or {}
  steps = prof.get('steps') or {}
  if steps:
    out += ['', 'One gradient step (forward + input gradient), batch 128, median of interleaved '
            'calls:', '', '| Call | Wall (ms) | CPU (ms) |', '|---|---|---|']
    for k, v in steps.items():
      out.append(f'| {k} | {1e3 * v["wall"]:.1f} | {1e3 * v["cpu"]:.1f} |')
    if prof.get('flops_grad') and 'jax grad' in steps:
      fl = prof['flops_grad']
      out += ['', f'XLA counts {fl / 1e9:.2f} GFLOP per gradient step: '
              f'{fl / steps["jax grad"]["wall"] / 1e9:.1f} GFLOP/s as shipped'
              + (f', {fl / steps["jax grad (nnx.max_pool)"]["wall"] / 1e9:.1f} GFLOP/s with '
                 'nnx.max_pool' if 'jax grad (nnx.max_pool)' in steps else '')
              + (f', PyTorch {fl / steps["torch grad"]["wall"] / 1e9:.1f} GFLOP/s (same FLOPs).'
                 if 'torch grad' in steps else '.')]
  for key, title in (('xla', 'as shipped'), ('xla_old', 'with nnx.max_pool')):
    kinds = prof.get(key)
    if kinds:
      total = sum(kinds.values())
      out += ['', f'XLA:CPU thunk time of one gradient step {title} (jax.profiler trace, summed '
              'over threads):', '', '| Thunks | ms per step | share |', '|---|---|---|']
      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        out.append(f'| {k} | {1e3 * v:.1f} | {100 * v / total:.0f}% |')
  if prof.get('torch'):
    out += ['', 'PyTorch operators of one gradient step (torch.profiler, self CPU time):', '',
            '| Operator | ms per step |', '|---|---|']
    for k, v in prof['torch']:
      out.append(f'| `{k}` | {1e3 * v:.1f} |')
  out.append('')
  return out


def markdown(rows, meta, names) -> str:
  v = meta['versions']
  lines = [
      '# Benchmarks', '',
      'Speed of the library against what users would otherwise run, measured side by side: same '
      'machine, same run, same model weights, same inputs and hyper-parameters. Every measurement '
      'warms up (compilation excluded; first-call times are in the JSON output), then times '
      f'{meta["repeats"]} interleaved rounds (contenders in rotating order), each call '
      'synchronised with `block_until_ready()`, and reports the median wall time and the median '
      'process CPU time (all threads). Ratios are reference time / our time: above 1, ours is '
      'faster.', '',
      f'- Command: `{meta["command"]}` ({meta["duration_s"] / 60:.1f} min'
      + (', **smoke run: toy sizes, timings meaningless**' if meta['smoke'] else '') + ')',
      f'- Machine: {meta["cpu"]}; JAX device: {meta["device"]}'
      + (' (no GPU: FLOP/s shares are n/a; achieved CPU GFLOP/s in brackets)'
         if meta['device'].startswith('CPU') else ''),
      f'- Date: {meta["started"]} to {meta["finished"]}; load average (1/5/15 min) '
      f'{meta["load_start"]} at the start, {meta["load_end"]} at the end',
      f'- Versions: jax {v["jax"]}, jaxlib {v["jaxlib"]}, flax {v["flax"]}, torch {v["torch"]}, '
      f'scikit-learn {v["sklearn"]}, numpy {v["numpy"]}; XLA_FLAGS {meta["xla_flags"]}',
      '- Time per benchmark: ' + ', '.join(f'{k} {s:.0f} s' for k, s in meta['durations'].items()),
      provenance(rows, names),
      '', '## Results', '']
  lines += main_table(rows)
  lines += [''] + _goal_section(rows) + _findings(rows) + _levers_section(rows)
  lines += [NOTES, LOOP_FORM, DIP_DESIGN, EARLY_EXIT]
  lines += recorded_sections(rows)
  return '\n'.join(lines) + '\n'


RECORDS = os.path.join(os.path.dirname(__file__), 'records')
# Benchmarks of run.py whose section is a record file (benchmarks/records/<name>) rather than rows
# of the main table: their run(settings) returns a Row with extra['record'] and extra['markdown'].
RECORD_OF = {'compile': '4_time_to_first_result.md'}


def _from_run(rows) -> dict[str, str]:
  """{record file name: this run's markdown} for the rows that carry a record section."""
  return {r.extra['record']: r.extra['markdown'] for r in rows
          if r.extra.get('record') and r.extra.get('markdown')}


def _records() -> list[str]:
  if not os.path.isdir(RECORDS):
    return []
  return sorted(n for n in os.listdir(RECORDS) if n.endswith('.md'))


def recorded_sections(rows=()) -> list[str]:
  """Studies kept as markdown in benchmarks/records/ and included verbatim in file-name order, so
  that regenerating BENCHMARKS.md keeps them: those `run.py` does not re-run (slower or separate:
  AutoAttack vs torchattacks, both cores, KDE vs scikit-learn), and those it re-ran in this run
  (time to first result), whose markdown comes from `rows` (this run), not from the file."""
  fresh = _from_run(rows)
  out = []
  for name in sorted(set(_records()) | set(fresh)):
    if name in fresh:
      text = fresh[name]
    else:
      with open(os.path.join(RECORDS, name)) as f:
        text = f.read()
    out += ['', text.rstrip('\n')]
  return out


def _title_and_date(text: str) -> tuple[str, str]:
  """(the first '## ' title without its parenthesis, the date it states: 'measured YYYY-MM-DD' in
  the title, else the first YYYY-MM(-DD) in the text, else 'undated')."""
  title = next((l[3:] for l in text.splitlines() if l.startswith('## ')), '?')
  m = (re.search(r'measured (\d{4}-\d{2}(?:-\d{2})?)', title)
       or re.search(r'(\d{4}-\d{2}(?:-\d{2})?)', title) or re.search(r'(\d{4}-\d{2}-\d{2})', text))
  return title.split(' (')[0].strip(), m.group(1) if m else 'undated'


def provenance(rows, names) -> str:
  """The header line that says which sections this run measured and which are older records,
  with their dates."""
  fresh = _from_run(rows)
  new = []
  main = [n for n in names if n != 'levers' and n not in RECORD_OF]
  if main:
    new.append('the main table (' + ', '.join(main) + ')')
  if 'levers' in names:
    new.append('the levers section')
  for n in names:
    if RECORD_OF.get(n) in fresh:
      new.append(f'"{_title_and_date(fresh[RECORD_OF[n]])[0]}" (also written to '
                 f'benchmarks/records/{RECORD_OF[n]} by a full run)')
  old = []
  for text in (LOOP_FORM, DIP_DESIGN, EARLY_EXIT):
    title, date = _title_and_date(text)
    old.append(f'{title} ({date})')
  for name in _records():
    if name not in fresh:
      with open(os.path.join(RECORDS, name)) as f:
        title, date = _title_and_date(f.read())
      old.append(f'{title} ({date}, benchmarks/records/{name})')
  return ('- Sections measured by this run: ' + ('; '.join(new) or 'none') + '. Older records, '
          'not re-run by this command (date measured): ' + '; '.join(old))


NOTES = """## Method notes

- PyTorch references (`benchmarks/torch_models.py`, `benchmarks/torch_attacks.py`): the NNX weights
  are copied into PyTorch twins of the same architectures (kernels HWIO -> OIHW, dense kernels
  transposed, BatchNorm in eval mode with the running statistics, the in-model normalisation), and
  the logits are checked to agree to 1e-4 before anything is timed. The attacks are written as a
  PyTorch user would (a Python loop of eager forward + `torch.autograd.grad` on the batch; weights
  frozen), with `torch.set_num_threads(cores)` and inputs in `channels_last` (faster than NCHW for
  these nets, see the levers table). The random start of PGD/APGD is drawn once by JAX and given to
  both sides; success rates must agree within 5 points (else CHECK FAILED and a non-zero exit).
- Labels are each model's clean predictions, so success is the share of predictions flipped.
- The ResNet-18 has the CIFAR stem and width 16 (0.70 M parameters, 1/16 of the ImageNet model's
  FLOPs) so that PGD-20 on 128 images takes seconds on 2 cores; the SynthParts CNN is the main
  job's victim (trained weights from runs/main/m_cs3a when present).
- On a shared machine the wall times of both sides suffer; PyTorch's OpenMP threads suffer most when
  the cores are oversubscribed (they spin at barriers), so compare rows from a quiet run.
"""

LOOP_FORM = """## Loop form of iterative attacks (`benchmarks/bench_loop_form.py`, measured 2026-11-23)

An earlier, separate study (not re-run by `run.py`; re-run it with
`python3 benchmarks/bench_loop_form.py`). PGD-L∞ on a 65,930-parameter CNN (3 `lax.conv` layers +
2 dense) at 32x32x3, median process CPU seconds (wall time was up to 2x noisier: other jobs shared
the machine during that run).

| form | PGD-20, batch 128 | PGD-20, batch 32 | PGD-100, batch 32 | first call (PGD-20 b128 / PGD-100 b32) |
|---|---|---|---|---|
| unrolled (Python loop in the jitted attack) | 1.55 | 0.24 | 2.09 | 8.3 s / 20.7 s |
| `lax.scan(unroll=True)` | 1.54 | 0.25 | 2.18 | 11.7 s / 19.3 s |
| `lax.scan` (rolled) | 3.31 | - | 3.96 | 10.2 s / 8.0 s |
| `lax.fori_loop` | 3.25 | 0.79 | 4.02 | 10.3 s / 5.7 s |
| host loop of one jitted step | 1.77 | 0.22 | 1.09 | 6.5 s / 4.2 s |

Rolled loops over conv input-gradients run about 2x slower on XLA:CPU than the same steps
unrolled, so `unmask_jax/attacks/common.py` chooses `LOOP_FORM = 'unrolled'` (the one place the
choice lives), falling back to a rolled scan above `MAX_UNROLL = 100` steps to bound compile time.
Compile time is the price: the attack runner therefore compiles each attack once and passes eps as
a traced scalar, so all eps values and all models of one architecture share a program. The levers
table above re-measures unrolled vs rolled on the SynthParts victim against PyTorch.
"""


DIP_DESIGN = """## Deep Protection: how restoration is compiled (prototype measurements, 2026-11)

Earlier measurements that chose the design of `unmask_jax/defenses/deep_protection.py` (not re-run
by `run.py`; row 4 above is the maintained comparison). 2-core CPU, 32x32x3 images, generator
widths 32/64/64, input depth 8:

- Iterations: a jitted rolled `lax.scan` of 10 steps took ~75-80 ms/iteration for 16 images vs
  ~120 ms for a Python loop of one jitted step; unrolling the scan saved a few percent at 2.5x the
  compile time. Compiling the step takes ~10-16 s, once per (config, batch bucket, segment length).
- Convolutions: `jax.vmap` of `lax.conv` over per-image kernels becomes a grouped convolution,
  ~30x slower on XLA:CPU than a dense one (~240 ms vs 7.5 ms per image-iteration in a prototype);
  XLA convolutions inside the scan were slow even for one image (38 ms per image-iteration). The
  im2col form (k^2 shifted slices times one matrix; vmapped, a batched matmul) took 4.3 ms per
  image-iteration with 16 images at once against 4.8 ms one by one.
"""


EARLY_EXIT = """## Early exit of DeepFool and CW-L2 (`benchmarks/bench_early_exit.py`, measured 2026-12-03)

A separate study (not re-run by `run.py`; re-run it with `python3 benchmarks/bench_early_exit.py`,
about an hour on 2 cores). The SynthParts CNN of row 2 (`victims.cnn_small`, random init: there
were no trained weights in runs/main), 128 SynthParts images, labels = its predictions. "Before" is
the library at 3b23e86, loaded beside the current one in the same process; contenders interleaved,
3 rounds, medians; compile = `jit(...).lower().compile()`. Other jobs shared the 2 cores (load
average 6.5 during DeepFool and CW 5 x 100, 1.4-3.7 during CW 9 x 100): compare CPU times.
foolbox is not importable here (not a dependency), so there are no foolbox timings; the peers are
the PyTorch eager references of `benchmarks/torch_attacks.py` on the same weights (DeepFool stops
when every image is fooled, as foolbox does; CW never aborts).

| Attack | Contender | Compile (s) | Wall (s) | CPU (s) | Success | Median L2 | Output vs before |
|---|---|---|---|---|---|---|---|
| DeepFool-50 | before: 50 steps unrolled | 5.7 | 6.39 | 3.95 | 100.0% | 0.1691 | - |
| DeepFool-50 | after: early exit (10 steps unrolled, then a while loop) | 3.6 | 1.22 | 0.82 | 100.0% | 0.1691 | bitwise equal |
| DeepFool-50 | PyTorch eager, 1 thread (stopped after 5 iterations) | - | 0.72 | 0.48 | 100.0% | 0.1707 | - |
| DeepFool-50 | PyTorch eager, 2 threads (round 1 only) | - | 2.44 | 1.53 | 100.0% | 0.1707 | - |
| CW-L2 5 x 100 | before: one rolled scan of 500 steps | 1.9 | 134.9 | 79.5 | 96.9% | 0.2043 | - |
| CW-L2 5 x 100 | after (default): rolled rounds of 100 steps | 1.8 | 117.5 | 78.7 | 96.9% | 0.2043 | bitwise equal |
| CW-L2 5 x 100 | after, abort_early=True | 5.9 | 31.4 | 19.8 | 96.9% | 0.2135 | a different attack |
| CW-L2 5 x 100 | PyTorch eager, 1 thread | - | 31.6 | 21.3 | 96.9% | 0.2148 | - |
| CW-L2 5 x 100 | PyTorch eager, 2 threads (round 1 only) | - | 200.0 | 184.0 | 96.9% | 0.2148 | - |
| CW-L2 9 x 100 (default) | before | 1.3 | 76.5 | 144.3 | 100.0% | 0.2020 | - |
| CW-L2 9 x 100 (default) | after (default) | 1.1 | 75.6 | 141.5 | 100.0% | 0.2020 | bitwise equal |
| CW-L2 9 x 100 (default) | after, abort_early=True | 3.9 | 40.9 | 78.1 | 100.0% | 0.2036 | a different attack |
| CW-L2 9 x 100 (default) | PyTorch eager, 1 thread | - | 34.8 | 34.8 | 100.0% | 0.2118 | - |
| CW-L2 9 x 100 (default) | PyTorch eager, 2 threads (round 1 only) | - | 250.6 | 256.9 | 100.0% | 0.2118 | - |

Compile time only (goal: at most 30 s at any step count): DeepFool-1000 1.5 s; CW-L2 9 x 1000 with
abort_early 2.3 s; APGD-CE L∞ 100 steps 25.9 s and AutoAttack L∞ standard 29.5 s (their APGD-CE
run is the longest loop still unrolled, MAX_UNROLL = 100 steps; longer loops are rolled).

- DeepFool: 4.8x less CPU time, same output bit for bit. Every image was fooled within the 10
  unrolled steps (EXIT_PREFIX), so the while loop behind them never ran; compile time no longer
  grows with `steps`. It is still ~1.7x PyTorch on 1 thread, which needs 5 iterations where ours
  runs 10 unrolled ones: on XLA:CPU a step inside the while loop costs ~5x an unrolled one (below),
  and a shorter prefix measured slower (prefix 5: 1.6 s, 0: 4.4 s, against 1.2 s for 10 and 5.8 s
  for the 50 steps unrolled, one run under similar load).
- CW, default: unchanged, and no faster. No exact early exit exists within a round (any later
  step may still record a closer adversarial); the one exact round skip (every example's c at a
  fixed point of the binary search, so that the next round would replay the last) is implemented
  but needs dozens of rounds in float32. `abort_early=True` is Carlini's and foolbox's rule, per
  example (every steps / 10 steps, an example whose loss is not below 0.9999 times its loss at the
  previous check stops its round; the round ends when all have stopped): 4.0x less CPU time at
  5 x 100 for a 4.5% larger median L2, 1.8x at 9 x 100 for 0.8%, same success. It is off by
  default: a different attack (with 2 x 20 steps the median L2 doubled on this CNN), and the CW
  row of the main table compares with a reference that does not abort.
- Why steps in rolled loops are slow on XLA:CPU (this also explains the loop-form study above): its
  compiler rewrites convolutions into the canonical NHWC/HWIO form only in the entry computation.
  A convolution's input gradient uses the kernel with its I/O axes swapped; at the top level XLA
  makes a transposed copy and calls a library convolution, inside a while or cond body it keeps an
  Eigen convolution on the swapped kernel, ~10x slower in a profile (a PGD step of this CNN: 34 ms
  unrolled, 156-233 ms in a while loop). Hence CW, whose rounds are rolled, runs 2.2x slower than
  PyTorch on one thread at 9 x 100. A convolution with a custom VJP whose input gradient is written
  as a canonical HWIO convolution (kernel flipped and I/O-swapped explicitly) ran as fast in a
  while loop as unrolled (3-conv test network, batch 128: 40 ms vs 41 ms per step, 227 ms with
  the plain convolution; bitwise equal results); it belongs in the models (flax `nnx.Conv` takes
  the convolution function as an argument) and would let every long loop be rolled at no cost.
"""
