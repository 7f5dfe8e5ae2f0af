import os
import sys

# Tests see the repo root (configs/, top-level scripts) and run quietly.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('UNMASK_NO_PROGRESS', '1')
