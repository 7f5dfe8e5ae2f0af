"""Paper-scale part extractor K on PASCAL-Part (VOC2010 images + Annotations_Part) at 150x150.

  python3 train_k.py --config=configs/paper_k.py --workdir=runs/paper_k \
      --config.data.options.manual_dir=/path/to/pascal_part

The paper's K was a Mask R-CNN (mAP 0.56); this is a U-Net segmenter (see
unmask_jax/models/part_extraction.py for why). Needs a GPU.
"""
from configs import synthparts_k


def get_config():
  c = synthparts_k.get_config()
  c.data.name = 'pascal_part'
  c.data.options = {'manual_dir': '', 'size': 150}
  c.model.kwargs = {'width': 32, 'levels': 4}
  c.batch_size = 16
  c.eval_batch_size = 32
  c.num_epochs = 40
  return c
