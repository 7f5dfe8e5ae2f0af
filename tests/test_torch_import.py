"""Weight import from torchvision format: logits equal a PyTorch reference to 1e-4.

The reference networks are written here with torchvision's exact module names and forward
functions (torchvision itself does not import beside the CPU torch 2.13.0), given random weights
and random BatchNorm statistics, and compared in eval mode on the same images at 224x224 and at
150x150 (the UnMask paper's input size, where odd feature-map sizes test the padding and pooling).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from unmask_jax.models import functional, torch_import  # noqa: E402
from unmask_jax.train import checkpoint  # noqa: E402

TOL = 1e-4


# ----------------------------------------------------------------------------- torchvision twins

class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision.models.resnet.ResNet (v1.5), same names and forward."""

  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


class _DenseLayer(nn.Module):
  def __init__(self, num_input_features, growth_rate, bn_size):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(num_input_features)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)

  def forward(self, features):
    x = torch.cat(features, 1)
    return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
  def __init__(self, num_layers, num_input_features, bn_size, growth_rate):
    super().__init__()
    for i in range(num_layers):
      self.add_module(f'denselayer{i + 1}',
                      _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

  def forward(self, init_features):
    features = [init_features]
    for _, layer in self.items():
      features.append(layer(features))
    return torch.cat(features, 1)


class _Transition(nn.Sequential):
  def __init__(self, num_input_features, num_output_features):
    super().__init__()
    self.norm = nn.BatchNorm2d(num_input_features)
    self.relu = nn.ReLU(inplace=True)
    self.conv = nn.Conv2d(num_input_features, num_output_features, 1, 1, bias=False)
    self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
  """torchvision.models.densenet.DenseNet, same names and forward."""

  def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
               bn_size=4, num_classes=1000):
    super().__init__()
    self.features = nn.Sequential()
    self.features.add_module('conv0', nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False))
    self.features.add_module('norm0', nn.BatchNorm2d(num_init_features))
    self.features.add_module('relu0', nn.ReLU(inplace=True))
    self.features.add_module('pool0', nn.MaxPool2d(3, 2, 1))
    n = num_init_features
    for i, num_layers in enumerate(block_config):
      self.features.add_module(f'denseblock{i + 1}', _DenseBlock(num_layers, n, bn_size, growth_rate))
      n += num_layers * growth_rate
      if i != len(block_config) - 1:
        self.features.add_module(f'transition{i + 1}', _Transition(n, n // 2))
        n //= 2
    self.features.add_module('norm5', nn.BatchNorm2d(n))
    self.classifier = nn.Linear(n, num_classes)

  def forward(self, x):
    out = F.relu(self.features(x), inplace=True)
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


def _reference(arch, num_classes=1000):
  torch.manual_seed({'resnet18': 0, 'resnet50': 1, 'densenet121': 2}[arch])
  net = {'resnet18': lambda: ResNet(BasicBlock, (2, 2, 2, 2), num_classes),
         'resnet50': lambda: ResNet(Bottleneck, (3, 4, 6, 3), num_classes),
         'densenet121': lambda: DenseNet(num_classes=num_classes)}[arch]()
  # Random BatchNorm statistics of the right scale: measure them on normalized random images
  # (momentum None = cumulative average; train mode, so each layer sees normalized inputs), then
  # perturb them and the affine parameters by a fraction of their scale, so that no layer is an
  # identity and the logits stay O(1..10) (a 1e-4 bound on exploding logits would test nothing).
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = None
  net.train()
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    net(_normalize(torch.rand(4, 3, 96, 96, generator=g)))
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.running_mean += 0.2 * m.running_var.sqrt() * torch.randn(c, generator=g)
        m.running_var *= 0.8 + 0.4 * torch.rand(c, generator=g)
        m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.momentum = 0.1
    # Trained ResNets scale their residual branches down (the last BN's gamma; Goyal et al. 2017
    # even start it at zero); without that the 16 unnormalized residual sums of a random ResNet-50
    # grow its logits to ~50, and the 1e-4 bound would measure float32 rounding of large numbers.
    for block in net.modules():
      last = getattr(block, 'bn3', None) or (getattr(block, 'bn2', None)
                                             if isinstance(block, BasicBlock) else None)
      if last is not None:
        last.weight.mul_(0.4)
    if isinstance(net, ResNet):
      # ... and give their logits an ImageNet model's spread (std ~2, extremes ~10), as DenseNet's.
      net.fc.weight.mul_(10.0)
  return net.eval()


def _normalize(x):
  """torchvision's Normalize(IMAGENET_MEAN, IMAGENET_STD) of NCHW pixels in [0, 1]."""
  mean = torch.tensor(torch_import.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(torch_import.IMAGENET_STD).view(1, 3, 1, 1)
  return (x - mean) / std


def _images(size, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (2, size, size, 3)).astype(np.float32)


def _torch_logits(net, x):
  # torchvision's input: ToTensor's [0, 1] pixels, then Normalize(mean, std), NCHW.
  with torch.no_grad():
    return net(_normalize(torch.from_numpy(x).permute(0, 3, 1, 2))).numpy()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """Reference nets and their state dicts saved as .pth, built once per module."""
  root = tmp_path_factory.mktemp('torch_weights')
  out = {}
  for arch in ('resnet18', 'resnet50', 'densenet121'):
    net = _reference(arch)
    path = str(root / f'{arch}.pth')
    torch.save(net.state_dict(), path)
    out[arch] = (net, path)
  return out


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50', 'densenet121'])
def test_logits_match_torch_at_224_and_150(saved, arch):
  net, path = saved[arch]
  model = torch_import.load_torchvision(arch, path)
  assert model.num_classes == 1000
  f = functional.logits_fn(model)
  for size in (224, 150):
    x = _images(size)
    # Full float32 convolutions also on a GPU (whose default may be TF32).
    with jax.default_matmul_precision('highest'):
      y = np.asarray(f(jax.numpy.asarray(x)))
    diff = np.abs(y - _torch_logits(net, x)).max()
    print(f'{arch} {size}x{size}: max |logits diff| = {diff:.2e}')
    assert diff <= TOL, (arch, size, diff)


def test_safetensors_new_head_and_workdir(saved, tmp_path):
  """.safetensors reads without torch.load; a new head keeps every other weight; the CLI's workdir
  loads with checkpoint.load_model and gives the same logits."""
  from safetensors.torch import save_file
  net, _ = saved['resnet18']
  st = str(tmp_path / 'r18.safetensors')
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, st)
  out = str(tmp_path / 'imported')
  torch_import.main(['--arch', 'resnet18', '--weights', st, '--num_classes', '6',
                     '--class_names', 'person,dog,bird,car,train,bottle', '--out', out])
  model, spec = checkpoint.load_model(out)
  assert spec['num_classes'] == 6 and spec['class_names'][0] == 'person'
  assert json.load(open(os.path.join(out, 'model.json')))['imported_from']['sha256']
  # The features (everything but the head) are torchvision's.
  x = _images(64, seed=1)
  with torch.no_grad():
    t = _normalize(torch.from_numpy(x).permute(0, 3, 1, 2))
    t = net.maxpool(net.relu(net.bn1(net.conv1(t))))
    t = net.layer4(net.layer3(net.layer2(net.layer1(t)))).mean((2, 3)).numpy()
  feats = np.asarray(functional.features_fn(model)(jax.numpy.asarray(x)))
  assert np.abs(feats - t).max() <= TOL
  assert np.asarray(functional.logits_fn(model)(jax.numpy.asarray(x))).shape == (2, 6)
  # A second conversion into the same workdir would overwrite its weights: an error.
  with pytest.raises(checkpoint.CheckpointError, match='already holds'):
    torch_import.main(['--arch', 'resnet18', '--weights', st, '--num_classes', '6',
                       '--class_names', 'person,dog,bird,car,train,bottle', '--out', out])


def test_old_densenet_names_and_mismatch_errors(saved):
  net, _ = saved['densenet121']
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  # Checkpoints saved before torchvision 0.3 (the published densenet121 file) say 'norm.1'.
  old = {k.replace('.norm1.', '.norm.1.').replace('.conv2.', '.conv.2.'): v for k, v in sd.items()}
  assert any('.norm.1.' in k for k in old)
  a = torch_import.load_torchvision('densenet121', old, num_classes=3)
  b = torch_import.load_torchvision('densenet121', sd, num_classes=3)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(a)),
               nnx.to_pure_dict(nnx.state(b)))
  with pytest.raises(ValueError, match='missing'):
    torch_import.load_torchvision('densenet121', {k: v for k, v in sd.items()
                                                  if 'norm5' not in k})
  with pytest.raises(ValueError, match='is it a resnet18'):
    torch_import.load_torchvision('resnet18', {k: v.numpy() for k, v in
                                               saved['resnet50'][0].state_dict().items()})
