"""Shared pieces of the models: the classifier interface, input normalization and layers.

Every classifier M is an `nnx.Module` with

  features(x, *, dropout_key=None) -> [N, feature_dim]   penultimate (last hidden) activations
  head(feats, *, dropout_key=None) -> [N, num_classes]   the remaining layer(s), logits
  __call__(x, *, dropout_key=None) -> logits            head(features(x))

Conventions:
  * `x` is float NHWC with pixels in [0, 1]; the model normalizes it by `(x - mean) / std`.
  * Dropout is applied if and only if a `dropout_key` is given, in train and eval mode alike, so
    MC dropout is an eval-mode model called with explicit keys.
  * BatchNorm follows `model.train()` / `model.eval()` (batch statistics vs running averages).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm momentum 0.1 (= 0.9 here) tracks the running stats faster than Flax's default
# 0.99, which matters for the short trainings this library runs.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He et al. (2015) initialization (fan_out, as torchvision) for ReLU networks.
he_normal = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


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


def global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


class Classifier(nnx.Module):
  """Base class of the classifiers M: normalization, input checks and `__call__`.

  Subclasses call `_init_input` in their constructor, set `num_classes` and `feature_dim`, and
  implement `features` (starting with `self._normalize(x)`) and `head`.

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
