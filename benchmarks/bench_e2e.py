"""End-to-end (row 6): the main job's wall time per stage, read from its own log.

`python3 main.py --workdir=runs/main` appends one JSON line per run to
runs/main/stage_seconds.jsonl (unmask_jax.pipeline.run_main). The main job takes ~10 minutes on the
2-core machine, so this benchmark does not run it: it reports the latest complete run in that file
(one whose every training stage took at least MIN_TRAIN_S: a resumed run, whose cached stages take
~1 s, is skipped; if there is none, the latest run, marked as resumed) and the file's date. Without
the file the row says so.
"""
from __future__ import annotations

import datetime
import json
import os

from benchmarks import timing

NAME = 'e2e'
STAGE_LOG = os.path.join(timing.REPO, 'runs', 'main', 'stage_seconds.jsonl')
NOT_MEASURED = 'not measured: run main.py first'
MIN_TRAIN_S = 10.0  # a cached (already trained) stage returns in a few seconds


def _complete(run: dict) -> bool:
  train = [v for k, v in run.items() if k.startswith('train')]
  return bool(train) and min(train) >= MIN_TRAIN_S


def latest_full_run(path: str = STAGE_LOG) -> tuple[dict, int, int, bool] | None:
  """(stage seconds of the latest complete run, its 1-based line number, number of lines,
  whether it is complete), or None without a log."""
  if not os.path.exists(path):
    return None
  runs = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          runs.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  runs = [r for r in runs if isinstance(r, dict) and 'total (this run)' in r]
  if not runs:
    return None
  complete = [i for i, r in enumerate(runs) if _complete(r)]
  idx = complete[-1] if complete else len(runs) - 1
  return runs[idx], idx + 1, len(runs), bool(complete)


def _seconds(s: float) -> timing.Timing:
  return timing.Timing(s, float('nan'), [s], [])


def run(settings: timing.Settings) -> list[timing.Row]:
  found = latest_full_run()
  device = timing.device_label()
  if found is None:
    return [timing.Row(NAME, 'main job (python3 main.py --workdir=runs/main), all stages',
                       'n/a', 'main.py', 'n/a', NOT_MEASURED, device=device, date='-',
                       check=NOT_MEASURED)]
  stages, line, total_lines, complete = found
  date = datetime.datetime.fromtimestamp(os.path.getmtime(STAGE_LOG)).strftime('%Y-%m-%d %H:%M')
  rows = []
  for stage, secs in stages.items():
    label = 'total' if stage.startswith('total') else stage
    rows.append(timing.Row(
        NAME, f'main job stage: {label}', 'n/a (no reference)', 'main.py', 'n/a', _seconds(secs),
        check=f'runs/main/stage_seconds.jsonl, run {line} of {total_lines}'
        + ('' if complete else ' (resumed run: cached stages took ~0 s)'),
        device=device, date=f'file dated {date}'))
  print(f'    main job: {stages.get("total (this run)")} s in total (run {line} of {total_lines} '
        f'in {STAGE_LOG}, {date})', flush=True)
  return rows
