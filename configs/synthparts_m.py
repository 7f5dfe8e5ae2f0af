"""Victim M (small CNN) on one SynthParts class set (default CS3a; change with
--config.data.class_set=cs3b|cs5a|cs5b).

  python3 train_m.py --config=configs/synthparts_m.py --workdir=runs/m_cs3a

Expect (2-core CPU): clean test accuracy >= 0.95 in under 3 minutes.
Adversarial-training baseline: add --config.adv_training.enabled=True (PGD-L∞ eps 4/255, 7 steps).
"""
from configs import common


def get_config():
  c = common.base()
  c.data.class_set = 'cs3a'
  c.model.name = 'cnn_small'
  # Half the default widths: 2x cheaper per step (4x at inference), which matters most for
  # adversarial training (8 forward-backward passes per step) and for the attacks.
  c.model.kwargs = {'widths': (16, 32, 64), 'feature_dim': 128}
  c.optimizer.learning_rate = 3e-3
  c.num_epochs = 16
  return c
