import atexit
import os
import shutil
import sys
import tempfile

# Tests see the repo root (configs/, top-level scripts) and run quietly.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('UNMASK_NO_PROGRESS', '1')
# Scripts run by the tests keep compiled programs in a cache of this session only (not the user's
# ~/.cache/unmask_jax/xla, and nothing left from an earlier run); a test that runs a script twice
# then runs it with the programs loaded from the cache, as a user's second run does.
if 'UNMASK_COMPILATION_CACHE' not in os.environ:
  os.environ['UNMASK_COMPILATION_CACHE'] = tempfile.mkdtemp(prefix='unmask_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['UNMASK_COMPILATION_CACHE'], ignore_errors=True)
