"""Defenses and detectors: one registry; each entry is a `make(**params) -> Defense` factory."""
from __future__ import annotations

from unmask_jax.defenses.base import Context, Defense, NotFittedError, load_state, save_state
from unmask_jax.registry import Registry, check_kwargs, parse_spec

DEFENSES = Registry('defense', {
    'unmask': 'unmask_jax.defenses.unmask:make',
    'mc_dropout': 'unmask_jax.defenses.uncertainty:make',
    'kde': 'unmask_jax.defenses.kde:make',
    'kl': 'unmask_jax.defenses.kl:make',
    'lr_combiner': 'unmask_jax.defenses.combiner:make',
    'deep_protection': 'unmask_jax.defenses.deep_protection:make',
    'mrr': 'unmask_jax.defenses.mrr:make',
    'lid': 'unmask_jax.defenses.lid:make',
})


def make(spec: str, **overrides) -> Defense:
  """Builds a defense from a spec such as "kde(bandwidth=0.26)"."""
  name, kwargs = parse_spec(spec)
  kwargs.update(overrides)
  factory = DEFENSES.get(name)
  check_kwargs('defense', name, factory, kwargs)
  return factory(**kwargs)


__all__ = ['Context', 'Defense', 'DEFENSES', 'NotFittedError', 'load_state', 'make', 'save_state']
