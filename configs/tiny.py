"""Tiny configs for tests and smoke runs (seconds on a CPU): get_config('k'|'m'|'digits')."""
from configs import common, digits_cnn, synthparts_k, synthparts_m


def get_config(kind: str = 'm'):
  if kind == 'k':
    c = synthparts_k.get_config()
    c.model.kwargs = {'width': 4, 'levels': 2}
  elif kind == 'digits':
    c = digits_cnn.get_config()
  else:
    c = synthparts_m.get_config()
    c.model.kwargs = {'widths': (4, 8, 8), 'feature_dim': 16}
  c.data.options = {'train_per_class': 12, 'validation_per_class': 4, 'test_per_class': 4}
  if kind == 'digits':
    c.data.options = {}
    c.data.max_train, c.data.max_validation, c.data.max_test = 64, 32, 32
  c.batch_size = 16
  c.eval_batch_size = 32
  c.num_epochs = 2
  return c
