"""The dropout CNN of Tuna et al. 2021 / Feinman et al. (Conv-Conv-Pool-Dropout-Dense128-Dropout-Dense)
on scikit-learn's embedded 8x8 digits.

  python3 train_m.py --config=configs/digits_cnn.py --workdir=runs/digits_cnn

Expect: clean test accuracy >= 0.95 (Adam 1e-3, batch 64).
"""
from configs import common


def get_config():
  c = common.base()
  c.data.name = 'digits'
  c.model.name = 'cnn_mnist'
  c.model.kwargs = {'padding': 'same', 'image_size': 8}
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'constant'
  c.batch_size = 64
  c.num_epochs = 40
  return c
