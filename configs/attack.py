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
  c.model_dir = ''        # the victim: a train_m.py workdir (or a torch_import --out)
  c.data_dir = 'data'     # where the datasets are built
  c.split = 'test'        # 'test', or 'validation' for held-out attacks (LR combiner)
  c.max_examples = 0      # attack the first N images of the split (0 = all)
  c.attacks = ()          # "label=spec" entries; () = the paper's vectors
  c.extra_attacks = ()    # "label=spec" entries run after those (e.g. AutoAttack)
  c.steps = 20            # iterations of the paper's vectors
  c.batch_size = 128      # images per compiled call (last batch padded)
  c.seed = 0              # random starts
  return c
