"""Small shared utilities."""
from __future__ import annotations

import hashlib
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


def named_key(root, *names):
  """A jax.random key derived from `root` and string names: the same names, the same key, in every
  run and process (so results are reproducible stage by stage, whatever ran before)."""
  import jax
  h = int(hashlib.sha1('/'.join(str(n) for n in names).encode()).hexdigest()[:8], 16)
  return jax.random.fold_in(root, h)
