"""Name -> component registries and `name(key=value, ...)` spec parsing.

One registry each for datasets, models, attacks and defenses. Entries may be objects or lazy
"module:attribute" strings, so that importing the package does not import every component (and
their heavy dependencies) up front. An unknown name raises an error that lists the valid ones.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import operator
from typing import Any, Callable


class Registry:
  """A mapping from names to components, with helpful errors on typos."""

  def __init__(self, kind: str, entries: dict[str, Any] | None = None):
    self.kind = kind
    self._entries: dict[str, Any] = dict(entries or {})

  def register(self, name: str, target: Any = None):
    """Registers `target` under `name`; usable as a decorator when `target` is None."""
    if target is None:
      def deco(obj):
        self.register(name, obj)
        return obj
      return deco
    if name in self._entries:
      raise ValueError(f'{self.kind} {name!r} is already registered')
    self._entries[name] = target
    return target

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def get(self, name: str) -> Any:
    if name not in self._entries:
      close = difflib.get_close_matches(name, self._entries, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise KeyError(f'Unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: '
                     f'{", ".join(self.names())}')
    target = self._entries[name]
    if isinstance(target, str):
      module, _, attr = target.partition(':')
      target = getattr(importlib.import_module(module), attr)
      self._entries[name] = target
    return target


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}


def _literal(node: ast.AST) -> Any:
  """Evaluates a literal, allowing arithmetic such as 8/255 (never calls or names)."""
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    v = _literal(node.operand)
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
    return _BINOPS[type(node.op)](_literal(node.left), _literal(node.right))
  if isinstance(node, (ast.Tuple, ast.List)):
    return tuple(_literal(e) for e in node.elts)
  if isinstance(node, ast.Name) and node.id in ('True', 'False', 'None'):
    return {'True': True, 'False': False, 'None': None}[node.id]
  raise ValueError(f'not a literal: {ast.unparse(node)}')


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """Parses 'name' or 'name(key=value, ...)' into (name, kwargs).

  Values are Python literals with arithmetic, e.g. "pgd_linf(eps=8/255, steps=20)".
  """
  try:
    node = ast.parse(spec.strip(), mode='eval').body
  except SyntaxError as e:
    raise ValueError(f'Cannot parse spec {spec!r}: {e.msg}') from None
  if isinstance(node, ast.Name):
    return node.id, {}
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
    try:
      return node.func.id, {kw.arg: _literal(kw.value) for kw in node.keywords}
    except ValueError as e:
      raise ValueError(f'Cannot parse spec {spec!r}: {e}') from None
  raise ValueError(f'Spec {spec!r} must look like name or name(key=value, ...)')


def check_kwargs(kind: str, name: str, fn: Callable, kwargs: dict[str, Any],
                 reserved: tuple[str, ...] = ()) -> None:
  """Raises a TypeError listing valid keyword parameters if `kwargs` has unknown keys."""
  import inspect
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  valid = [n for n, p in params.items()
           if p.kind == p.KEYWORD_ONLY and n not in reserved]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise TypeError(f'Unknown parameter(s) {unknown} for {kind} {name!r}. '
                    f'Valid parameters: {", ".join(valid)}')
