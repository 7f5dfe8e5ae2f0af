"""AutoAttack (L∞, eps 8/255): the library's jitted ensemble against torchattacks' AutoAttack, on
the same model weights and the same images.

  ours          attacks.compile_attack('autoattack(eps=8/255, norm="linf", steps=S, queries=Q)'),
                lowered and compiled once (compile seconds reported apart), then timed with
                block_until_ready: APGD-CE -> APGD-T -> FAB-T -> Square, every member on the whole
                batch with the images fooled so far masked out.
  torchattacks  torchattacks.AutoAttack(model, norm='Linf', eps=8/255, version='standard',
                n_classes=C, seed=0) with its members' step counts set to the same S (its defaults
                are 10 steps for APGD, APGD-T and FAB-T, and 5000 queries for Square; the original
                AutoAttack uses 100 steps), eager PyTorch on the PyTorch twin of the model
                (benchmarks/torch_models.py, weights copied, logits checked), each member on the
                images that are still robust.

Both use min(9, C - 1) targets for APGD-T and FAB-T, one restart each, Square with p_init 0.8.

torchattacks' APGD-T cannot run on fewer than 4 classes: its targeted DLR loss indexes the 3rd and
4th largest logits (`x_sorted[:, -4]`), an IndexError on the 3-class SynthParts victims. Here that
one method of that one member is replaced by the same loss with the library's fallback (the 3rd
and 4th largest logits fall back to the smallest one when C < 4, `unmask_jax.attacks.apgd.
dlr_targeted`); the unpatched member's error is recorded in the report.

Robust accuracy is against the TRUE labels (per image: correctly classified on the clean image and
under every member). Both results are checked to lie in the eps-ball and in [0, 1], and are
evaluated with the same JAX model. Per-member robust accuracy (cumulative: robust after members
0..k): torchattacks' MultiAttack records; for ours, each member run on its own with the key the
ensemble gives it (fold_in(key, m)), which on the images not fooled yet computes what the ensemble
computes, so the last cumulative value must equal the ensemble's (checked, untimed).

Timing (benchmarks/timing.py): one warm-up call per contender, then interleaved rounds in rotating
order, medians of wall time; PyTorch at all cores and at 1 thread, the faster reported (on a
loaded machine OpenMP threads spin). The machine is shared, so timings are noisy.

  python3 -m benchmarks.bench_autoattack --smoke            # seconds: 8 images, 2 steps, 20 queries
  python3 -m benchmarks.bench_autoattack --n 128            # full budget (100 steps, 5000 queries)
  python3 -m benchmarks.bench_autoattack --victim both --at-repeats 2   # also the adv. trained AT-M
  (long runs can be split over processes: --json FILE per run, --no-members then --members-only
  --json FILE, and --merge FILE... to write the markdown)

Writes benchmarks/records/1_autoattack.md (--out; included in BENCHMARKS.md by report.py) unless --no-write.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `unmask_jax` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report, timing, victims
from unmask_jax import attacks, models
from unmask_jax.models import functional

EPS = 8 / 255
TITLE = '## AutoAttack vs torchattacks (same weights and images)'
OUT = os.path.join(timing.REPO, 'benchmarks', 'records', '1_autoattack.md')
MEMBERS = ('APGD-CE', 'APGD-T', 'FAB-T', 'Square')
# Where trained weights are looked for, in order (the main job's output, then a scratch run of it).
WEIGHT_DIRS = {
    'm': (os.path.join(timing.REPO, 'runs', 'main', 'm_cs3a'), '/tmp/mainrun/m_cs3a'),
    'at': (os.path.join(timing.REPO, 'runs', 'main', 'at_cs3a'), '/tmp/mainrun/at_cs3a'),
}
VICTIM_NAMES = {'m': 'SynthParts CNN M (cnn_small)',
                'at': 'SynthParts CNN AT-M (cnn_small, adv. trained)'}


def load_victim(which: str, smoke: bool):
  """(NNX model in eval mode, where its weights came from)."""
  from unmask_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  for path in WEIGHT_DIRS[which]:
    if os.path.exists(os.path.join(path, 'model.json')):
      try:
        model, spec = checkpoint.load_model(path)
      except Exception as e:  # pylint: disable=broad-except
        print(f'  (could not load {path}: {type(e).__name__}: {str(e)[:120]})')
        continue
      if spec['model'] == 'cnn_small':
        model.eval()
        where = os.path.relpath(path, timing.REPO) if path.startswith(timing.REPO) else path
        return model, f'trained ({where})'
  if which == 'at' and not smoke:
    raise SystemExit('no adversarially trained weights found '
                     '(runs/main/at_cs3a, /tmp/mainrun/at_cs3a)')
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), **victims.M_KWARGS)
  model.eval()
  return model, 'random init (seed 0; no trained weights found)'


def _dlr_targeted_any_c(self, x, y, y_target):
  """torchattacks.APGDT.dlr_loss_targeted with the 3rd/4th largest logits falling back to the
  smallest one when there are fewer than 4 classes (as unmask_jax.attacks.apgd.dlr_targeted)."""
  import torch  # pylint: disable=import-outside-toplevel
  x_sorted, _ = x.sort(dim=1)
  c = x.shape[1]
  u = torch.arange(x.shape[0])
  return -(x[u, y] - x[u, y_target]) / (
      x_sorted[:, -1] - 0.5 * x_sorted[:, max(-3, -c)] - 0.5 * x_sorted[:, max(-4, -c)] + 1e-12)


def build_torchattacks(tmodel, num_classes: int, steps: int, queries: int):
  """torchattacks.AutoAttack(standard) with the members' steps / queries set to the budget, and
  APGD-T's loss patched for C < 4. Returns (attack, its MultiAttack, note on the patch)."""
  import torchattacks  # pylint: disable=import-outside-toplevel
  aa = torchattacks.AutoAttack(tmodel, norm='Linf', eps=EPS, version='standard',
                               n_classes=num_classes, seed=0)
  multi = aa._autoattack  # pylint: disable=protected-access
  apgd_ce, apgd_t, fab_t, square = multi.attacks
  assert [type(a).__name__ for a in multi.attacks] == ['APGD', 'APGDT', 'FAB', 'Square']
  defaults = f'{apgd_ce.steps}/{apgd_t.steps}/{fab_t.steps} steps, {square.n_queries} queries'
  for a in (apgd_ce, apgd_t, fab_t):
    a.steps = steps
  square.n_queries = queries
  assert fab_t.multi_targeted
  assert apgd_t.n_target_classes == fab_t.n_target_classes == num_classes - 1
  if num_classes < 4:
    apgd_t.dlr_loss_targeted = types.MethodType(_dlr_targeted_any_c, apgd_t)
  return aa, multi, defaults


def unpatched_apgdt_error(tmodel, num_classes: int, xt, yt) -> str:
  """What torchattacks' own APGD-T does on this model (a 1-step run on 4 images)."""
  import torchattacks  # pylint: disable=import-outside-toplevel
  try:
    torchattacks.APGDT(tmodel, norm='Linf', eps=EPS, steps=1, n_classes=num_classes,
                       seed=0)(xt[:4], yt[:4])
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return ''


def ours_members(logits_fn, x, y, key, steps, queries):
  """Per-image 'still robust after members 0..k' [4, N] from the members run on their own."""
  from unmask_jax.attacks import apgd, fab, square  # pylint: disable=import-outside-toplevel
  fns = [
      lambda f, x, y, k: apgd.apgd_linf(f, x, y, k, eps=EPS, steps=steps),
      lambda f, x, y, k: apgd.apgd_t_linf(f, x, y, k, eps=EPS, steps=steps),
      lambda f, x, y, k: fab.fab_t(f, x, y, k, eps=EPS, norm='linf', steps=steps),
      lambda f, x, y, k: square.square_linf(f, x, y, k, eps=EPS, queries=queries),
  ]
  robust = np.asarray(victims.predictions(logits_fn, x)) == np.asarray(y)
  out = []
  for m, fn in enumerate(fns):
    adv = jax.block_until_ready(jax.jit(fn)(logits_fn, x, y, jax.random.fold_in(key, m)))
    robust = robust & (victims.predictions(logits_fn, adv) == np.asarray(y))
    out.append(robust.copy())
  return np.stack(out)


def add_members(which: str, args, res: list[Result], info: dict) -> None:
  """Ours' per-member robust accuracy (the members on their own, untimed) into res[0] and info;
  checks that the last cumulative value equals the ensemble's outcome per image."""
  model, _ = load_victim(which, args.smoke)
  data = victims.images(info['n'], split='test')
  x, y = jnp.asarray(data['image']), jnp.asarray(data['label'])
  t0 = time.perf_counter()
  per = ours_members(functional.logits_fn(model), x, y, jax.random.key(0), args.steps, args.queries)
  res[0].members = [float(p.mean()) for p in per]
  info['members_match'] = bool((per[-1] == np.asarray(info['ours_robust_per_image'], bool)).all())
  info['members_s'] = time.perf_counter() - t0
  print(f'  ours, members on their own (untimed diagnostic, {info["members_s"]:.0f} s): '
        f'{res[0].members}; last == ensemble per image: {info["members_match"]}', flush=True)


def _linf(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@dataclasses.dataclass
class Result:
  victim: str
  weights: str
  impl: str
  budget: str
  robust: float
  clean: float
  compile_s: float | None
  run: timing.Timing
  members: list | None   # cumulative robust accuracy after each member
  note: str


def bench(which: str, args) -> tuple[list[Result], dict]:
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(timing.cores())
  model, weights = load_victim(which, args.smoke)
  num_classes = int(model.fc2.kernel[...].shape[1])
  data = victims.images(args.n, split='test')
  x_np, y_np = data['image'], data['label']
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  logits_fn = functional.logits_fn(model)
  key = jax.random.key(0)
  clean_ok = victims.predictions(logits_fn, x_np) == y_np
  tmodel = torch_models.from_nnx(model)
  diff, scale = torch_models.max_logit_diff(model, tmodel, x_np)
  torch_models.check_same_logits(model, tmodel, x_np)
  print(f'{VICTIM_NAMES[which]}: {weights}, {num_classes} classes, {args.n} test images, clean '
        f'accuracy {clean_ok.mean():.4f}; PyTorch twin max |logit diff| {diff:.2e} '
        f'(max |logit| {scale:.1f})', flush=True)
  xt = torch_models.to_torch_images(x_np)
  yt = torch.from_numpy(y_np).long()
  budget = (f'APGD-CE {args.steps} st, APGD-T {min(9, num_classes - 1)}x{args.steps}, '
            f'FAB-T {min(9, num_classes - 1)}x{args.steps}, Square {args.queries} q')
  info = {'victim': which, 'weights': weights, 'diff': diff, 'scale': scale, 'classes': num_classes,
          'clean': float(clean_ok.mean()), 'budget': budget, 'n': args.n, 'steps': args.steps,
          'code': code_version(),
          'queries': args.queries}

  # Ours: compile apart, then the timed calls.
  spec = f'autoattack(eps=8/255, norm="linf", steps={args.steps}, queries={args.queries})'
  att = attacks.compile_attack(spec)
  t0 = time.perf_counter()
  exe = att.lower(logits_fn, x, y, key).compile()
  compile_s = time.perf_counter() - t0
  print(f'  ours: {spec} compiled in {compile_s:.1f} s', flush=True)

  aa, multi, ta_defaults = build_torchattacks(tmodel, num_classes, args.steps, args.queries)
  info['ta_defaults'] = ta_defaults
  info['unpatched'] = unpatched_apgdt_error(tmodel, num_classes, xt, yt) if num_classes < 4 else ''
  records = {}

  def run_ref():
    multi._accumulate_multi_atk_records = True  # pylint: disable=protected-access
    multi._multi_atk_records = [0.0] * (len(multi.attacks) + 1)  # pylint: disable=protected-access
    out = aa(xt, yt)
    records['last'] = list(multi._multi_atk_records)  # pylint: disable=protected-access
    return out

  fns = {'ours': lambda: exe(logits_fn, x, y, key)}
  if args.torch_threads == 'both':
    fns.update(timing.torch_contenders(torch, run_ref))
  else:  # only one thread count ('ref' keeps its name so that the rest needs no case)
    n_threads = 1 if args.torch_threads == '1' else timing.cores()
    fns['ref'] = timing.with_threads(torch, n_threads, run_ref)
  outs = {}
  repeats = args.at_repeats if which == 'at' and args.at_repeats else args.repeats
  info['repeats'] = repeats
  t = timing.compare(fns, repeats=repeats, warmup=1, alternatives=timing.torch_pair(),
                     outputs=outs)
  ref_t, threads = timing.best_torch(t)
  if args.torch_threads == '1':
    threads = 1
  info['torch_threads'] = args.torch_threads

  adv_ours = np.asarray(outs['ours'])
  adv_ref = torch_models.to_nhwc(outs['ref'])  # seeded: both thread counts give the same images
  rob_ours = victims.predictions(logits_fn, adv_ours) == y_np
  rob_ref = victims.predictions(logits_fn, adv_ref) == y_np
  with torch.no_grad():
    rob_ref_torch = (tmodel(torch_models.to_torch_images(adv_ref)).argmax(1) == yt).numpy()
  for name, adv in (('ours', adv_ours), ('torchattacks', adv_ref)):
    d = _linf(adv, x_np)
    assert d <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1, (name, d, adv.min(), adv.max())
  info['linf'] = {'ours': _linf(adv_ours, x_np), 'torchattacks': _linf(adv_ref, x_np)}
  info['both_robust'] = int((rob_ours & rob_ref).sum())
  info['agree'] = int((rob_ours == rob_ref).sum())
  info['ref_torch_eval'] = float(rob_ref_torch.mean())

  # torchattacks' records: [N, still robust after member 0, 1, ...]; its MultiAttack stops once
  # nothing is robust, leaving the later entries at 0, which is then their value.
  rec = records['last']
  ref_members = [rec[k + 1] / args.n for k in range(len(MEMBERS))]
  info['ours_robust_per_image'] = rob_ours.astype(int).tolist()
  ours_m = None
  res = [
      Result(VICTIM_NAMES[which], weights, 'ours (jax.jit, library)', budget,
             float(rob_ours.mean()), float(clean_ok.mean()), compile_s, t['ours'], ours_m,
             'every member on the whole batch, fooled images masked'),
      Result(VICTIM_NAMES[which], weights,
             f'torchattacks {_ta_version()} (PyTorch {torch.__version__} eager, {threads} thread'
             f'{"s" * (threads > 1)})', budget, float(rob_ref.mean()), float(clean_ok.mean()), None,
             ref_t, ref_members,
             'members on the still-robust images; APGD-T loss patched for C < 4'
             if num_classes < 4 else 'members on the still-robust images'),
  ]
  info['timings'] = {k: dataclasses.asdict(v) for k, v in t.items()}
  for r in res:
    print(f'  {r.impl}: robust accuracy {r.robust:.4f}, run {r.run.wall:.2f} s (median of '
          f'{len(r.run.walls)}: {[round(w, 2) for w in r.run.walls]})'
          + (f', compile {r.compile_s:.1f} s' if r.compile_s is not None else '')
          + (f', members {r.members}' if r.members else ''), flush=True)
  print(f'  per image: {info["agree"]}/{args.n} same outcome, {info["both_robust"]} robust under '
        f'both; torchattacks result judged by the PyTorch twin: {info["ref_torch_eval"]:.4f}',
        flush=True)
  return res, info


def code_version() -> str:
  """The commit the library was run from, and whether unmask_jax/ had uncommitted changes."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel

  def git(*a):
    return subprocess.run(['git', *a], cwd=timing.REPO, capture_output=True, text=True,
                          check=False).stdout
  head = git('rev-parse', '--short', 'HEAD').strip()
  if not head:
    return 'not a git checkout'
  diff = git('diff', 'HEAD', '--', 'unmask_jax')
  if not diff:
    return f'commit {head}, unmask_jax/ clean'
  files = len(git('diff', 'HEAD', '--name-only', '--', 'unmask_jax').split())
  return (f'commit {head} + uncommitted changes to {files} files of unmask_jax/ (diff sha1 '
          f'{hashlib.sha1(diff.encode()).hexdigest()[:10]})')


def _ta_version() -> str:
  try:
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    return importlib.metadata.version('torchattacks')
  except Exception:  # pylint: disable=broad-except
    return ''


def _warmup_only(info: dict, name: str) -> str:
  """A note when a PyTorch contender was timed by its warm-up call only (`timing.compare` drops
  the slower of the two thread counts after the warm-up when it took over 1.5x the other)."""
  if len(info['timings'][name]['walls']) < info['repeats']:
    return ' (warm-up call only: over 1.5x slower than the other thread count, not timed further)'
  return ''


def _fmt_members(m):
  return ' / '.join(f'{100 * v:.1f}' for v in m) if m else 'n/a'


def markdown(all_res: list[Result], infos: list[dict], args, load: str) -> str:
  import torch  # pylint: disable=import-outside-toplevel
  machine = (f'{timing.device_label()}, {report.cpu_model()}, shared with other jobs (load average '
             f'{load} at the start); JAX {jax.__version__}, PyTorch {torch.__version__}')
  lines = [TITLE, '',
           'Produced by ' + ' and '.join(
               f'`{" ".join(["python3 -m benchmarks.bench_autoattack"] + c.split())}`'
               for c in args.commands)
           + f' ({args.date}). L∞, eps = 8/255, {"/".join(sorted({str(i["n"]) for i in infos}))} '
           'SynthParts CS3a test images (32x32, the same images on both sides), '
           'true labels. Robust accuracy: share of the images classified correctly on the clean '
           'image and under every member. Run s: median wall time of '
           f'{"/".join(str(i["repeats"]) for i in infos)} interleaved rounds (per victim) after '
           'one warm-up call each (compile excluded, `block_until_ready`); the machine is shared, '
           'so timings are noisy (all samples below).',
           '',
           '| victim | implementation | budget | robust acc. | compile s | run s | '
           'cumulative robust acc. after APGD-CE / APGD-T / FAB-T / Square (%) | date | machine |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in all_res:
    lines.append(
        f'| {r.victim} ({r.weights}; clean acc. {100 * r.clean:.1f}%) | {r.impl} | {r.budget} | '
        f'**{100 * r.robust:.1f}%** | '
        f'{f"{r.compile_s:.1f}" if r.compile_s is not None else "—"} | '
        f'{r.run.wall:.2f} | {_fmt_members(r.members)} | {args.date} | {timing.device_label()} |')
  lines += ['', f'Machine: {machine}.', '']
  for info, pair in zip(infos, [all_res[i:i + 2] for i in range(0, len(all_res), 2)]):
    ours, ref = pair
    lines += [
        f'**{ours.victim}** ({info["weights"]}, {info["classes"]} classes; library code: '
        f'{info.get("code", "not recorded")}):',
        f'- Same weights: the PyTorch twin (`benchmarks/torch_models.from_nnx`) has max |logit '
        f'difference| {info["diff"]:.2e} from the JAX model on these images (max |logit| '
        f'{info["scale"]:.1f}).',
        f'- Wall-time samples (s): ours {[round(w, 2) for w in ours.run.walls]}, torchattacks '
        f'({"1 thread" if info.get("torch_threads") == "1" else "all cores"}) '
        f'{[round(w, 2) for w in info["timings"]["ref"]["walls"]]}'
        + _warmup_only(info, 'ref')
        + (f', torchattacks (1 thread) {[round(w, 2) for w in info["timings"]["ref_1t"]["walls"]]}'
           + _warmup_only(info, 'ref_1t') if 'ref_1t' in info['timings'] else '')
        + (' (only 1 thread timed, `--torch-threads 1`)' if info.get('torch_threads') == '1'
           else '')
        + f'; steady-state ratio torchattacks / ours = {ref.run.wall / ours.run.wall:.2f}x'
        f' (ours incl. compile on first use: {ours.compile_s + ours.run.wall:.1f} s).',
        f'- Per image: {info["agree"]}/{info["n"]} images have the same outcome under both, '
        f'{info["both_robust"]} are robust under both. Largest perturbation: ours '
        f'{info["linf"]["ours"] * 255:.3f}/255, torchattacks '
        f'{info["linf"]["torchattacks"] * 255:.3f}/255 (both in [0, 1]). torchattacks\' result '
        'judged by its own PyTorch model: '
        f'{100 * info["ref_torch_eval"]:.1f}% robust.',
    ]
    if info.get('members_match') is not None:
      lines.append(f'- Ours per member: each member run on its own with the ensemble\'s key '
                   f'(untimed diagnostic, {info["members_s"]:.0f} s incl. compiles); its last '
                   f'cumulative value equals the ensemble per image: {info["members_match"]}. '
                   'torchattacks: its MultiAttack\'s own records (it stops once nothing is '
                   'robust).')
    lines.append(f'- torchattacks\' `version=\'standard\'` defaults are {info["ta_defaults"]} (not '
                 'the paper\'s 100 steps); both sides here run the budget in the table.')
    if info['unpatched']:
      lines.append(f'- Unpatched, torchattacks\' APGD-T fails on this {info["classes"]}-class '
                   f'model (`{info["unpatched"]}`), so `torchattacks.AutoAttack` cannot run on it '
                   'as shipped: its `dlr_loss_targeted` was replaced (benchmark only) by the same '
                   'loss with the 3rd/4th largest logits falling back to the smallest, as the '
                   'library\'s `apgd.dlr_targeted` does.')
    lines.append('')
  lines += [
      'Caveats: the random starts differ (JAX key 0 vs torch seed 0), so per-image outcomes may '
      'differ while the rates agree; ours runs every member on the whole batch (fooled images '
      'masked; the target loops and Square\'s queries stop once every image is fooled, so after '
      'an APGD-CE that fools all they cost next to nothing) while torchattacks shrinks the batch '
      'to the still-robust images, so ours pays more when some but not all images survive (e.g. '
      'Square\'s queries on all of them); FAB-T and Square are not bit-identical '
      're-implementations of torchattacks\' (see the members\' docstrings); one budget, one seed, '
      f'{"/".join(sorted({str(i["n"]) for i in infos}))} images: a difference of a few images in '
      'robust accuracy is within the spread of random starts.', '']
  return '\n'.join(lines)


def _save(path, all_res, infos, load, date, command):
  with open(path, 'w') as f:
    json.dump({'results': [dataclasses.asdict(r) for r in all_res], 'infos': infos, 'load': load,
               'date': date, 'command': command}, f, indent=1)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--smoke', action='store_true', help='seconds: 8 images, 2 steps, 20 queries')
  p.add_argument('--n', type=int, default=None, help='images (default 128; 8 with --smoke)')
  p.add_argument('--steps', type=int, default=None, help='APGD / APGD-T / FAB-T steps (100)')
  p.add_argument('--queries', type=int, default=None, help='Square queries (5000)')
  p.add_argument('--repeats', type=int, default=None, help='timed rounds (3; 1 with --smoke)')
  p.add_argument('--at-repeats', type=int, default=None,
                 help='timed rounds for the AT-M victim (default: --repeats); its calls are long')
  p.add_argument('--victim', choices=('m', 'at', 'both'), default='m',
                 help='m: the SynthParts victim M; at: its adversarially trained twin AT-M')
  p.add_argument('--torch-threads', choices=('both', 'all', '1'), default='both',
                 help='PyTorch thread counts timed (both: all cores and 1 thread, the faster '
                 'reported); on an oversubscribed machine all cores can be 10x slower')
  p.add_argument('--no-members', action='store_true', help='skip ours\' per-member diagnostic')
  p.add_argument('--json', default=None,
                 help='also save the raw results here (updated after each victim)')
  p.add_argument('--merge', nargs='+', default=None, metavar='JSON',
                 help='write the markdown from saved --json files (e.g. one per victim); '
                 'runs nothing')
  p.add_argument('--members-only', action='store_true',
                 help='add ours\' per-member diagnostic to the results saved in --json; '
                 'times nothing')
  p.add_argument('--out', default=OUT)
  p.add_argument('--no-write', action='store_true')
  args = p.parse_args()
  args.n = args.n or (8 if args.smoke else 128)
  args.steps = args.steps or (2 if args.smoke else 100)
  args.queries = args.queries or (20 if args.smoke else 5000)
  args.repeats = args.repeats or (1 if args.smoke else 3)
  args.date = timing.today()
  load = timing.load_average()
  all_res, infos, args.commands, loads = [], [], [], []
  if args.merge:
    for path in args.merge:
      with open(path) as f:
        saved = json.load(f)
      for r in saved['results']:
        r['run'] = timing.Timing.from_dict(r['run'])
        all_res.append(Result(**r))
      infos += saved['infos']
      loads.append(saved['load'])
      args.date = saved['date']
      args.commands.append(saved['command'])
  elif args.members_only:
    # Adds ours' per-member diagnostic to the results saved in --json by an earlier run (for runs
    # split over processes); runs no timing.
    with open(args.json) as f:
      saved = json.load(f)
    load, args.date, args.commands = saved['load'], saved['date'], [saved['command']]
    for r in saved['results']:
      r['run'] = timing.Timing.from_dict(r['run'])
    res_all = [Result(**r) for r in saved['results']]
    for i, info in enumerate(saved['infos']):
      args.steps, args.queries = info['steps'], info['queries']
      if res_all[2 * i].members is None:
        add_members(info['victim'], args, res_all[2 * i:2 * i + 2], info)
    all_res, infos = res_all, saved['infos']
    _save(args.json, all_res, infos, load, args.date, saved['command'])
  else:
    args.command = ' '.join(sys.argv[1:])
    args.commands = [args.command]
    for which in (('m', 'at') if args.victim == 'both' else (args.victim,)):
      res, info = bench(which, args)
      all_res += res
      infos.append(info)
      if args.json:  # saved before the (long) diagnostic, so a killed run keeps its timings
        _save(args.json, all_res, infos, load, args.date, args.command)
      if not args.no_members:
        add_members(which, args, res, info)
        if args.json:
          _save(args.json, all_res, infos, load, args.date, args.command)
  if args.merge:
    load = '; '.join(loads) + ' (one per run)'
    args.commands.append('--merge ' + ' '.join(args.merge))
  md = markdown(all_res, infos, args, load)
  print('\n' + md)
  if not args.no_write:
    with open(args.out, 'w') as f:
      f.write(md)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
