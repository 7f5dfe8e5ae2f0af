"""Pure functions of a model: what attacks and detectors receive.

Each constructor returns a `jax.tree_util.Partial` whose pytree leaves are a snapshot of the
model's state (parameters and BatchNorm statistics) in eval mode (running-average BatchNorm):

  logits_fn(model)     x -> logits [N, num_classes]          (dropout off)
  features_fn(model)   x -> penultimate activations [N, D]   (dropout off)
  head_fn(model)       feats [N, D] -> logits                (dropout off)
  mc_logits_fn(model)  (x, key) -> logits, dropout active    (one MC-dropout sample)
  intermediates_fn(model)  x -> {layer name: activations [N, ...]}  (dropout off; includes
                       'features' and 'logits', equal to features_fn and logits_fn)
  segment_fn(model)    x -> per-pixel logits [N, H, W, P + 1] (for the part segmenter K)

Because the weights are leaves, a function can be passed as an argument to a jitted function
(the weights become jit arguments, not constants baked into the compiled program) and it can also
be called directly (a direct call runs one compiled program, cached per architecture and input
shape). Functions of models with the same architecture share a treedef, so a jitted attack
compiles once per architecture and input shape, not once per model or per call:

  @jax.jit
  def predict(logits_fn, x):
    return logits_fn(x).argmax(-1)

  f = logits_fn(model)
  predict(f, x)

The caller's model is not modified (its train/eval mode is left as it was), and later updates to
the model (more training) are not seen by a function made earlier: make a new one.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
from flax import nnx

_METHODS = ('logits', 'features', 'head', 'mc_logits', 'segment', 'intermediates')


class _Apply:
  """The static part of a pure model function: the graph definition and which method to call.

  Compared by value so that jit caches are shared by equal architectures, with the hash computed
  once: jit hashes it on every call, and hashing a large graph definition takes milliseconds.
  """

  __slots__ = ('graphdef', 'method', '_hash')

  def __init__(self, graphdef: Any, method: str):
    self.graphdef = graphdef
    self.method = method
    self._hash = hash((graphdef, method))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    if self is other:
      return True
    return (isinstance(other, _Apply) and self._hash == other._hash
            and self.method == other.method and self.graphdef == other.graphdef)

  def __repr__(self) -> str:
    return f'{self.method}_fn({type(self.graphdef).__name__})'

  def __call__(self, state, *args):
    return _apply(self, state, *args)


# Jitted so that calling a function directly (outside any jit) runs one compiled program instead
# of the model op by op; inside a caller's jit this nests and costs nothing.
@functools.partial(jax.jit, static_argnums=0)
def _apply(spec: _Apply, state, *args):
  model = nnx.merge(spec.graphdef, state)
  if spec.method in ('logits', 'segment'):
    (x,) = args
    return model(x)
  if spec.method == 'features':
    (x,) = args
    return model.features(x)
  if spec.method == 'head':
    (feats,) = args
    return model.head(feats)
  if spec.method == 'mc_logits':
    x, key = args
    return model(x, dropout_key=key)
  if spec.method == 'intermediates':
    (x,) = args
    return model.intermediates(x)
  raise ValueError(f'unknown method {spec.method!r}; expected one of {_METHODS}')


def _bind(model: nnx.Module, method: str) -> jax.tree_util.Partial:
  # nnx.view returns a new module tree with eval-mode flags, leaving the caller's model as it is.
  view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
  graphdef, state = nnx.split(view)
  # The split state holds the model's own Variable objects; re-wrapping the (immutable) arrays in
  # fresh Variables makes a snapshot that later in-place training updates cannot change.
  state = jax.tree.map(lambda a: a, state)
  return jax.tree_util.Partial(_Apply(graphdef, method), state)


def logits_fn(model: nnx.Module) -> jax.tree_util.Partial:
  """Returns a pure `x -> logits` of a classifier in eval mode, dropout off."""
  _require(model, 'features', 'head')
  return _bind(model, 'logits')


def features_fn(model: nnx.Module) -> jax.tree_util.Partial:
  """Returns a pure `x -> features [N, feature_dim]` (penultimate activations), dropout off."""
  _require(model, 'features')
  return _bind(model, 'features')


def head_fn(model: nnx.Module) -> jax.tree_util.Partial:
  """Returns a pure `features -> logits` (the classifier's last layer(s)), dropout off."""
  _require(model, 'head')
  return _bind(model, 'head')


def mc_logits_fn(model: nnx.Module) -> jax.tree_util.Partial:
  """Returns a pure `(x, key) -> logits` with dropout active and running-average BatchNorm.

  One call is one Monte-Carlo dropout sample (Gal & Ghahramani, 2016); vmap over keys for many:

    samples = jax.vmap(lambda k: mc(x, k))(jax.random.split(key, 20))   # [20, N, num_classes]
  """
  _require(model, 'features', 'head')
  return _bind(model, 'mc_logits')


def intermediates_fn(model: nnx.Module) -> jax.tree_util.Partial:
  """Returns a pure `x -> {layer name: activations [N, ...]}` of a classifier, dropout off.

  The model's named intermediate activations (`Classifier.intermediates`: e.g. each conv block's
  output, then 'features' [N, D] and 'logits' [N, num_classes]) from one forward pass, as
  big_vision's `(logits, out)`; for `defenses.base.Context.intermediates_fn` (e.g. the LID
  detector). Keys come back sorted (a dict's pytree order), not in forward order.
  """
  _require(model, 'features', 'head', 'intermediates')
  return _bind(model, 'intermediates')


def segment_fn(model: nnx.Module) -> jax.tree_util.Partial:
  """Returns a pure `x -> per-pixel logits [N, H, W, num_classes]` of a segmenter (the U-Net)."""
  return _bind(model, 'segment')


def param_count(model: nnx.Module) -> int:
  """Number of trainable parameters (`nnx.Param` leaves; BatchNorm running stats excluded).

  Works on abstract models from `nnx.eval_shape` too.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _require(model: nnx.Module, *methods: str) -> None:
  missing = [m for m in methods if not callable(getattr(model, m, None))]
  if missing:
    raise TypeError(f'{type(model).__name__} is not a classifier: it has no {missing} '
                    f'method(s) (use segment_fn for a segmenter)')
