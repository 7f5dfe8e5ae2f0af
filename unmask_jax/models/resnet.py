"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

BasicBlock for depths 10/18/34 and Bottleneck for 50, with the stride of a downsampling bottleneck
on its 3x3 convolution (torchvision's "v1.5"). With `width=64`, 1000 classes and the ImageNet
stem, the parameter counts equal torchvision's: ResNet-18 11,689,512 and ResNet-50 25,557,032,
and so does the function (padding k // 2, max-pool padded with -inf, BN eps 1e-5 and momentum 0.1,
conv1x1 + BN downsample): torchvision weights load with `models.torch_import` (ImageNet mean/std
passed as `mean`/`std`) and give torchvision's logits to ~1e-5.

Example:
  model = resnet18(num_classes=10, width=16, stem='cifar', rngs=nnx.Rngs(0))
  logits = model(x)              # x: [N, 32, 32, 3] in [0, 1]
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from unmask_jax.models import base

STAGES = {10: ('basic', (1, 1, 1, 1)), 18: ('basic', (2, 2, 2, 2)),
          34: ('basic', (3, 4, 6, 3)), 50: ('bottleneck', (3, 4, 6, 3))}
STEMS = ('imagenet', 'cifar')


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with a residual connection."""

  expansion = 1

  def __init__(self, in_ch: int, ch: int, stride: int, *, rngs: nnx.Rngs):
    out_ch = ch * self.expansion
    self.conv1 = base.conv(in_ch, ch, 3, stride, rngs=rngs)
    self.bn1 = base.batch_norm(ch, rngs=rngs)
    self.conv2 = base.conv(ch, out_ch, 3, rngs=rngs)
    self.bn2 = base.batch_norm(out_ch, rngs=rngs)
    self.proj = Projection(in_ch, out_ch, stride, rngs=rngs) if (
        stride != 1 or in_ch != out_ch) else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.proj is None else self.proj(x)
    return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BN, and a residual connection."""

  expansion = 4

  def __init__(self, in_ch: int, ch: int, stride: int, *, rngs: nnx.Rngs):
    out_ch = ch * self.expansion
    self.conv1 = base.conv(in_ch, ch, 1, rngs=rngs)
    self.bn1 = base.batch_norm(ch, rngs=rngs)
    self.conv2 = base.conv(ch, ch, 3, stride, rngs=rngs)
    self.bn2 = base.batch_norm(ch, rngs=rngs)
    self.conv3 = base.conv(ch, out_ch, 1, rngs=rngs)
    self.bn3 = base.batch_norm(out_ch, rngs=rngs)
    self.proj = Projection(in_ch, out_ch, stride, rngs=rngs) if (
        stride != 1 or in_ch != out_ch) else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.proj is None else self.proj(x)
    return nnx.relu(y + shortcut)


class Projection(nnx.Module):
  """1x1 strided conv + BN shortcut, used where a block changes shape."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
    self.conv = base.conv(in_ch, out_ch, 1, stride, rngs=rngs)
    self.bn = base.batch_norm(out_ch, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class ResNet(base.Classifier):
  """ResNet classifier; `features` is the global-average-pooled output of the last stage.

  Named intermediates (`intermediates`): 'stem' (after its max-pool, if any), 'block0', 'block1',
  ... (each residual block's output, in order), 'features', 'logits'.

  Args:
    depth: 10, 18, 34 (BasicBlock) or 50 (Bottleneck).
    num_classes: number of logits.
    in_channels: channels of the input images.
    width: channels of the first stage (64 in the paper); stages use width * (1, 2, 4, 8).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool; for 150..224 px inputs) or 'cifar'
      (3x3/1 conv, no pool; for 32 px inputs).
    dropout: dropout rate on the features before the classifier (applied only with a key).
    mean, std: normalization constants, scalars or per-channel sequences.
    rngs: parameter initialization.
  """

  def __init__(self, depth: int, *, num_classes: int, in_channels: int = 3, width: int = 64,
               stem: str = 'imagenet', dropout: float = 0.0,
               mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.25,
               rngs: nnx.Rngs):
    if depth not in STAGES:
      raise ValueError(f'ResNet depth must be one of {sorted(STAGES)}, got {depth}')
    if stem not in STEMS:
      raise ValueError(f'stem must be one of {STEMS}, got {stem!r}')
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {dropout}')
    self._init_input(in_channels, mean, std)
    self.depth = depth
    self.stem = stem
    self.num_classes = num_classes
    kind, counts = STAGES[depth]
    block_cls = BasicBlock if kind == 'basic' else Bottleneck
    if stem == 'imagenet':
      self.stem_conv = base.conv(in_channels, width, 7, 2, rngs=rngs)
    else:
      self.stem_conv = base.conv(in_channels, width, 3, 1, rngs=rngs)
    self.stem_bn = base.batch_norm(width, rngs=rngs)
    blocks = []
    in_ch = width
    for stage, count in enumerate(counts):
      ch = width * 2**stage
      for i in range(count):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(block_cls(in_ch, ch, stride, rngs=rngs))
        in_ch = ch * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.feature_dim = in_ch
    self.dropout = nnx.Dropout(dropout)
    self.fc = base.dense(in_ch, num_classes, rngs=rngs)

  def features(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self._features(x, dropout_key, None)

  def _features(self, x, dropout_key, out):
    del dropout_key  # ResNet has dropout only before the head.
    x = self._normalize(x)
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    if self.stem == 'imagenet':
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = base.record(out, 'stem', x)
    for i, block in enumerate(self.blocks):
      x = base.record(out, f'block{i}', block(x))
    return base.global_avg_pool(x)

  def head(self, feats: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self.fc(base.dropout(self.dropout, feats, dropout_key))


def _factory(depth: int):
  def make(*, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs, width: int = 64,
           stem: str = 'imagenet', dropout: float = 0.0,
           mean: float | Sequence[float] = 0.5,
           std: float | Sequence[float] = 0.25) -> ResNet:
    return ResNet(depth, num_classes=num_classes, in_channels=in_channels, width=width,
                  stem=stem, dropout=dropout, mean=mean, std=std, rngs=rngs)
  make.__name__ = make.__qualname__ = f'resnet{depth}'
  make.__doc__ = f'ResNet-{depth}; see `ResNet` for the arguments.'
  return make


resnet10 = _factory(10)
resnet18 = _factory(18)
resnet34 = _factory(34)
resnet50 = _factory(50)
