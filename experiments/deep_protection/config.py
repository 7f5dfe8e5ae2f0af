"""Kulkarni & Ambati's Deep Protection stop rules on a class set of the main job (study.py).

  python3 main.py --workdir=runs/main          # first: M, its attacks (and the held-out ones)
  python3 -m experiments.deep_protection.study --workdir=runs/deep_protection
  # on the smoke run of `python3 main.py --config=configs/quick.py --workdir=runs/quick`:
  python3 -m experiments.deep_protection.study \
      --config=experiments/deep_protection/config.py:quick --workdir=/tmp/dp

Restores the first `dip.n_images` CS3a test images, clean and under each of `attacks`, plus
`dip.val_size` clean validation images with one Deep Image Prior trajectory each, and compares the
fixed (chosen on validation), automatic (label-free) and oracle (true label; an upper bound) stops
(`unmask_jax.eval.deep_protection_eval`). The settings, images and random key are those of the
evaluation's `dip` block (`configs/evaluate.py`; `configs/quick.py` for `:quick`), so the study
reproduces number for number the "CS3A: Deep Protection" section that the evaluation writes when
`dip.class_sets` names the class set (the main job leaves it off since issue #15: it took 173-214
of its seconds; the smoke run keeps it); change them here to study other budgets.

Expect (measured on runs/main cs3a, 32 validation + 32 test images x (clean + 5 attacks) = 224
images x 250 iterations = 56,000 image-iterations): 186 s of CPU time, 179 s wall on the 2-core
machine while other jobs kept its load at ~4; estimated ~100 s wall on an idle machine (CPU time
times the wall/CPU ratio, 0.54, of the (32, 64, 64) generator, which at 4.3 ms per image-iteration
idle costs 2.9x the CPU time of the (16, 32, 32) one used here). With 300 iterations (CPU 234 s)
the fixed and oracle results were identical and 'auto' within one image per set. Results (README,
"Kulkarni & Ambati"): fixed stop 50-97% accuracy under the five attacks (0-41% undefended), auto
59-97%, oracle 88-100%.
"""
import ml_collections
from ml_collections import config_dict


def get_config(kind: str = 'full') -> ml_collections.ConfigDict:
  """The study's config; `kind='quick'` (`:quick` on the command line): configs/quick.py's run."""
  if kind == 'quick':
    return quick()
  if kind != 'full':
    raise ValueError(f"kind must be 'full' or 'quick', got {kind!r}")
  c = ml_collections.ConfigDict()
  # Inputs: the main job's layout under `main_workdir` (m_<class set>, attacks_<class set>, and
  # attacks_holdout_<class set> whose images the evaluation keeps out of the validation images).
  c.main_workdir = 'runs/main'
  c.class_set = 'cs3a'
  c.data_dir = 'data'               # the main job's --config.data_dir
  c.seed = 0                        # the evaluation's seed: DIP's key is derived from it
  c.max_validation = 0              # validation images kept after the held-out ones (0 = all)
  # Attack labels of attacks_<class set> (attack.py), restored in this order.
  c.attacks = ('PGD-Linf-8', 'PGD-Linf-16', 'MIFGSM-Linf-8', 'MIFGSM-Linf-16', 'PGD-L2-600')
  # Every option of `deep_protection_eval.default_config()`, at the main job's values.
  c.dip = ml_collections.ConfigDict({
      'n_images': 32,          # first n test images (each clean and under every attack)
      'val_size': 32,          # first clean validation images, to choose the fixed stop
      'max_iters': 250,        # every image runs this long (the trajectory)
      'check_every': 25,       # iterations between checkpoints
      'chunk': 32,             # images restored at once
      'iters': config_dict.placeholder(int),  # fixed stop: None = chosen on validation
      'fit_tolerance': 0.01,   # fixed stop: earliest checkpoint within this of the best val acc
      'min_iters': 100,        # 'auto' rule (see defenses/deep_protection.py)
      'auto_tol': 0.01,
      'noise_level': config_dict.placeholder(float),  # None: estimated per input, label-free
      'oracle_topk': 5,        # Kulkarni & Ambati's top-5, capped at num_classes // 10 (>= 1)
      'widths': (16, 32, 32),  # channels per scale; (32, 64, 64) costs ~2.9x per iteration
      'skip_channels': 4,
      'input_depth': 8,        # Kulkarni & Ambati / DIP: 32; 8 for speed
      'input_scale': 0.1,
      'reg_noise_std': 1.0 / 30.0,
      'lr': 0.01,
      'ema': 0.99,
      'conv': 'im2col',
  })
  return c


def quick() -> ml_collections.ConfigDict:
  """configs/quick.py's settings: one attack, 6 + 6 images, 50 iterations; seconds on a CPU."""
  c = get_config()
  c.main_workdir = 'runs/quick'
  c.attacks = ('PGD-Linf-8',)
  c.dip.update({'n_images': 6, 'val_size': 6, 'max_iters': 50, 'widths': (8, 16)})
  return c
