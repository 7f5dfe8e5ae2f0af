"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

DenseNet-121: dense blocks of (6, 12, 24, 16) bottleneck layers (BN-ReLU-1x1 conv to
bn_size * growth_rate, BN-ReLU-3x3 conv to growth_rate), transitions that compress the channels
by `compression` and average-pool by 2. With growth rate 32, 1000 classes and the ImageNet stem it
has torchvision's 7,978,856 parameters and computes torchvision's function (final norm5 + ReLU
before the global mean; transitions floor odd sizes as AvgPool2d(2, 2)): its weights load with
`models.torch_import`.

Example:
  model = densenet121(num_classes=10, growth_rate=4, stem='cifar', rngs=nnx.Rngs(0))
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unmask_jax.models import base

STEMS = ('imagenet', 'cifar')


class DenseLayer(nnx.Module):
  """Bottleneck layer; returns only its `growth_rate` new channels (concatenated by the block)."""

  def __init__(self, in_ch: int, growth_rate: int, bn_size: int, *, rngs: nnx.Rngs):
    mid = bn_size * growth_rate
    self.bn1 = base.batch_norm(in_ch, rngs=rngs)
    self.conv1 = base.conv(in_ch, mid, 1, rngs=rngs)
    self.bn2 = base.batch_norm(mid, rngs=rngs)
    self.conv2 = base.conv(mid, growth_rate, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv1(nnx.relu(self.bn1(x)))
    return self.conv2(nnx.relu(self.bn2(y)))


class Transition(nnx.Module):
  """BN-ReLU-1x1 conv (compressing channels) and 2x2 average pooling between dense blocks."""

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
    self.bn = base.batch_norm(in_ch, rngs=rngs)
    self.conv = base.conv(in_ch, out_ch, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(nnx.relu(self.bn(x)))
    return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(base.Classifier):
  """DenseNet-BC classifier; `features` is the pooled output of the final BN-ReLU.

  Named intermediates (`intermediates`): 'stem', then per dense block b 'block{b}' (its
  concatenated output) and, between blocks, 'transition{b}'; then 'features', 'logits'.

  Args:
    num_classes: number of logits.
    in_channels: channels of the input images.
    blocks: layers per dense block; (6, 12, 24, 16) is DenseNet-121.
    growth_rate: channels each layer adds (32 in the paper); the stem has 2 * growth_rate.
    bn_size: bottleneck width multiplier (4 in the paper).
    compression: channel reduction factor of the transitions (0.5 in the paper).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool).
    dropout: dropout rate on the features before the classifier (applied only with a key).
    mean, std: normalization constants, scalars or per-channel sequences.
    rngs: parameter initialization.
  """

  def __init__(self, *, num_classes: int, in_channels: int = 3,
               blocks: Sequence[int] = (6, 12, 24, 16), growth_rate: int = 32,
               bn_size: int = 4, compression: float = 0.5, stem: str = 'imagenet',
               dropout: float = 0.0, mean: float | Sequence[float] = 0.5,
               std: float | Sequence[float] = 0.25, rngs: nnx.Rngs):
    if stem not in STEMS:
      raise ValueError(f'stem must be one of {STEMS}, got {stem!r}')
    if not 0.0 < compression <= 1.0:
      raise ValueError(f'compression must be in (0, 1], got {compression}')
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {dropout}')
    self._init_input(in_channels, mean, std)
    self.stem = stem
    self.num_classes = num_classes
    ch = 2 * growth_rate
    if stem == 'imagenet':
      self.stem_conv = base.conv(in_channels, ch, 7, 2, rngs=rngs)
      self.stem_bn = base.batch_norm(ch, rngs=rngs)
    else:
      # The CIFAR DenseNet-BC starts with a bare conv: each dense layer pre-activates its input.
      self.stem_conv = base.conv(in_channels, ch, 3, 1, rngs=rngs)
      self.stem_bn = None
    dense_blocks, transitions = [], []
    for b, count in enumerate(blocks):
      layers = []
      for _ in range(count):
        layers.append(DenseLayer(ch, growth_rate, bn_size, rngs=rngs))
        ch += growth_rate
      dense_blocks.append(nnx.List(layers))
      if b < len(blocks) - 1:
        out = int(ch * compression)
        transitions.append(Transition(ch, out, rngs=rngs))
        ch = out
    self.dense_blocks = nnx.List(dense_blocks)
    self.transitions = nnx.List(transitions)
    self.final_bn = base.batch_norm(ch, rngs=rngs)
    self.feature_dim = ch
    self.dropout = nnx.Dropout(dropout)
    self.fc = base.dense(ch, num_classes, rngs=rngs)

  def features(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self._features(x, dropout_key, None)

  def _features(self, x, dropout_key, out):
    del dropout_key  # DenseNet has dropout only before the head.
    x = self.stem_conv(self._normalize(x))
    if self.stem_bn is not None:
      x = nnx.relu(self.stem_bn(x))
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = base.record(out, 'stem', x)
    for b, layers in enumerate(self.dense_blocks):
      for layer in layers:
        x = jnp.concatenate([x, layer(x)], axis=-1)
      x = base.record(out, f'block{b}', x)
      if b < len(self.transitions):
        x = base.record(out, f'transition{b}', self.transitions[b](x))
    return base.global_avg_pool(nnx.relu(self.final_bn(x)))

  def head(self, feats: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self.fc(base.dropout(self.dropout, feats, dropout_key))


def densenet121(*, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs,
                growth_rate: int = 32, bn_size: int = 4, compression: float = 0.5,
                stem: str = 'imagenet', dropout: float = 0.0,
                mean: float | Sequence[float] = 0.5,
                std: float | Sequence[float] = 0.25) -> DenseNet:
  """DenseNet-121 (blocks 6, 12, 24, 16); see `DenseNet` for the arguments."""
  return DenseNet(num_classes=num_classes, in_channels=in_channels, blocks=(6, 12, 24, 16),
                  growth_rate=growth_rate, bn_size=bn_size, compression=compression, stem=stem,
                  dropout=dropout, mean=mean, std=std, rngs=rngs)
