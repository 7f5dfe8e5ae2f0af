"""Small shared utilities."""
from __future__ import annotations

import os
import sys


def progress(iterable, total=None, desc=''):
  """A tqdm progress bar on a terminal; quiet (rare line updates) under CI or when piped."""
  from tqdm.auto import tqdm
  quiet = os.environ.get('CI') == 'true' or not sys.stderr.isatty()
  return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
              mininterval=30.0 if quiet else 0.1, disable=os.environ.get('UNMASK_NO_PROGRESS') == '1')


def quiet_logs() -> None:
  """absl's INFO logs (orbax, tfds) drown the tables the scripts print; keep warnings and errors."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
