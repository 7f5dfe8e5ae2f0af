"""Evaluation of UnMask (and the other defenses) against stored attack results (evaluate.py).

  python3 evaluate.py --config=configs/evaluate.py --workdir=runs/eval --config.k_dir=runs/k \
      --config.class_sets.cs3a.m_dir=runs/m_cs3a --config.class_sets.cs3a.attacks_dir=runs/attacks_cs3a \
      --config.class_sets.cs3a.at_dir=runs/at_cs3a --config.class_sets.cs3a.at_attacks_dir=runs/attacks_at_cs3a

Each class set names its M (train_m.py workdir), the attack results on M (attack.py workdir) and,
optionally, the adversarially trained M and the attacks on it (for the AT column). Writes
report.md, results.json and roc_<class set>.png to --workdir.
"""
import ml_collections


def class_set_dirs(root: str, name: str) -> ml_collections.ConfigDict:
  """The directory layout the main job uses under `root`."""
  return ml_collections.ConfigDict({
      'm_dir': f'{root}/m_{name}', 'attacks_dir': f'{root}/attacks_{name}',
      'at_dir': f'{root}/at_{name}', 'at_attacks_dir': f'{root}/attacks_at_{name}'})


def get_config():
  c = ml_collections.ConfigDict()
  c.k_dir = 'runs/main/k'
  c.data_dir = 'data'
  c.class_sets = ml_collections.ConfigDict({n: class_set_dirs('runs/main', n) for n in ('cs3a', 'cs3b')})
  c.defenses = ('unmask', 'mc_dropout(metric="mutual_information")', 'kde', 'kl')
  c.max_validation = 0     # clean validation images for thresholds (0 = all)
  c.max_fit = 2000         # clean training images the defenses are fitted on
  c.batch_size = 128
  c.seed = 0
  return c
