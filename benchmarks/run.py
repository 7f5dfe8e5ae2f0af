"""Runs the benchmarks and writes BENCHMARKS.md: one command for every row.

  python3 benchmarks/run.py                    # everything, writes BENCHMARKS.md (~30 min, 2 cores)
  python3 benchmarks/run.py --smoke            # toy sizes, seconds per benchmark, to a temp file
  python3 benchmarks/run.py --only attacks detection --out /tmp/b.md

Benchmarks (each a module benchmarks/bench_<name>.py with run(settings) -> rows):
  attacks    PGD-20 L∞/L2 on the SynthParts CNN and a ResNet-18, MI-FGSM, APGD, CW-L2, DeepFool,
             against PyTorch eager references with the same weights (rows 1-2)
  detection  KDE vs scikit-learn and float64 brute force, MC dropout vmap vs loops, UnMask Jaccard
  k_dip      K (U-Net) throughput at 32 and 150 px vs PyTorch; DIP batch vs one by one
  scaling    PGD sharded over 1, 2, 4 forced host devices (subprocesses)
  e2e        the main job's stage wall times (read from runs/main/stage_seconds.jsonl)
  levers     where PGD-20's time goes: loop form, max-pool, layout, threads, XLA flags, profile
  compile    time to first result per attack (benchmarks/bench_compile.py): compile, first call and
             steady state at 20, 100 (and 1000, compile only) steps vs PyTorch and foolbox; ~12
             min on 2 cores before foolbox was added, a few more with it. Its section is written to
             benchmarks/records/4_time_to_first_result.md (a full run) and shown in BENCHMARKS.md
             from this run; without 'compile' in the run, BENCHMARKS.md shows that record file as
             an older record, with its date.

BENCHMARKS.md's header says which sections this run measured and which are older records (with
the dates they were measured). Expected duration of the full run on 2 cores: ~15 min for the
first six, ~12 min plus foolbox's share (a few minutes, not yet measured) for compile.

PyTorch (CPU build, benchmarks/requirements.txt) is optional: without it the reference cells say
"torch not installed"; foolbox likewise (benchmarks/requirements.txt says how to install it). The
run exits with status 1 if any correctness check failed (the table is still written, with CHECK
FAILED in the row).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

BENCHMARKS = ('attacks', 'detection', 'k_dip', 'scaling', 'e2e', 'levers', 'compile')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n', 2)[2])
  parser.add_argument('--smoke', action='store_true',
                      help='toy sizes (batch 4, 2 steps, 1 repeat): checks that everything runs')
  parser.add_argument('--only', nargs='+', choices=BENCHMARKS, metavar='NAME',
                      help=f'run only these benchmarks: {", ".join(BENCHMARKS)}')
  parser.add_argument('--out', help='Markdown file to write (default: BENCHMARKS.md for a full '
                      'run of everything, else a temporary file)')
  parser.add_argument('--json', help='also write the raw results to this JSON file')
  parser.add_argument('--repeats', type=int, help='timed rounds per measurement (default 5, '
                      'smoke 1)')
  parser.add_argument('--from_json', metavar='JSON',
                      help='measure nothing: re-render the Markdown from a --json file of an '
                      'earlier run (to --out, default BENCHMARKS.md)')
  args = parser.parse_args(argv)

  from benchmarks import report, timing  # pylint: disable=import-outside-toplevel
  if args.from_json:
    with open(args.from_json) as f:
      rows, meta = report.from_json(json.load(f))
    out = args.out or os.path.join(REPO, 'BENCHMARKS.md')
    with open(out, 'w') as f:
      f.write(report.markdown(rows, meta, list(meta['durations'])))
    print(f'wrote {out} ({len(rows)} rows) from {args.from_json}')
    return 0
  names = list(args.only or BENCHMARKS)
  if args.out:
    out = args.out
  elif args.smoke or args.only:
    out = os.path.join(tempfile.mkdtemp(prefix='benchmarks_'), 'BENCHMARKS.md')
  else:
    out = os.path.join(REPO, 'BENCHMARKS.md')
  settings = timing.Settings(smoke=args.smoke, repeats=args.repeats or (1 if args.smoke else 5))
  command = 'python3 benchmarks/run.py' + (' ' + ' '.join(argv if argv is not None
                                                           else sys.argv[1:])).rstrip()
  meta = report.environment(command, settings)
  print(f'{meta["device"]}; jax {meta["versions"]["jax"]}, torch {meta["versions"]["torch"]}; '
        f'load average {meta["load_start"]}', flush=True)
  t0 = time.time()
  rows, durations = [], {}
  for name in names:
    print(f'[{name}]', flush=True)
    t = time.time()
    mod = importlib.import_module(f'benchmarks.bench_{name}')
    rows += mod.run(settings)
    durations[name] = time.time() - t
    print(f'[{name}] {durations[name]:.0f} s', flush=True)
  meta.update(duration_s=time.time() - t0, durations=durations, load_end=timing.load_average(),
              finished=timing.now())
  text = report.markdown(rows, meta, names)
  with open(out, 'w') as f:
    f.write(text)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report.to_json(rows, meta), f, indent=1, default=str)
  failed = [r for r in rows if r.check.startswith('CHECK FAILED') or r.extra.get('failed')]
  print(f'wrote {out} ({len(rows)} rows) in {meta["duration_s"]:.0f} s', flush=True)
  for r in failed:
    print(f'CHECK FAILED: {r.workload}: {r.check}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
