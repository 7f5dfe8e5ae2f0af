"""The part segmenter K: a U-Net (Ronneberger et al., MICCAI 2015) with conv-BN-ReLU blocks.

The encoder has `levels` 2x2 max-pool downsamplings with channels width * 2**i; the decoder
upsamples, concatenates the encoder's skip activations and applies a conv block; a 1x1 conv gives
per-pixel logits. Inputs whose size is not a multiple of 2**levels are edge-padded at the bottom
and right and the logits cropped back, so any size works (32, 64, 150, ...).

Example:
  k = unet(num_classes=NUM_PARTS + 1, width=16, rngs=nnx.Rngs(0))
  logits = k(x)                    # x: [N, H, W, 3] in [0, 1] -> [N, H, W, NUM_PARTS + 1]
  parts = logits.argmax(-1)        # 0 = background, p + 1 = part p
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unmask_jax.models import base

UPSAMPLE = ('nearest', 'bilinear', 'transpose')


class ConvBlock(nnx.Module):
  """Two 3x3 conv-BN-ReLU layers."""

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
    self.conv1 = base.conv(in_ch, out_ch, 3, rngs=rngs)
    self.bn1 = base.batch_norm(out_ch, rngs=rngs)
    self.conv2 = base.conv(out_ch, out_ch, 3, rngs=rngs)
    self.bn2 = base.batch_norm(out_ch, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(self.bn2(self.conv2(x)))


class UpBlock(nnx.Module):
  """Upsamples by 2, concatenates the skip activations, then a ConvBlock."""

  def __init__(self, in_ch: int, skip_ch: int, out_ch: int, upsample: str, *,
               rngs: nnx.Rngs):
    self.upsample = upsample
    if upsample == 'transpose':
      self.up = nnx.ConvTranspose(in_ch, out_ch, (2, 2), strides=(2, 2), padding='VALID',
                                  kernel_init=base.he_normal, rngs=rngs)
      in_ch = out_ch
    else:
      self.up = None
    self.block = ConvBlock(in_ch + skip_ch, out_ch, rngs=rngs)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    if self.upsample == 'transpose':
      x = self.up(x)
    elif self.upsample == 'nearest':
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:
      x = jax.image.resize(x, (n, 2 * h, 2 * w, c), 'bilinear')
    return self.block(jnp.concatenate([x, skip], axis=-1))


class UNet(nnx.Module):
  """U-Net part segmenter: images [N, H, W, C] in [0, 1] -> per-pixel logits.

  Args:
    num_classes: per-pixel classes, including background: NUM_PARTS + 1 for a part segmenter
      (class 0 = background, class p + 1 = part p).
    in_channels: channels of the input images.
    width: channels at full resolution; level i has width * 2**i, the bottleneck
      width * 2**levels.
    levels: number of 2x downsamplings.
    upsample: 'nearest' (fastest), 'bilinear' or 'transpose' (learned 2x2 transposed conv).
    mean, std: normalization constants, scalars or per-channel sequences.
    rngs: parameter initialization.

  Attributes:
    num_classes, in_channels: as given.
  """

  def __init__(self, *, num_classes: int, in_channels: int = 3, width: int = 16,
               levels: int = 3, upsample: str = 'nearest',
               mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.25,
               rngs: nnx.Rngs):
    if upsample not in UPSAMPLE:
      raise ValueError(f'upsample must be one of {UPSAMPLE}, got {upsample!r}')
    if levels < 1:
      raise ValueError(f'levels must be >= 1, got {levels}')
    if num_classes < 2:
      raise ValueError(f'num_classes counts background too, so must be >= 2, got {num_classes}')
    self.num_classes = num_classes
    self.in_channels = in_channels
    self.levels = levels
    self.mean = base.per_channel(mean, in_channels, 'mean')
    self.std = base.per_channel(std, in_channels, 'std')
    chans = [width * 2**i for i in range(levels + 1)]
    down, prev = [], in_channels
    for ch in chans[:-1]:
      down.append(ConvBlock(prev, ch, rngs=rngs))
      prev = ch
    self.down = nnx.List(down)
    self.bottleneck = ConvBlock(chans[-2], chans[-1], rngs=rngs)
    self.up = nnx.List([UpBlock(chans[i + 1], chans[i], chans[i], upsample, rngs=rngs)
                        for i in reversed(range(levels))])
    self.out = base.conv(width, num_classes, 1, use_bias=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Per-pixel logits [N, H, W, num_classes] of images x [N, H, W, C] in [0, 1]."""
    base.check_images(x, self.in_channels, 'UNet')
    x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    _, h, w, _ = x.shape
    m = 2**self.levels
    ph, pw = -h % m, -w % m
    if ph or pw:
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode='edge')
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = base.max_pool_2x2(x)
    x = self.bottleneck(x)
    for block, skip in zip(self.up, reversed(skips)):
      x = block(x, skip)
    return self.out(x)[:, :h, :w, :]


def unet(*, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs, width: int = 16,
         levels: int = 3, upsample: str = 'nearest', mean: float | Sequence[float] = 0.5,
         std: float | Sequence[float] = 0.25) -> UNet:
  """The U-Net part segmenter; `num_classes` = NUM_PARTS + 1 (background). See `UNet`."""
  return UNet(num_classes=num_classes, in_channels=in_channels, width=width, levels=levels,
              upsample=upsample, mean=mean, std=std, rngs=rngs)
