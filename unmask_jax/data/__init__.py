"""Datasets: one registry of loaders, each `load(split, *, data_dir, **options) -> ArrayDataset`.

  synthparts    embedded, generated part dataset (default; no download)
  digits        scikit-learn's bundled 8x8 handwritten digits (embedded real data)
  pascal_part   VOC2010 + PASCAL-Part annotations from a manual directory
  image_folder  class-named sub-folders of images (ImageNet subset, Flickr test set, ...)
  mnist, fashion_mnist, cifar10   tensorflow-datasets' builders (need a download once)
"""
from __future__ import annotations

from unmask_jax.data.base import ArrayDataset, select_classes
from unmask_jax.registry import Registry

DATASETS = Registry('dataset', {
    'synthparts': 'unmask_jax.data.synthparts:load',
    'digits': 'unmask_jax.data.digits:load',
    'pascal_part': 'unmask_jax.data.pascal_part:load',
    'image_folder': 'unmask_jax.data.image_folder:load',
    'mnist': 'unmask_jax.data.tfds_catalog:load_mnist',
    'fashion_mnist': 'unmask_jax.data.tfds_catalog:load_fashion_mnist',
    'cifar10': 'unmask_jax.data.tfds_catalog:load_cifar10',
})


def load(name: str, split: str, *, data_dir: str, **options) -> ArrayDataset:
  """Loads a split of a registered dataset; `options` go to its loader."""
  return DATASETS.get(name)(split, data_dir=data_dir, **options)


__all__ = ['ArrayDataset', 'DATASETS', 'load', 'select_classes']
