"""The models and images every benchmark uses, built the same way for JAX and PyTorch.

  cnn_small   the SynthParts victim M (configs/synthparts_m.py: widths (16, 32, 64), 128 features,
              3 classes). Trained weights are read from runs/main/m_cs3a when the main job has been
              run (and not in --smoke); otherwise the weights are a seeded random initialisation.
  resnet18    ResNet-18 (BasicBlocks 2-2-2-2, CIFAR stem for 32x32 inputs, `RESNET_WIDTH` channels
              in the first stage), 3 classes, seeded random initialisation.
  unet        the part segmenter K (configs/synthparts_k.py: width 16, 3 levels), random init.

Images are SynthParts CS3a test-distribution renderings (no dataset build needed). Attack labels are
the model's own clean predictions, so "success" means the share of predictions an attack flipped;
for a trained M this is within its test error of the usual definition.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from benchmarks import timing
from unmask_jax import models
from unmask_jax.data import parts, synthparts
from unmask_jax.models import functional

TRAINED_M = os.path.join(timing.REPO, 'runs', 'main', 'm_cs3a')
CLASS_SET = 'cs3a'
M_KWARGS = {'widths': (16, 32, 64), 'feature_dim': 128}
K_KWARGS = {'width': 16, 'levels': 3}
# Width 16 (a quarter of the ImageNet ResNet-18's 64, 1/16 of its FLOPs, 0.70 M parameters) keeps
# PGD-20 on 128 images in seconds on 2 cores while keeping all 18 layers and their shapes.
RESNET_WIDTH = 16


@dataclasses.dataclass
class Victim:
  name: str
  model: nnx.Module          # eval mode
  logits_fn: jax.tree_util.Partial
  weights: str               # where the weights came from, for the report
  params: int


def _finish(name, model, weights) -> Victim:
  model.eval()
  return Victim(name, model, functional.logits_fn(model), weights, functional.param_count(model))


def cnn_small(trained: bool = True) -> Victim:
  """The SynthParts victim M; trained weights if runs/main/m_cs3a exists and `trained`."""
  if trained and os.path.exists(os.path.join(TRAINED_M, 'model.json')):
    from unmask_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
    try:
      model, spec = checkpoint.load_model(TRAINED_M)
      if spec['model'] == 'cnn_small' and tuple(spec['model_kwargs']['widths']) == M_KWARGS['widths']:
        return _finish('cnn_small', model, 'trained (runs/main/m_cs3a)')
    except Exception as e:  # pylint: disable=broad-except
      print(f'  (could not load {TRAINED_M}: {type(e).__name__}: {str(e)[:120]}; random init)')
  model = models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), **M_KWARGS)
  return _finish('cnn_small', model, 'random init (seed 0)')


def resnet18() -> Victim:
  model = models.create('resnet18', num_classes=3, rngs=nnx.Rngs(0), width=RESNET_WIDTH,
                        stem='cifar')
  return _finish('resnet18', model, f'random init (seed 0), width {RESNET_WIDTH}, CIFAR stem')


def unet() -> nnx.Module:
  model = models.create('unet', num_classes=parts.NUM_PARTS + 1, rngs=nnx.Rngs(0), **K_KWARGS)
  model.eval()
  return model


def images(n: int, size: int = 32, split: str = 'test') -> dict[str, np.ndarray]:
  """n SynthParts CS3a images rendered at `size` px: 'image' [n, size, size, 3] float32 in [0, 1],
  'label' [n] int32, 'parts' [n, P] uint8 (ground-truth part presence)."""
  classes = parts.class_set(CLASS_SET)
  out = {'image': [], 'label': [], 'parts': []}
  for _, (_, ex) in zip(range(n), synthparts.generate_split(split, -(-n // len(classes)), size=size,
                                                       classes=classes)):
    out['image'].append(ex['image'])
    out['label'].append(ex['label'])
    out['parts'].append(ex['parts'])
  return {'image': np.stack(out['image']).astype(np.float32) / 255.0,
          'label': np.asarray(out['label'], np.int32),
          'parts': np.stack(out['parts'])}


@jax.jit
def _argmax(logits_fn, x):
  return logits_fn(x).argmax(-1)


def predictions(logits_fn, x: np.ndarray) -> np.ndarray:
  """The predicted classes [N] int32 (`logits_fn` is a functional.* Partial, a jit argument)."""
  return np.asarray(_argmax(logits_fn, x)).astype(np.int32)
