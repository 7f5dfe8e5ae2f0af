"""Shared pieces of the models: the classifier interface, input normalization and layers.

Every classifier M is an `nnx.Module` with

  features(x, *, dropout_key=None) -> [N, feature_dim]   penultimate (last hidden) activations
  head(feats, *, dropout_key=None) -> [N, num_classes]   the remaining layer(s), logits
  __call__(x, *, dropout_key=None) -> logits            head(features(x))
  intermediates(x, *, dropout_key=None) -> {name: [N, ...]}   named activations of one pass

Conventions:
  * `x` is float NHWC with pixels in [0, 1]; the model normalizes it by `(x - mean) / std`.
  * Dropout is applied if and only if a `dropout_key` is given, in train and eval mode alike, so
    MC dropout is an eval-mode model called with explicit keys.
  * BatchNorm follows `model.train()` / `model.eval()` (batch statistics vs running averages).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm momentum 0.1 (= 0.9 here) tracks the running stats faster than Flax's default
# 0.99, which matters for the short trainings this library runs.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Eager random draws compile one threefry program per distinct shape, which costs seconds each on
# a busy CPU and dominated model construction. Drawing fixed-size chunks and reshaping compiles the
# generator once; only cheap slicing programs are compiled per shape.
_INIT_CHUNK = 1 << 16


@functools.partial(jax.jit, static_argnums=(1,))
def _standard_normal_chunk(key: jax.Array, dtype) -> jax.Array:
  return jax.random.normal(key, (_INIT_CHUNK,), dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _take(draws: list[jax.Array], shape: tuple[int, ...], std: jax.Array) -> jax.Array:
  flat = draws[0] if len(draws) == 1 else jnp.concatenate(draws)
  return flat[:math.prod(shape)].reshape(shape) * std


def variance_scaling(scale: float, mode: str) -> Callable:
  """A normal initializer with variance `scale / fan` (`mode` 'fan_in' or 'fan_out').

  Like `nnx.initializers.variance_scaling(scale, mode, 'normal')` for kernels [..., in, out], but
  drawn in fixed-size chunks (see above), so building a model compiles little.
  """
  if mode not in ('fan_in', 'fan_out'):
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    shape = tuple(shape)
    n = math.prod(shape)
    if len(shape) < 2:
      fan = n
    else:
      receptive = math.prod(shape[:-2])
      fan = (shape[-2] if mode == 'fan_in' else shape[-1]) * receptive
    draws = [_standard_normal_chunk(jax.random.fold_in(key, i), jnp.dtype(dtype))
             for i in range(-(-n // _INIT_CHUNK))]
    return _take(draws, shape, jnp.asarray(math.sqrt(scale / max(fan, 1)), dtype))

  return init


# He et al. (2015) initialization for ReLU networks (fan_out for convolutions, as torchvision),
# and LeCun's for the dense layers.
he_normal = variance_scaling(2.0, 'fan_out')
lecun_normal = variance_scaling(1.0, 'fan_in')


def per_channel(value: float | Sequence[float], channels: int, name: str) -> tuple[float, ...]:
  """Broadcasts a scalar or checks a per-channel sequence; returns a tuple of floats."""
  if isinstance(value, (int, float)):
    return (float(value),) * channels
  value = tuple(float(v) for v in value)
  if len(value) != channels:
    raise ValueError(f'{name} must be a scalar or have {channels} entries, got {value}')
  return value


def check_images(x: jax.Array, channels: int, name: str) -> None:
  """Trace-time check that `x` is a float NHWC batch with `channels` channels."""
  if x.ndim != 4:
    raise ValueError(f'{name} expects images of rank 4 [N, H, W, C], got shape {x.shape}')
  if x.shape[-1] != channels:
    raise ValueError(f'{name} expects {channels} channel(s) (NHWC), got shape {x.shape}')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{name} expects float pixels in [0, 1], got dtype {x.dtype} '
                     f'(convert uint8 with data.pipeline.to_float)')


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  """`n` independent keys derived from `key`, or `n` Nones (dropout off) if `key` is None."""
  if key is None:
    return [None] * n
  return [jax.random.fold_in(key, i) for i in range(n)]


def dropout(layer: nnx.Dropout, x: jax.Array, key: jax.Array | None) -> jax.Array:
  """Applies `layer` iff `key` is given, regardless of the module's train/eval mode."""
  return layer(x, deterministic=key is None, rngs=key)


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs,
         use_bias: bool = False, padding: str | None = None) -> nnx.Conv:
  """A square convolution, padded by kernel // 2 on every side (as torchvision) by default."""
  if padding is None:
    p = kernel // 2
    padding = ((p, p), (p, p))
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), (stride, stride), padding=padding,
                  use_bias=use_bias, kernel_init=he_normal, rngs=rngs)


def batch_norm(channels: int, *, rngs: nnx.Rngs, zero_init: bool = False) -> nnx.BatchNorm:
  scale_init = nnx.initializers.zeros if zero_init else nnx.initializers.ones
  return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       scale_init=scale_init, rngs=rngs)


def dense(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=lecun_normal, rngs=rngs)


def global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 of NHWC `x`: max over {x[2i+a, 2j+b] : a, b in {0, 1}}.

  The same function as `nnx.max_pool(x, (2, 2), strides=(2, 2))` ('VALID': an odd last row or
  column is dropped), written as the maximum of four strided slices. Why: XLA:CPU lowers the
  gradient of `reduce_window` max (select-and-scatter) to iotas and a scatter that cost several
  times the convolutions around it; the gradient of elementwise maxima is a few selects. PGD-20 on
  the SynthParts CNN ran 4.6x faster with this form (BENCHMARKS.md, levers). The gradients agree
  except at exact ties, where `jnp.maximum` splits the cotangent instead of picking one input;
  every pool here follows a ReLU, so ties are zeros whose gradient the ReLU discards.
  """
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  x = x[:, :h, :w]
  rows = jnp.maximum(x[:, 0::2], x[:, 1::2])
  return jnp.maximum(rows[:, :, 0::2], rows[:, :, 1::2])


def record(out: dict | None, name: str, x: jax.Array) -> jax.Array:
  """Stores `x` as `out[name]` if `out` is a dict (see `Classifier.intermediates`); returns x."""
  if out is not None:
    if name in out:
      raise ValueError(f'intermediate {name!r} recorded twice')
    out[name] = x
  return x


class Classifier(nnx.Module):
  """Base class of the classifiers M: normalization, input checks and `__call__`.

  Subclasses call `_init_input` in their constructor, set `num_classes` and `feature_dim`, and
  implement `features` (starting with `self._normalize(x)`) and `head`; to expose named layers in
  `intermediates`, they implement `_features(x, dropout_key, out)` and `features` as its call
  with `out=None`.

  Attributes:
    num_classes: number of output logits.
    in_channels: expected number of input channels.
    feature_dim: size D of the `features` output.
    mean, std: per-channel normalization constants (tuples of floats).
  """

  num_classes: int
  in_channels: int
  feature_dim: int

  def _init_input(self, in_channels: int, mean, std) -> None:
    if in_channels < 1:
      raise ValueError(f'in_channels must be >= 1, got {in_channels}')
    self.in_channels = in_channels
    self.mean = per_channel(mean, in_channels, 'mean')
    self.std = per_channel(std, in_channels, 'std')
    if any(s <= 0 for s in self.std):
      raise ValueError(f'std must be positive, got {self.std}')

  def _normalize(self, x: jax.Array) -> jax.Array:
    check_images(x, self.in_channels, type(self).__name__)
    mean = jnp.asarray(self.mean, x.dtype)
    std = jnp.asarray(self.std, x.dtype)
    return (x - mean) / std

  def features(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Penultimate activations [N, feature_dim] of images x [N, H, W, C] in [0, 1]."""
    raise NotImplementedError

  def head(self, feats: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits [N, num_classes] from `features` output [N, feature_dim]."""
    raise NotImplementedError

  def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits [N, num_classes] of images x [N, H, W, C] in [0, 1].

    Args:
      x: float images, NHWC, pixels in [0, 1].
      dropout_key: if given, dropout is active (with masks drawn from this key); if None, the
        forward pass is deterministic.
    """
    k_features, k_head = split_key(dropout_key, 2)
    return self.head(self.features(x, dropout_key=k_features), dropout_key=k_head)

  def intermediates(self, x: jax.Array, *,
                    dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Named intermediate activations of one forward pass: {layer name: [N, ...]}.

    big_vision's `logits, out = model(x)` pattern: the layers before `features` record their
    outputs in a dict as they run (`_features`), then 'features' ([N, feature_dim], the
    penultimate activations) and 'logits' ([N, num_classes]) are added, so every classifier has
    at least those two. Their values are those of `features` and `__call__` with the same
    `dropout_key` (the same operations; the recorded arrays are just also returned). Subclass
    names, in forward order, are listed in their docstrings (e.g. 'conv1', 'block0', ...).
    """
    k_features, k_head = split_key(dropout_key, 2)
    out: dict[str, jax.Array] = {}
    feats = self._features(x, k_features, out)
    out['features'] = feats
    out['logits'] = self.head(feats, dropout_key=k_head)
    return out

  def _features(self, x: jax.Array, dropout_key: jax.Array | None,
                out: dict | None) -> jax.Array:
    """`features(x)`, recording named activations before them in `out` when it is a dict.

    The default records nothing; subclasses with named layers override it and define
    `features(x)` as `self._features(x, dropout_key, None)`, so both run the same code.
    """
    del out
    return self.features(x, dropout_key=dropout_key)
