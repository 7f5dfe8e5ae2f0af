"""Datasets: one registry of loaders, each `load(split, *, data_dir, **options) -> ArrayDataset`.

  synthparts    embedded, generated part dataset (default; no download)
  digits        scikit-learn's bundled 8x8 handwritten digits (embedded real data)
  pascal_part   VOC2010 + PASCAL-Part annotations from a manual directory
  image_folder  class-named sub-folders of images (ImageNet subset, Flickr test set, ...)
  mnist, fashion_mnist, cifar10   a built tfds copy, or the raw files in
                                  <data_dir>/downloads/manual/<name>/ (tfds' own download needs TensorFlow)
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


def load_from_config(data_cfg, split: str, *, data_dir: str) -> ArrayDataset:
  """Loads a split described by a data config (name, options, class_set or classes, max_<split>).

  The class set (e.g. 'cs3a') or explicit `classes` restrict and relabel the data in that order;
  `max_<split>` > 0 keeps only the first examples (quick runs).
  """
  from unmask_jax.data import parts
  d = dict(data_cfg)
  ds = load(d['name'], split, data_dir=data_dir, **dict(d.get('options') or {}))
  classes = tuple(d.get('classes') or ())
  if d.get('class_set'):
    classes = parts.class_set(d['class_set'])
  if classes:
    ds = select_classes(ds, classes)
  limit = d.get(f'max_{split}', 0)
  if limit:
    ds = ds.take(slice(0, min(limit, len(ds))))
  if len(ds) == 0:
    raise ValueError(f'{d["name"]}/{split} is empty after selecting classes {classes}')
  return ds


__all__ = ['ArrayDataset', 'DATASETS', 'load', 'load_from_config', 'select_classes']
