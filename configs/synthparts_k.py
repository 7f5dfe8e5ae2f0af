"""Part extractor K (U-Net segmenter) on SynthParts 32x32.

  python3 train_k.py --config=configs/synthparts_k.py --workdir=runs/k

Expect (2-core CPU): test part-presence F1 >= 0.90 and mean IoU reported, in a few minutes.
"""
from configs import common


def get_config():
  c = common.base()
  c.task = 'segmenter'
  c.model.name = 'unet'
  c.model.kwargs = {'width': 16, 'levels': 3}
  c.optimizer.learning_rate = 3e-3
  c.batch_size = 64
  c.num_epochs = 6
  return c
