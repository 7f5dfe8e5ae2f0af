"""Paper-scale victim M: ResNet-50 at 150x150 on a user's image-folder data (UnMask Section IV).

  python3 train_m.py --config=configs/paper_m_resnet50.py --workdir=runs/paper_m_r50 \
      --config.data.options.root=/path/to/unmask/images

SGD lr 1e-3, momentum 0.9, weight decay 2e-4, 30 epochs, batch 32 (as in the paper). The paper
fine-tuned ImageNet-pretrained weights: convert torchvision's (README, "your own models") and add
--config.init_from=<converted workdir>; from scratch, expect lower accuracy than the paper's. Needs a GPU to finish in reasonable time.
"""
from configs import common
from unmask_jax.models import torch_import


def get_config():
  c = common.base()
  c.data.name = 'image_folder'
  c.data.options = {'root': '', 'size': 150}
  c.model.name = 'resnet50'
  # torchvision's architecture and ImageNet normalization: the kwargs that
  # `python3 -m unmask_jax.models.torch_import --arch resnet50` records, so --config.init_from=<its
  # --out> fine-tunes the converted weights (as the paper did).
  c.model.kwargs = torch_import.model_kwargs('resnet50')
  c.optimizer.update(name='sgd', learning_rate=1e-3, momentum=0.9, weight_decay=2e-4,
                     schedule='constant')
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 30
  return c
