"""Bring your own JAX model: turn any `f(params, x) -> logits` into the library's pure functions.

Attacks and defenses receive a model as a `jax.tree_util.Partial` whose leaves are the weights
(`models.functional`): `logits_fn(x) -> [N, num_classes]` and, for the feature-space detectors
(KDE, MRR), `features_fn(x) -> [N, D]`. `adapt` builds them from a plain function and its
parameters, so every attack and defense runs on a model trained elsewhere:

  adapted = adapter.adapt(apply_fn, params, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  x_adv = attacks.compile_attack('pgd_linf(eps=8/255, steps=20)')(adapted.logits_fn, x, y, key)

Input convention. The library hands models float NHWC pixels x in [0, 1] and attacks perturb
them there (an L-inf eps of 8/255 means 8 grey levels). A model trained on other inputs gets them
from the adapter, inside the differentiated function so that gradients flow through the change:

  x_model = (lo + (hi - lo) * x - mean) / std          pixel_range = (lo, hi), mean/std optional

e.g. pixel_range=(0, 255) for a model trained on raw bytes, mean/std for one trained on
standardized inputs (torchvision's ImageNet constants above). Called outside jit, the adapted
functions also check that x lies in [0, 1] (`check_range`): a batch that is already normalized or
in 0..255 is the most common silent mistake and would make every eps meaningless. Inside jit (in
an attack) x is abstract and only its dtype is checked; `attacks.validate_inputs` checks batches
on the host.

Flax Linen:
  variables = module.init(key, x)
  adapted = adapter.from_linen(module, variables)                    # module.apply(variables, x)
  # or adapter.adapt(module.apply, variables); with features: features_method=Module.embed
Flax NNX (any nnx.Module; eval mode: BatchNorm running averages, dropout off):
  adapted = adapter.from_nnx(model, features_method='embed')
  # by hand: graphdef, state = nnx.split(model)
  #          adapter.adapt(lambda s, x: nnx.merge(graphdef, s)(x), state)
Plain function / Equinox (the same path; the library does not depend on Equinox):
  adapted = adapter.adapt(lambda w, x: x.reshape(len(x), -1) @ w['W'] + w['b'], weights)
  params, static = eqx.partition(model, eqx.is_array)
  adapted = adapter.adapt(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params)

The library's own models need no adapter: `functional.logits_fn(model)` already is one (and for
them the two agree exactly; tests/test_adapter.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Adapted(NamedTuple):
  """The library's pure functions of an adapted model (`features_fn` None if not given)."""
  logits_fn: jax.tree_util.Partial
  features_fn: jax.tree_util.Partial | None


def _constants(value, name: str) -> tuple[float, ...] | None:
  if value is None:
    return None
  value = tuple(float(v) for v in np.atleast_1d(np.asarray(value, np.float64)))
  if name == 'std' and any(v <= 0 for v in value):
    raise ValueError(f'std must be positive, got {value}')
  return value


class _Wrapped:
  """Static part of an adapted function: the user's function and the input transform.

  Hashable and compared by value (the function by identity), so a jitted attack caches one
  compilation per adapted architecture and input shape, not one per call or per new weights.
  """

  __slots__ = ('fn', 'mean', 'std', 'pixel_range', 'check_range', '_hash')

  def __init__(self, fn: Callable, mean, std, pixel_range: tuple[float, float],
               check_range: bool):
    self.fn, self.mean, self.std = fn, mean, std
    self.pixel_range, self.check_range = pixel_range, check_range
    self._hash = hash((fn, mean, std, pixel_range, check_range))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return isinstance(other, _Wrapped) and self._hash == other._hash and (
        (self.fn, self.mean, self.std, self.pixel_range, self.check_range) ==
        (other.fn, other.mean, other.std, other.pixel_range, other.check_range))

  def __repr__(self) -> str:
    return f'adapted({getattr(self.fn, "__name__", type(self.fn).__name__)})'

  def transform(self, x: jax.Array) -> jax.Array:
    """[0, 1] pixels -> what the wrapped model expects (identity for the defaults)."""
    lo, hi = self.pixel_range
    if (lo, hi) != (0.0, 1.0):
      x = lo + (hi - lo) * x
    if self.mean is not None:
      x = x - jnp.asarray(self.mean, x.dtype)
    if self.std is not None:
      x = x / jnp.asarray(self.std, x.dtype)
    return x

  def __call__(self, params, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f'adapted models take float pixels in [0, 1], got dtype {jnp.result_type(x)} '
                       '(convert uint8 images with x.astype(np.float32) / 255)')
    if self.check_range and not isinstance(x, jax.core.Tracer):
      lo, hi = float(jnp.min(x)), float(jnp.max(x))
      if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f'adapted models take pixels in [0, 1], got values in [{lo:g}, {hi:g}]. Pass raw '
            '[0, 1] images: the adapter applies pixel_range and mean/std itself (or build it with '
            'check_range=False).')
    return _call(self, params, x)


# Jitted so that a direct call (outside any jit) is one compiled program; inside an attack's jit
# it nests and costs nothing (as models.functional).
@functools.partial(jax.jit, static_argnums=0)
def _call(wrapped: _Wrapped, params, x):
  return wrapped.fn(params, wrapped.transform(x))


def adapt(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, *,
          features: Callable[[Any, jax.Array], jax.Array] | None = None,
          mean: float | Sequence[float] | None = None,
          std: float | Sequence[float] | None = None,
          pixel_range: tuple[float, float] = (0.0, 1.0),
          check_range: bool = True) -> Adapted:
  """Wraps `apply_fn(params, x) -> logits` as the library's pure `logits_fn` (and `features_fn`).

  Args:
    apply_fn: a pure function of (params, x) returning logits [N, num_classes] for x [N, H, W, C];
      `flax.linen.Module.apply` qualifies. It must be traceable by jax.jit and jax.grad.
    params: its parameters, any pytree of arrays (they become the Partial's leaves, so a jitted
      attack takes them as arguments: new weights of the same shapes do not recompile).
    features: optional `features(params, x) -> [N, D]` (penultimate activations) for the
      feature-space defenses (KDE, MRR).
    mean, std: optional per-channel (or scalar) normalization applied after `pixel_range`.
    pixel_range: (lo, hi), the pixel range the model was trained on; [0, 1] pixels map linearly
      onto it.
    check_range: on direct (non-traced) calls, error if x is outside [0, 1].

  Returns:
    `Adapted(logits_fn, features_fn)`, each `x -> array` and a `jax.tree_util.Partial`.
  """
  lo, hi = (float(v) for v in pixel_range)
  if not hi > lo:
    raise ValueError(f'pixel_range must be (lo, hi) with hi > lo, got {pixel_range}')
  mean, std = _constants(mean, 'mean'), _constants(std, 'std')
  make = lambda fn: jax.tree_util.Partial(_Wrapped(fn, mean, std, (lo, hi), check_range), params)
  return Adapted(make(apply_fn), None if features is None else make(features))


class _LinenMethod:
  """`module.apply(variables, x, method=...)`, hashable by the module's identity."""

  __slots__ = ('module', 'method')

  def __init__(self, module, method):
    self.module, self.method = module, method

  def __hash__(self) -> int:
    return hash((id(self.module), self.method))

  def __eq__(self, other) -> bool:
    return (isinstance(other, _LinenMethod) and self.module is other.module
            and self.method == other.method)

  def __call__(self, variables, x):
    return self.module.apply(variables, x, method=self.method)


def from_linen(module, variables: Any, *, features_method: Callable | str | None = None,
               **kwargs) -> Adapted:
  """Adapts a Flax Linen `module` with its `variables` (`module.init(...)`'s output).

  The logits are `module.apply(variables, x)`; `features_method` (a method of the module or its
  name) gives the features. Mutable collections (BatchNorm statistics) are read, not updated: the
  module must run in inference mode without `mutable` (e.g. `use_running_average=True`).
  `kwargs` as in `adapt` (mean, std, pixel_range, check_range).
  """
  return adapt(_LinenMethod(module, None), variables,
               features=None if features_method is None else _LinenMethod(module, features_method),
               **kwargs)


class _NNXMethod:
  """`getattr(nnx.merge(graphdef, state), method)(x)`; hash computed once (graphdefs are big)."""

  __slots__ = ('graphdef', 'method', '_hash')

  def __init__(self, graphdef, method: str):
    self.graphdef, self.method = graphdef, method
    self._hash = hash((graphdef, method))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return (isinstance(other, _NNXMethod) and self._hash == other._hash
            and self.method == other.method and self.graphdef == other.graphdef)

  def __call__(self, state, x):
    return getattr(nnx.merge(self.graphdef, state), self.method)(x)


def from_nnx(model: nnx.Module, *, method: str = '__call__', features_method: str | None = None,
             **kwargs) -> Adapted:
  """Adapts a Flax NNX module: logits `model.<method>(x)`, features `model.<features_method>(x)`.

  The module is snapshotted in eval mode (BatchNorm running averages, dropout deterministic)
  without changing the caller's module, as `functional.logits_fn` does; later training of
  `model` is not seen (adapt again). `kwargs` as in `adapt`.
  """
  for name in (method, features_method):
    if name is not None and not callable(getattr(model, name, None)):
      raise TypeError(f'{type(model).__name__} has no method {name!r}')
  view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
  graphdef, state = nnx.split(view)
  state = jax.tree.map(lambda a: a, state)  # fresh Variables: a snapshot, as functional._bind
  return adapt(_NNXMethod(graphdef, method), state,
               features=None if features_method is None else _NNXMethod(graphdef, features_method),
               **kwargs)


__all__ = ['Adapted', 'adapt', 'from_linen', 'from_nnx']
