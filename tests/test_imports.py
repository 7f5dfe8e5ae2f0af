"""The package's import structure: every module imports on its own in a fresh interpreter, the
library never loads experiment code, and no two library modules import each other (counting
function-level imports, which hide a cycle from Python but not from a reader)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, 'unmask_jax')


def _modules() -> dict[str, str]:
  mods = {}
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        mods[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  return mods


def _imports(name: str, path: str, mods: dict) -> set[str]:
  """Library modules `name` imports anywhere in its file (module or function level)."""
  package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        mod = '.'.join(parts + ([mod] if mod else []))
      for a in node.names:
        out.add(f'{mod}.{a.name}' if f'{mod}.{a.name}' in mods else mod)
  return {m for m in out if m in mods and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles_between_library_modules():
  mods = _modules()
  graph = {m: _imports(m, p, mods) for m, p in mods.items()}
  # Sanity of the checker itself: it sees function-level imports.
  assert 'unmask_jax.eval.metrics' in graph['unmask_jax.defenses.base']
  assert _cycles(graph) == []


def test_library_never_imports_experiments_or_scripts():
  for name, path in _modules().items():
    src = open(path).read()
    tree = ast.parse(src)
    for node in ast.walk(tree):
      mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
          [node.module or ''] if isinstance(node, ast.ImportFrom) else []
      for m in mods:
        assert not m.split('.')[0] in ('experiments', 'configs', 'benchmarks', 'tests'), (name, m)


def test_every_module_imports_alone_and_loads_no_experiment_code():
  code = (
      'import importlib, sys\n'
      'import unmask_jax\n'
      'assert not [m for m in sys.modules if m.split(".")[0] in ("experiments", "configs")], sorted(sys.modules)\n'
      f'for m in {sorted(_modules())!r}:\n'
      '  importlib.import_module(m)\n'
      'bad = [m for m in sys.modules if m.split(".")[0] in ("experiments", "configs", "benchmarks")]\n'
      'assert not bad, bad\n'
      'print("ok")\n')
  # From another directory, so that only the package (not the repo's top-level folders) is found
  # through PYTHONPATH.
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-c', code], cwd='/', env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]
