"""PyTorch re-implementations of the project's victims, with the NNX weights copied in.

The PyTorch references of the benchmarks must run the same function as the JAX side, so that only
the framework differs: same architecture, same weights, same in-model normalization, BatchNorm in
eval mode with the same running statistics. Layout conversions when copying:

  nnx.Conv kernel  [kh, kw, in, out] (HWIO)  ->  torch Conv2d weight [out, in, kh, kw] (OIHW)
  nnx.Linear kernel [in, out]                ->  torch Linear weight [out, in]
  nnx.BatchNorm scale / bias / mean / var    ->  weight / bias / running_mean / running_var
  images NHWC (JAX)                          ->  NCHW (torch; see `to_torch_images`)

`check_same_logits` verifies the copy before anything is timed.

Example:
  tmodel = torch_models.from_nnx(model)        # model: cnn_small or resnet* (eval mode)
  check_same_logits(model, tmodel, x_nhwc)     # raises if the logits differ by > 1e-4
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def _stride(conv_nnx) -> int:
  s = conv_nnx.strides
  if s is None:  # nnx.Conv's default of 1
    return 1
  return int(s if isinstance(s, int) else s[0])


def _conv(conv_nnx) -> nn.Conv2d:
  """The Conv2d of an nnx.Conv, with its stride and (explicit, symmetric) padding."""
  k = np.asarray(conv_nnx.kernel[...])
  kh, kw, c_in, c_out = k.shape
  pad = conv_nnx.padding
  if isinstance(pad, str):
    raise ValueError(f'only explicit symmetric paddings are converted, got {pad!r}')
  (p0, p1), (q0, q1) = pad
  if p0 != p1 or q0 != q1:
    raise ValueError(f'asymmetric padding {pad} has no Conv2d equivalent')
  conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=_stride(conv_nnx), padding=(p0, q0),
                   bias=conv_nnx.bias is not None)
  with torch.no_grad():
    conv.weight.copy_(_t(k.transpose(3, 2, 0, 1)))
    if conv_nnx.bias is not None:
      conv.bias.copy_(_t(conv_nnx.bias[...]))
  return conv


def _bn(bn_nnx) -> nn.BatchNorm2d:
  c = bn_nnx.scale[...].shape[0]
  bn = nn.BatchNorm2d(c, eps=bn_nnx.epsilon)
  with torch.no_grad():
    bn.weight.copy_(_t(bn_nnx.scale[...]))
    bn.bias.copy_(_t(bn_nnx.bias[...]))
    bn.running_mean.copy_(_t(bn_nnx.mean[...]))
    bn.running_var.copy_(_t(bn_nnx.var[...]))
  return bn


def _linear(lin_nnx) -> nn.Linear:
  k = np.asarray(lin_nnx.kernel[...])
  lin = nn.Linear(k.shape[0], k.shape[1])
  with torch.no_grad():
    lin.weight.copy_(_t(k.T))
    lin.bias.copy_(_t(lin_nnx.bias[...]))
  return lin


class _Normalize(nn.Module):
  def __init__(self, mean, std):
    super().__init__()
    self.register_buffer('mean', _t(mean).reshape(1, -1, 1, 1))
    self.register_buffer('std', _t(std).reshape(1, -1, 1, 1))

  def forward(self, x):
    return (x - self.mean) / self.std


class TorchCNNSmall(nn.Module):
  """`unmask_jax.models.cnn.CNNSmall` (conv-BN-ReLU blocks, max-pool, GAP, dense-ReLU, dense)."""

  def __init__(self, m):
    super().__init__()
    self.norm = _Normalize(m.mean, m.std)
    self.convs = nn.ModuleList([_conv(c) for c in m.convs])
    self.bns = nn.ModuleList([_bn(b) for b in m.bns])
    self.fc1 = _linear(m.fc1)
    self.fc2 = _linear(m.fc2)

    self.dropout = float(m.dropout.rate)

  def forward(self, x, mc_dropout: bool = False):
    """Logits; with `mc_dropout` the dropout before the head is active (one MC-dropout pass)."""
    x = self.norm(x)
    n = len(self.convs)
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = F.relu(bn(conv(x)))
      if i < n - 1:
        x = F.max_pool2d(x, 2, 2)
    x = F.relu(self.fc1(x.mean(dim=(2, 3))))
    # Dropout only with mc_dropout, as the JAX model applies it only when given a key.
    return self.fc2(F.dropout(x, self.dropout, training=mc_dropout))


class _Basic(nn.Module):
  def __init__(self, b):
    super().__init__()
    self.conv1, self.bn1 = _conv(b.conv1), _bn(b.bn1)
    self.conv2, self.bn2 = _conv(b.conv2), _bn(b.bn2)
    self.proj = (None if b.proj is None
                 else nn.Sequential(_conv(b.proj.conv), _bn(b.proj.bn)))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class _Bottleneck(nn.Module):
  def __init__(self, b):
    super().__init__()
    self.conv1, self.bn1 = _conv(b.conv1), _bn(b.bn1)
    self.conv2, self.bn2 = _conv(b.conv2), _bn(b.bn2)
    self.conv3, self.bn3 = _conv(b.conv3), _bn(b.bn3)
    self.proj = (None if b.proj is None
                 else nn.Sequential(_conv(b.proj.conv), _bn(b.proj.bn)))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class TorchResNet(nn.Module):
  """`unmask_jax.models.resnet.ResNet` (BasicBlock / Bottleneck, imagenet or cifar stem)."""

  def __init__(self, m):
    super().__init__()
    self.norm = _Normalize(m.mean, m.std)
    self.stem_conv = _conv(m.stem_conv)
    self.stem_bn = _bn(m.stem_bn)
    self.imagenet_stem = m.stem == 'imagenet'
    block = _Basic if type(m.blocks[0]).__name__ == 'BasicBlock' else _Bottleneck
    self.blocks = nn.ModuleList([block(b) for b in m.blocks])
    self.fc = _linear(m.fc)

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem_conv(self.norm(x))))
    if self.imagenet_stem:
      x = F.max_pool2d(x, 3, 2, padding=1)
    for b in self.blocks:
      x = b(x)
    return self.fc(x.mean(dim=(2, 3)))


class _ConvBlock(nn.Module):
  def __init__(self, b):
    super().__init__()
    self.conv1, self.bn1 = _conv(b.conv1), _bn(b.bn1)
    self.conv2, self.bn2 = _conv(b.conv2), _bn(b.bn2)

  def forward(self, x):
    return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TorchUNet(nn.Module):
  """`unmask_jax.models.unet.UNet` with nearest-neighbour upsampling: per-pixel logits, NCHW."""

  def __init__(self, m):
    super().__init__()
    if m.up[0].upsample != 'nearest':
      raise ValueError(f'only the nearest-upsampling U-Net is converted, got {m.up[0].upsample!r}')
    self.norm = _Normalize(m.mean, m.std)
    self.levels = m.levels
    self.down = nn.ModuleList([_ConvBlock(b) for b in m.down])
    self.bottleneck = _ConvBlock(m.bottleneck)
    self.up = nn.ModuleList([_ConvBlock(b.block) for b in m.up])
    self.out = _conv(m.out)

  def forward(self, x):
    x = self.norm(x)
    h, w = x.shape[2:]
    k = 2**self.levels
    ph, pw = -h % k, -w % k
    if ph or pw:  # edge padding at the bottom and right, as the JAX model
      x = F.pad(x, (0, pw, 0, ph), mode='replicate')
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = F.max_pool2d(x, 2, 2)
    x = self.bottleneck(x)
    for block, skip in zip(self.up, reversed(skips)):
      x = F.interpolate(x, scale_factor=2, mode='nearest')
      x = block(torch.cat([x, skip], dim=1))
    return self.out(x)[:, :, :h, :w]


def from_nnx(model) -> nn.Module:
  """The PyTorch twin of a `cnn_small`, `resnet*` or `unet` NNX model, eval mode, weights frozen."""
  name = type(model).__name__
  if name == 'CNNSmall':
    t = TorchCNNSmall(model)
  elif name == 'ResNet':
    t = TorchResNet(model)
  elif name == 'UNet':
    t = TorchUNet(model)
  else:
    raise TypeError(f'no PyTorch twin for {name}; supported: CNNSmall, ResNet, UNet')
  t.eval()
  for p in t.parameters():
    # The attacks need input gradients only; frozen weights let autograd skip weight gradients,
    # the fastest configuration of the reference (as `model.requires_grad_(False)` in advertorch).
    p.requires_grad_(False)
  return t


def to_torch_images(x_nhwc, channels_last: bool = False) -> torch.Tensor:
  """NHWC numpy/JAX images -> NCHW float32 torch tensor (optionally channels_last in memory)."""
  t = torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2)))
  return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def to_nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def _jax_outputs(jax_model, x_nhwc) -> np.ndarray:
  from unmask_jax.models import functional  # pylint: disable=import-outside-toplevel
  x = np.asarray(x_nhwc, np.float32)
  if type(jax_model).__name__ == 'UNet':
    return np.asarray(functional.segment_fn(jax_model)(x)).transpose(0, 3, 1, 2)
  return np.asarray(functional.logits_fn(jax_model)(x))


def max_logit_diff(jax_model, torch_model, x_nhwc) -> tuple[float, float]:
  """(largest |logit difference|, largest |logit|) of the NNX model (eval mode) and its twin."""
  ref = _jax_outputs(jax_model, x_nhwc)
  with torch.no_grad():
    out = torch_model(to_torch_images(x_nhwc)).numpy()
  return float(np.max(np.abs(ref - out))), float(np.max(np.abs(ref)))


def check_same_logits(jax_model, torch_model, x_nhwc, tol: float = 1e-4) -> float:
  """Raises AssertionError unless the two models' logits agree to `tol` (relative to scale)."""
  diff, scale = max_logit_diff(jax_model, torch_model, x_nhwc)
  scale = max(1.0, scale)
  if not diff <= tol * scale:
    raise AssertionError(f'PyTorch twin of {type(jax_model).__name__} differs from the JAX model '
                         f'by {diff:.3g} in the logits (tolerance {tol * scale:.3g}): weights were '
                         'not copied faithfully')
  return diff
