"""Models: classifiers M and the part segmenter K, all Flax NNX modules.

  resnet10/18/34/50  ResNet (BasicBlock / Bottleneck), imagenet or cifar stem, width configurable
  densenet121        DenseNet-BC-121, growth rate configurable
  cnn_mnist          the MNIST CNN of Feinman et al. (fixed input size, `image_size`)
  cnn_small          a small conv-BN-ReLU CNN that trains in minutes on a CPU
  unet               U-Net part segmenter K: per-pixel logits over NUM_PARTS + 1 classes
  mrr_defender       an MRR defender: a victim architecture's trunk, L2-normalised features, centres

Classifiers share one interface (`features`, `head`, `__call__`, each with an optional
`dropout_key`; see `models.base`); `models.functional` turns a model into the pure functions that
attacks and detectors receive.

Example:
  model = models.create('resnet18', num_classes=10, width=16, stem='cifar', rngs=nnx.Rngs(0))
"""
from __future__ import annotations

from typing import Any

from unmask_jax.registry import Registry, check_kwargs

MODELS = Registry('model', {
    'resnet10': 'unmask_jax.models.resnet:resnet10',
    'resnet18': 'unmask_jax.models.resnet:resnet18',
    'resnet34': 'unmask_jax.models.resnet:resnet34',
    'resnet50': 'unmask_jax.models.resnet:resnet50',
    'densenet121': 'unmask_jax.models.densenet:densenet121',
    'cnn_mnist': 'unmask_jax.models.cnn:cnn_mnist',
    'cnn_small': 'unmask_jax.models.cnn:cnn_small',
    'unet': 'unmask_jax.models.unet:unet',
    'mrr_defender': 'unmask_jax.models.defender:mrr_defender',
})

_RESERVED = ('num_classes', 'in_channels', 'rngs')


def create(name: str, *, num_classes: int, in_channels: int = 3, rngs: Any, **kwargs) -> Any:
  """Builds a registered model.

  Args:
    name: a name in `MODELS` (a KeyError lists the valid names otherwise).
    num_classes: number of logits; for 'unet' the per-pixel classes, NUM_PARTS + 1.
    in_channels: channels of the input images.
    rngs: an `nnx.Rngs` for parameter initialization.
    **kwargs: the model's options (a TypeError lists the valid ones otherwise).

  Returns:
    The `nnx.Module`, in train mode (call `.eval()` for inference with BatchNorm running stats).
  """
  factory = MODELS.get(name)
  check_kwargs('model', name, factory, kwargs, reserved=_RESERVED)
  return factory(num_classes=num_classes, in_channels=in_channels, rngs=rngs, **kwargs)


__all__ = ['MODELS', 'create']
