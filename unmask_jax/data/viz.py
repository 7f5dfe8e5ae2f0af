"""Pictures of part datasets, so a person can judge the data by eye."""
from __future__ import annotations

import colorsys
import os

import numpy as np

from unmask_jax.data import parts


def colour_mask(mask: np.ndarray) -> np.ndarray:
  """uint8 [H, W] part-id mask -> float RGB [H, W, 3]; one fixed colour per part, black background."""
  lut = np.zeros((parts.NUM_PARTS + 1, 3), np.float32)
  for i in range(parts.NUM_PARTS):
    lut[i + 1] = colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, 0.9, 1.0)
  return lut[mask]


def save_example_grid(ds, path: str, *, per_class: int = 4, title: str = '') -> str:
  """Writes a PNG: for each class, `per_class` examples as image | coloured part mask, with part names."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  labels = ds.arrays['label']
  rows = []
  for c in range(ds.num_classes):
    rows.append(np.flatnonzero(labels == c)[:per_class])
  fig, axes = plt.subplots(len(rows), 2 * per_class, figsize=(2.0 * 2 * per_class, 2.3 * len(rows)),
                           squeeze=False)
  for r, idx in enumerate(rows):
    for j in range(per_class):
      ax_img, ax_mask = axes[r, 2 * j], axes[r, 2 * j + 1]
      for ax in (ax_img, ax_mask):
        ax.axis('off')
      if j >= len(idx):
        continue
      i = idx[j]
      ax_img.imshow(ds.arrays['image'][i], interpolation='nearest')
      ax_img.set_title(ds.class_names[labels[i]], fontsize=9)
      if 'mask' in ds.arrays:
        ax_mask.imshow(colour_mask(ds.arrays['mask'][i]), interpolation='nearest')
        names = [parts.PART_NAMES[p] for p in np.flatnonzero(ds.arrays['parts'][i])]
        ax_mask.set_title('\n'.join(names), fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def main(argv=None) -> str:
  """`python3 -m unmask_jax.data.viz --out grid.png [--size 64] [--split test]`: look at SynthParts."""
  import argparse
  from unmask_jax.data import synthparts
  p = argparse.ArgumentParser(description='Writes a PNG grid of SynthParts examples with their part masks.')
  p.add_argument('--out', default='synthparts_examples.png', help='PNG file to write.')
  p.add_argument('--data_dir', default='data', help='Where the generated dataset is cached.')
  p.add_argument('--split', default='train', choices=('train', 'validation', 'test'))
  p.add_argument('--size', type=int, default=32, help='Image size in pixels (>= 24).')
  p.add_argument('--seed', type=int, default=0, help='Generation seed.')
  p.add_argument('--per_class', type=int, default=4, help='Examples shown per class.')
  a = p.parse_args(argv)
  ds = synthparts.load(a.split, data_dir=a.data_dir, size=a.size, seed=a.seed)
  path = save_example_grid(ds, a.out, per_class=a.per_class,
                           title=f'SynthParts {a.split} {a.size}x{a.size} (seed {a.seed}): image | part mask')
  print(path)
  return path


if __name__ == '__main__':
  main()
