"""Adversarial attacks: pure, batched, jit-able functions and one registry.

Every attack has the signature

  attack(logits_fn, x, y, key, *, eps, ...) -> x_adv

with x float32 [N, H, W, C] in [0, 1], y int32 [N], key a `jax.random.key`, and logits_fn a
`jax.tree_util.Partial` (its leaves, the model weights, are then jit arguments: a new checkpoint
or batch of the same shapes does not retrace). Attacks are jitted once, at the call site:

  attack = compile_attack('pgd_linf(eps=8/255, steps=20)')
  x_adv = attack(jax.tree_util.Partial(apply_fn, params), x, y, jax.random.key(0))

which is `jax.jit(functools.partial(pgd_linf, eps=8/255, steps=20))`. Adding an attack = one
function with that signature, whose threat model is declared next to it with a decorator, in one
file, + one registry line in `ATTACKS` below:

  @common.threat_model('l2')            # or param='norm' / base='base' (see common.threat_model)
  def my_attack(logits_fn, x, y, key, *, eps, steps=10): ...
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax

from unmask_jax.attacks import common
from unmask_jax.attacks.common import validate_inputs
from unmask_jax.registry import Registry, check_kwargs, parse_spec

ATTACKS = Registry('attack', {
    'fgsm': 'unmask_jax.attacks.fgsm:fgsm',
    'bim': 'unmask_jax.attacks.bim:bim',
    'pgd_linf': 'unmask_jax.attacks.pgd:pgd_linf',
    'pgd_l2': 'unmask_jax.attacks.pgd:pgd_l2',
    'mifgsm_linf': 'unmask_jax.attacks.mifgsm:mifgsm_linf',
    'mifgsm_l2': 'unmask_jax.attacks.mifgsm:mifgsm_l2',
    'cw_l2': 'unmask_jax.attacks.cw:cw_l2',
    'deepfool': 'unmask_jax.attacks.deepfool:deepfool',
    'apgd_linf': 'unmask_jax.attacks.apgd:apgd_linf',
    'apgd_l2': 'unmask_jax.attacks.apgd:apgd_l2',
    'adaptive': 'unmask_jax.attacks.adaptive:adaptive',
    'apgd_t_linf': 'unmask_jax.attacks.apgd:apgd_t_linf',
    'apgd_t_l2': 'unmask_jax.attacks.apgd:apgd_t_l2',
    'fab_t': 'unmask_jax.attacks.fab:fab_t',
    'square_linf': 'unmask_jax.attacks.square:square_linf',
    'square_l2': 'unmask_jax.attacks.square:square_l2',
    'autoattack': 'unmask_jax.attacks.autoattack:autoattack',
})

# Integer parameters that count iterations and must be >= 1.
_COUNT_PARAMS = ('steps', 'restarts', 'binary_search_steps', 'candidates', 'n_targets', 'queries')


def norm_of(name_or_spec: str) -> str:
  """'linf' or 'l2': the norm an attack's eps is measured in, e.g. norm_of('pgd_l2') == 'l2'."""
  return parse_attack(name_or_spec).norm if '(' in name_or_spec else _norm_of_name(name_or_spec)


def _threat_model(name: str, fn: Callable) -> common.ThreatModel:
  declared = getattr(fn, 'threat_model', None)
  if not isinstance(declared, common.ThreatModel):
    raise TypeError(f'Attack {name!r} ({fn.__module__}.{fn.__qualname__}) declares no threat '
                    'model: decorate it with @common.threat_model("linf" or "l2"), or '
                    '(param="norm") / (base="base") when its parameters decide')
  return declared


def _norm_of_name(name: str) -> str:
  fn = ATTACKS.get(name)  # raises the usual error, with the valid names, on a typo
  if _threat_model(name, fn).base is not None:
    raise ValueError(f'{name!r} takes the norm of its base attack: pass the whole spec')
  return _spec_norm(name, fn, {})


def _spec_norm(name: str, fn: Callable, params: dict) -> str:
  """The norm of an attack, as its function declares it (`common.threat_model`): fixed, its
  parameter's value (default when not given), or its base attack's (default base if none given)."""
  declared = _threat_model(name, fn)
  if declared.norm is not None:
    return declared.norm
  key = declared.param or declared.base
  value = params.get(key, inspect.signature(fn).parameters[key].default)
  if declared.base is not None:
    return parse_attack(value).norm
  if value not in common.NORMS:
    raise ValueError(f'{name}: {key} must be one of {", ".join(common.NORMS)}, got {value!r}')
  return value


class AttackSpec(NamedTuple):
  """A parsed, checked attack: registry name, attack function and its keyword parameters."""
  name: str
  fn: Callable
  params: dict

  @property
  def base(self) -> 'AttackSpec | None':
    """The base attack of a composite (e.g. `adaptive`'s), else None."""
    return parse_attack(self.params['base']) if 'base' in self.params else None

  @property
  def norm(self) -> str:
    return _spec_norm(self.name, self.fn, self.params)

  @property
  def eps(self) -> float | None:
    if 'eps' not in self.params and 'base' in self.params:
      return self.base.eps
    return self.params.get('eps')

  def partial(self) -> Callable:
    """The attack with its parameters bound: (logits_fn, x, y, key) -> x_adv, not yet jitted."""
    return functools.partial(self.fn, **self.params)

  def compile(self) -> Callable:
    """`jax.jit` of `partial()`: compiled on the first call, reused for same-shaped batches.

    An attack that compiles its own parts (`compiles_itself`, e.g. AutoAttack: one program per
    member, skipped on the host once every image is fooled) is returned as `partial()`.
    """
    return self.partial() if compiles_itself(self.fn) else jax.jit(self.partial())

  def __str__(self) -> str:
    args = ', '.join(f'{k}={v!r}' for k, v in sorted(self.params.items()))
    return f'{self.name}({args})'


def compiles_itself(fn: Callable) -> bool:
  """True for an attack that jits its own parts and must not be wrapped in one `jax.jit`."""
  return bool(getattr(fn, 'compiles_itself', False))


def parse_attack(spec: str | AttackSpec, **overrides: Any) -> AttackSpec:
  """Parses and checks "name(key=value, ...)", e.g. "pgd_linf(eps=8/255, steps=20)".

  `overrides` are added to (and win over) the spec's parameters. An `AttackSpec` is re-checked
  with the overrides applied.

  Raises:
    KeyError: unknown attack name (the message lists the valid names).
    TypeError: unknown or missing parameter (the message lists the valid parameters).
    ValueError: an eps or step count that cannot be right (e.g. L∞ eps=8 instead of 8/255).
  """
  if isinstance(spec, AttackSpec):
    name, params = spec.name, dict(spec.params)
  else:
    name, params = parse_spec(spec)
  params.update(overrides)
  fn = ATTACKS.get(name)
  check_kwargs('attack', name, fn, params)
  sig = inspect.signature(fn).parameters
  missing = [p for p, v in sig.items()
             if v.kind == v.KEYWORD_ONLY and v.default is v.empty and p not in params]
  if missing:
    valid = [p for p, v in sig.items() if v.kind == v.KEYWORD_ONLY]
    raise TypeError(f'Attack {name!r} needs parameter(s) {missing}, e.g. '
                    f'"{name}(eps=8/255)". Valid parameters: {", ".join(valid)}')
  # Checked here too (not only when traced) so that a bad spec fails before any data is loaded.
  # The L2 bound needs the image size and is checked when the attack is traced.
  if params.get('base') is not None:
    parse_attack(params['base'])  # a composite's base attack is checked like any other
  norm = _spec_norm(name, fn, params)  # a bad or undeclared norm fails here, before any data
  if params.get('eps') is not None:
    common.check_eps(norm, params['eps'])
  for p in _COUNT_PARAMS:
    if p in params:
      common.check_steps(params[p], p)
  return AttackSpec(name, fn, params)


def compile_attack(spec_or_name: str | AttackSpec, **params: Any) -> Callable:
  """Returns `jax.jit(functools.partial(attack, **params))` for a spec or name.

  Call it once per attack configuration and reuse the result: every call returns a new jitted
  function, with its own compilation cache.

  Example:
    >>> attack = compile_attack('pgd_linf', eps=8/255, steps=20)   # or 'pgd_linf(eps=8/255)'
    >>> x_adv = attack(jax.tree_util.Partial(apply_fn, params), x, y, jax.random.key(0))
  """
  return parse_attack(spec_or_name, **params).compile()


__all__ = ['ATTACKS', 'AttackSpec', 'compile_attack', 'compiles_itself', 'norm_of', 'parse_attack', 'validate_inputs']
