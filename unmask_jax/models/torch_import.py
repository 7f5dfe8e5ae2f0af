"""Import torchvision-format weights (ResNet-18/34/50, DenseNet-121) into the NNX models.

A torchvision state dict (`.pth`/`.pt` read with `torch.load(weights_only=True)`, or
`.safetensors`, which needs no torch) is copied into `models.resnet.ResNet` /
`models.densenet.DenseNet` built with the ImageNet stem, width 64 / growth rate 32 and
torchvision's input normalization inside the model:

  x_model = (x - mean) / std,  mean = (0.485, 0.456, 0.406),  std = (0.229, 0.224, 0.225)

for pixels x in [0, 1] (torchvision's `transforms.ToTensor` + `Normalize`), so an imported model
takes the library's usual input and returns torchvision's logits (tests/test_torch_import.py: max
|difference| ~1e-5 at 224x224 and 150x150).

Layouts: a convolution weight [O, I, kh, kw] (OIHW) becomes the kernel [kh, kw, I, O] (HWIO); a
linear weight [out, in] becomes the kernel [in, out]; BatchNorm (weight, bias, running_mean,
running_var) becomes (scale, bias, mean, var); `num_batches_tracked` is dropped (momentum 0.1,
as the models here). Both architectures here equal torchvision's function (padding k // 2,
BN eps 1e-5, ResNet v1.5 with the stride on the 3x3 conv and a conv1x1+BN downsample, DenseNet's
BN-ReLU-conv layers, BN-ReLU-conv-avgpool transitions and final norm5 + ReLU + global mean).

With `num_classes` different from the checkpoint's 1000, the head (`fc` / `classifier`) is not
copied: the model's own head stays, randomly initialized from `seed` (LeCun normal), to be
fine-tuned, as UnMask (Freitas et al., 2020) fine-tuned ImageNet ResNet-50/DenseNet-121 at 150x150.

Library use:
  model = torch_import.load_torchvision('resnet50', 'resnet50-11ad3fa6.pth', num_classes=6)
Command line (writes a workdir that `train.checkpoint.load_model` and attack.py read):
  python3 -m unmask_jax.models.torch_import --arch resnet50 --weights resnet50.pth \
      --num_classes 6 --out runs/resnet50_imported
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
from flax import nnx
from flax import traverse_util

from unmask_jax import models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ('resnet18', 'resnet34', 'resnet50', 'densenet121')

_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
# torchvision's own loader rewrites DenseNet checkpoints saved before torchvision 0.3 ('norm.1'
# instead of 'norm1'), which is what the published densenet121-a639ec97.pth still holds.
_OLD_DENSENET = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def model_kwargs(arch: str) -> dict:
  """The registry kwargs of a torchvision-equivalent `arch` (what model.json records)."""
  if arch not in ARCHS:
    raise ValueError(f'arch must be one of {ARCHS}, got {arch!r}')
  kw = {'stem': 'imagenet', 'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD)}
  kw.update({'growth_rate': 32} if arch == 'densenet121' else {'width': 64})
  return kw


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torchvision state dict as float32 numpy arrays.

  `.safetensors` is read with `safetensors.numpy` (no torch needed); anything else with
  `torch.load(path, map_location='cpu', weights_only=True)` (which runs no pickled code). A
  training checkpoint wrapping the weights under 'state_dict' or 'model', and DataParallel's
  'module.' prefix, are unwrapped.
  """
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    sd: Mapping[str, Any] = load_file(path)
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError('reading .pth weights needs torch: pip install "unmask-jax[torch]" '
                        '(or convert them to .safetensors)') from e
    sd = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
      if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
        sd = sd[wrapper]
  out = {}
  for name, value in sd.items():
    if hasattr(value, 'detach'):  # a torch tensor
      value = value.detach().cpu().float().numpy()
    name = name[len('module.'):] if name.startswith('module.') else name
    out[name] = np.asarray(value)
  return out


def _resnet_path(parts: list[str], block_starts: Sequence[int]) -> tuple | None:
  """torchvision ResNet name (split on '.') -> path in the NNX state, or None to skip."""
  if parts[0] == 'conv1':
    return ('stem_conv', 'kernel')
  if parts[0] == 'bn1':
    return ('stem_bn', _BN[parts[1]])
  if parts[0] == 'fc':
    return ('fc', {'weight': 'kernel', 'bias': 'bias'}[parts[1]])
  m = re.fullmatch(r'layer([1-4])', parts[0])
  if m is None:
    return None
  block = block_starts[int(m.group(1)) - 1] + int(parts[1])
  layer, leaf = parts[2], parts[-1]
  if layer == 'downsample':  # downsample.0 = conv1x1, downsample.1 = BN
    return ('blocks', block, 'proj') + (('conv', 'kernel') if parts[3] == '0' else ('bn', _BN[leaf]))
  if layer.startswith('conv'):
    return ('blocks', block, layer, 'kernel')
  return ('blocks', block, layer, _BN[leaf])


def _densenet_path(parts: list[str]) -> tuple | None:
  """torchvision DenseNet name -> path in the NNX state, or None to skip."""
  if parts[0] == 'classifier':
    return ('fc', {'weight': 'kernel', 'bias': 'bias'}[parts[1]])
  if parts[0] != 'features':
    return None
  name, leaf = parts[1], parts[-1]
  if name == 'conv0':
    return ('stem_conv', 'kernel')
  if name == 'norm0':
    return ('stem_bn', _BN[leaf])
  if name == 'norm5':
    return ('final_bn', _BN[leaf])
  m = re.fullmatch(r'denseblock(\d+)', name)
  if m:
    layer = int(re.fullmatch(r'denselayer(\d+)', parts[2]).group(1)) - 1
    sub = parts[3]
    return ('dense_blocks', int(m.group(1)) - 1, layer, sub.replace('norm', 'bn'),
            'kernel' if sub.startswith('conv') else _BN[leaf])
  m = re.fullmatch(r'transition(\d+)', name)
  if m:
    sub = parts[2]
    return ('transitions', int(m.group(1)) - 1,
            'conv' if sub == 'conv' else 'bn', 'kernel' if sub == 'conv' else _BN[leaf])
  return None


def _to_jax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel' and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  if path[-1] == 'kernel' and value.ndim == 2:
    return value.T                            # [out, in] -> [in, out]
  return value


def load_state_dict(model: nnx.Module, arch: str, state_dict: Mapping[str, np.ndarray], *,
                    load_head: bool = True) -> nnx.Module:
  """Copies a torchvision `state_dict` into `model` (an `arch` built with `model_kwargs(arch)`).

  Strict: every parameter and BatchNorm statistic of the model (the head only if `load_head`)
  must be set exactly once with the same shape, and every checkpoint entry (apart from
  `num_batches_tracked` and, without `load_head`, the head) must have a place; otherwise a
  ValueError names the mismatches. Returns `model`, updated in place.
  """
  if arch not in ARCHS:
    raise ValueError(f'arch must be one of {ARCHS}, got {arch!r}')
  state = nnx.state(model)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  if arch.startswith('resnet'):
    counts = models.resnet.STAGES[int(arch[len('resnet'):])][1]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
  head = ('fc',)
  unused, seen = [], set()
  for name, value in state_dict.items():
    m = _OLD_DENSENET.match(name)
    if m:
      name = m.group(1) + m.group(2)
    if name.endswith('num_batches_tracked'):
      continue
    parts = name.split('.')
    try:
      path = _resnet_path(parts, starts) if arch.startswith('resnet') else _densenet_path(parts)
    except (KeyError, AttributeError, IndexError, ValueError):
      path = None
    if path is not None and path[:1] == head and not load_head:
      continue
    if path is None or path not in flat:
      unused.append(name)
      continue
    value = _to_jax_layout(path, np.asarray(value, np.float32))
    if value.shape != flat[path].shape:
      raise ValueError(f'{name}: checkpoint shape {value.shape} (after layout change) != model '
                       f'{"/".join(map(str, path))} {flat[path].shape}; is it a {arch}?')
    flat[path] = value
    seen.add(path)
  missing = [p for p in flat if p not in seen and (load_head or p[:1] != head)]
  if unused or missing:
    raise ValueError(f'{arch} state dict does not match the model: unexpected entries '
                     f'{unused[:10]}{"..." if len(unused) > 10 else ""}, missing '
                     f'{["/".join(map(str, p)) for p in missing[:10]]}'
                     f'{"..." if len(missing) > 10 else ""}')
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
  return model


def checkpoint_num_classes(arch: str, state_dict: Mapping[str, np.ndarray]) -> int:
  """The class count of the checkpoint's head (fc.weight / classifier.weight rows)."""
  name = 'classifier.weight' if arch == 'densenet121' else 'fc.weight'
  for key in (name, f'module.{name}'):
    if key in state_dict:
      return int(state_dict[key].shape[0])
  raise ValueError(f'no {name} in the state dict: is it a torchvision {arch}?')


def load_torchvision(arch: str, weights: str | Mapping[str, np.ndarray], *,
                     num_classes: int | None = None, seed: int = 0, dropout: float = 0.0
                     ) -> nnx.Module:
  """Builds `arch` with torchvision's normalization and loads torchvision weights into it.

  Args:
    arch: 'resnet18', 'resnet34', 'resnet50' or 'densenet121'.
    weights: a `.pth`/`.pt`/`.safetensors` path, or a state dict of arrays.
    num_classes: logits of the returned model; None keeps the checkpoint's (1000 for ImageNet).
      A different count gets a new head, randomly initialized from `seed`.
    seed: initialization of the new head (unused when the head is loaded).
    dropout: dropout rate before the head (applied only with a dropout key, as all models here).

  Returns:
    The model in eval mode (BatchNorm running statistics), input NHWC in [0, 1].
  """
  sd = read_state_dict(weights) if isinstance(weights, str) else dict(weights)
  ckpt_classes = checkpoint_num_classes(arch, sd)
  num_classes = ckpt_classes if num_classes is None else int(num_classes)
  model = models.create(arch, num_classes=num_classes, rngs=nnx.Rngs(seed), dropout=dropout,
                        **model_kwargs(arch))
  load_state_dict(model, arch, sd, load_head=num_classes == ckpt_classes)
  model.eval()
  return model


def save_workdir(model: nnx.Module, arch: str, out: str, *, num_classes: int,
                 source: str | None = None, class_names: Sequence[str] | None = None,
                 dropout: float = 0.0) -> dict:
  """Writes `model` as a training workdir (model.json + ckpt/best) that `load_model` reads.

  Uses `train.checkpoint`'s own writers, so the layout is exactly a train_m.py workdir's; only
  'best' is written (no 'latest': there is no optimizer state to resume). The spec has no data
  (dataset / data_config None): pass a model_dir's data to attack.py through its config.
  Returns the spec.
  """
  from unmask_jax.train import checkpoint as ckpt
  names = list(class_names) if class_names else [f'class_{i}' for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} class names for {num_classes} classes')
  kwargs = model_kwargs(arch)
  if dropout:
    kwargs['dropout'] = dropout
  spec = {
      'task': 'classifier', 'model': arch, 'model_kwargs': kwargs, 'num_classes': num_classes,
      'in_channels': 3, 'image_shape': None, 'class_names': names, 'dataset': None,
      'data_config': None, 'train_fingerprint': None, 'adv_training': False,
      'imported_from': None if source is None else {
          'path': os.path.abspath(source), 'sha256': _sha256(source)},
  }
  ckpt.check_model_spec(out, spec)  # a workdir holding another model is an error
  if os.path.isdir(os.path.join(out, 'ckpt')):
    # Even with an equal spec the weights may differ (another head seed): never overwrite them.
    raise ckpt.CheckpointError(f'{out} already holds a checkpoint; convert into a new --out, or '
                               'delete it first.')
  os.makedirs(out, exist_ok=True)
  mgr = ckpt.manager(out, 'best')
  try:
    ckpt.save(mgr, 0, nnx.state(model), {'epoch': 0, 'imported': True})
  finally:
    mgr.close()
  # model.json last: a conversion that fails midway leaves no workdir that claims a model.
  path = os.path.join(out, ckpt.MODEL_SPEC)
  if not os.path.exists(path):
    ckpt.write_json_atomic(path, spec)
  return spec


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  p = argparse.ArgumentParser(
      prog='python3 -m unmask_jax.models.torch_import',
      description='Convert torchvision ResNet/DenseNet weights into a workdir that attack.py, '
                  'evaluate.py and train.checkpoint.load_model read.')
  p.add_argument('--arch', required=True, choices=ARCHS)
  p.add_argument('--weights', required=True, help='torchvision .pth/.pt or .safetensors file')
  p.add_argument('--out', required=True, help='workdir to write (model.json + ckpt/best)')
  p.add_argument('--num_classes', type=int, default=None,
                 help="logits of the new model; default: the checkpoint's (1000); another count "
                      'gets a new, randomly initialized head')
  p.add_argument('--class_names', default='', help='comma-separated names, one per class')
  p.add_argument('--seed', type=int, default=0, help='initialization of a new head')
  p.add_argument('--dropout', type=float, default=0.0, help='dropout before the head')
  args = p.parse_args(argv)
  sd = read_state_dict(args.weights)
  model = load_torchvision(args.arch, sd, num_classes=args.num_classes, seed=args.seed,
                           dropout=args.dropout)
  names = [n.strip() for n in args.class_names.split(',') if n.strip()] or None
  save_workdir(model, args.arch, args.out, num_classes=model.num_classes, source=args.weights,
               class_names=names, dropout=args.dropout)
  new_head = model.num_classes != checkpoint_num_classes(args.arch, sd)
  print(f'wrote {args.out}: {args.arch}, {model.num_classes} classes, '
        f'{f"new head (seed {args.seed})" if new_head else "head loaded"}')


if __name__ == '__main__':
  main()
