"""Paper-scale victim M: DenseNet-121 at 150x150 (see paper_m_resnet50.py for data and caveats).

  python3 train_m.py --config=configs/paper_m_densenet121.py --workdir=runs/paper_m_d121 \
      --config.data.options.root=/path/to/unmask/images
"""
from configs import paper_m_resnet50


def get_config():
  c = paper_m_resnet50.get_config()
  c.model.name = 'densenet121'
  return c
