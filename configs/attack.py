"""Attacks on a trained victim M (attack.py).

  python3 attack.py --config=configs/attack.py --config.model_dir=runs/m_cs3a --workdir=runs/attacks_cs3a

The data (dataset, class set) is the model's own, read from its model.json. With an empty
`attacks` list the paper's 8 vectors are run (+ FGSM references): PGD-L∞ and MI-FGSM-L∞ at 8/255
and 16/255, PGD-L2 and MI-FGSM-L2 at 300/255 and 600/255 rescaled to the image size, 20 steps.
Entries are "label=spec", e.g. "PGD8=pgd_linf(eps=8/255, steps=20)".
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model_dir = ''
  c.data_dir = 'data'
  c.split = 'test'
  c.max_examples = 0
  c.attacks = ()
  c.steps = 20
  c.batch_size = 128
  c.seed = 0
  return c
