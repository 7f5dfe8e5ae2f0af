"""Small convolutional classifiers: the MNIST CNN of Feinman et al. and a fast CPU CNN.

`CNNMnist` is the Keras MNIST network used by Feinman et al. ("Detecting Adversarial Samples
from Artifacts", 2017) for the kernel-density and Bayesian-uncertainty detectors:

  Conv(32, 3x3) - ReLU - Conv(64, 3x3) - ReLU - MaxPool(2) - Dropout(0.25) - Flatten
  - Dense(128) - ReLU - Dropout(0.5) - Dense(num_classes)

Named intermediates (`intermediates`): CNNMnist 'conv1', 'conv2' (post-ReLU), 'pool'; CNNSmall
'block0', 'block1', ... (each conv-BN-ReLU, before pooling), 'pool' (global average); both then
'features' and 'logits'.

28x28x1 with 10 classes has 1,199,882 parameters. `CNNSmall` is a compact conv-BN-ReLU network
with global average pooling, sized to train in a minute or two on a 2-core CPU.

Example:
  model = cnn_mnist(num_classes=10, in_channels=1, image_size=28, rngs=nnx.Rngs(0))
  mc_logits = model(x, dropout_key=key)   # one MC-dropout sample
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from unmask_jax.models import base

PADDINGS = ('valid', 'same')


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _rate(rate: float, name: str) -> float:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'{name} must be in [0, 1), got {rate}')
  return float(rate)


class CNNMnist(base.Classifier):
  """The Feinman et al. MNIST CNN.

  The flattened conv output feeds a dense layer, so the input size is fixed at construction.
  With 'valid' padding the spatial size after the convs and pooling is (size - 4) // 2, so inputs
  must be at least 6x6 (8x8 digits give 2x2x64 = 256 flattened features); 'same' padding keeps
  size // 2 and works from 2x2.

  Args:
    num_classes: number of logits.
    in_channels: channels of the input images; pass 1 for MNIST (the default 3, as for every
      model, suits CIFAR-like data).
    image_size: input height and width (an int for square images).
    padding: 'valid' (the original network) or 'same'.
    dropout: rates of the two dropout layers (after pooling, after the hidden dense layer).
    feature_dim: width of the hidden dense layer, whose post-ReLU output is `features`.
    mean, std: normalization constants, scalars or per-channel sequences.
    rngs: parameter initialization.
  """

  def __init__(self, *, num_classes: int, in_channels: int = 3,
               image_size: int | Sequence[int] = 28, padding: str = 'valid',
               dropout: Sequence[float] = (0.25, 0.5), feature_dim: int = 128,
               mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.25,
               rngs: nnx.Rngs):
    if padding not in PADDINGS:
      raise ValueError(f'padding must be one of {PADDINGS}, got {padding!r}')
    if len(dropout) != 2:
      raise ValueError(f'dropout must be two rates (conv, dense), got {dropout}')
    self._init_input(in_channels, mean, std)
    self.num_classes = num_classes
    self.feature_dim = feature_dim
    self.image_size = _pair(image_size)
    shrink = 4 if padding == 'valid' else 0
    out_h, out_w = ((s - shrink) // 2 for s in self.image_size)
    if out_h < 1 or out_w < 1:
      raise ValueError(f'image_size {self.image_size} is too small for padding={padding!r} '
                       f'(needs at least {shrink + 2} pixels per side)')
    pad = padding.upper()
    self.conv1 = base.conv(in_channels, 32, 3, padding=pad, use_bias=True, rngs=rngs)
    self.conv2 = base.conv(32, 64, 3, padding=pad, use_bias=True, rngs=rngs)
    self.dropout1 = nnx.Dropout(_rate(dropout[0], 'dropout[0]'))
    self.fc1 = base.dense(out_h * out_w * 64, feature_dim, rngs=rngs)
    self.dropout2 = nnx.Dropout(_rate(dropout[1], 'dropout[1]'))
    self.fc2 = base.dense(feature_dim, num_classes, rngs=rngs)

  def features(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self._features(x, dropout_key, None)

  def _features(self, x, dropout_key, out):
    x = self._normalize(x)
    if tuple(x.shape[1:3]) != self.image_size:
      raise ValueError(f'CNNMnist was built for {self.image_size} images, got shape {x.shape}')
    x = base.record(out, 'conv1', nnx.relu(self.conv1(x)))
    x = base.record(out, 'conv2', nnx.relu(self.conv2(x)))
    x = base.record(out, 'pool', base.max_pool_2x2(x))
    x = base.dropout(self.dropout1, x, dropout_key)
    x = x.reshape(x.shape[0], -1)
    return nnx.relu(self.fc1(x))

  def head(self, feats: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self.fc2(base.dropout(self.dropout2, feats, dropout_key))


class CNNSmall(base.Classifier):
  """A fast conv-BN-ReLU classifier for CPU work; works on any input size >= 2**(blocks - 1).

  Each block is a 3x3 conv-BN-ReLU; all but the last are followed by 2x2 max-pooling; then global
  average pooling, Dense(feature_dim)-ReLU (= `features`), Dropout and Dense(num_classes).

  Args:
    num_classes: number of logits.
    in_channels: channels of the input images.
    widths: channels of the conv blocks.
    feature_dim: width of the hidden dense layer.
    dropout: dropout rate before the classifier (applied only with a key).
    mean, std: normalization constants, scalars or per-channel sequences.
    rngs: parameter initialization.
  """

  def __init__(self, *, num_classes: int, in_channels: int = 3,
               widths: Sequence[int] = (32, 64, 128), feature_dim: int = 128,
               dropout: float = 0.5, mean: float | Sequence[float] = 0.5,
               std: float | Sequence[float] = 0.25, rngs: nnx.Rngs):
    if not widths:
      raise ValueError('widths must name at least one conv block')
    self._init_input(in_channels, mean, std)
    self.num_classes = num_classes
    self.feature_dim = feature_dim
    convs, bns = [], []
    ch = in_channels
    for w in widths:
      convs.append(base.conv(ch, w, 3, rngs=rngs))
      bns.append(base.batch_norm(w, rngs=rngs))
      ch = w
    self.convs = nnx.List(convs)
    self.bns = nnx.List(bns)
    self.fc1 = base.dense(ch, feature_dim, rngs=rngs)
    self.dropout = nnx.Dropout(_rate(dropout, 'dropout'))
    self.fc2 = base.dense(feature_dim, num_classes, rngs=rngs)

  def features(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self._features(x, dropout_key, None)

  def _features(self, x, dropout_key, out):
    del dropout_key  # Dropout is only before the head.
    x = self._normalize(x)
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = base.record(out, f'block{i}', nnx.relu(bn(conv(x))))
      if i < len(self.convs) - 1:
        x = base.max_pool_2x2(x)
    return nnx.relu(self.fc1(base.record(out, 'pool', base.global_avg_pool(x))))

  def head(self, feats: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return self.fc2(base.dropout(self.dropout, feats, dropout_key))


def cnn_mnist(*, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs,
              image_size: int | Sequence[int] = 28, padding: str = 'valid',
              dropout: Sequence[float] = (0.25, 0.5), feature_dim: int = 128,
              mean: float | Sequence[float] = 0.5,
              std: float | Sequence[float] = 0.25) -> CNNMnist:
  """The Feinman et al. MNIST CNN; see `CNNMnist` for the arguments."""
  return CNNMnist(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                  padding=padding, dropout=dropout, feature_dim=feature_dim, mean=mean,
                  std=std, rngs=rngs)


def cnn_small(*, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs,
              widths: Sequence[int] = (32, 64, 128), feature_dim: int = 128,
              dropout: float = 0.5, mean: float | Sequence[float] = 0.5,
              std: float | Sequence[float] = 0.25) -> CNNSmall:
  """The small fast CPU CNN; see `CNNSmall` for the arguments."""
  return CNNSmall(num_classes=num_classes, in_channels=in_channels, widths=widths,
                  feature_dim=feature_dim, dropout=dropout, mean=mean, std=std, rngs=rngs)
