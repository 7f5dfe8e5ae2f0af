"""One MRR defender (Rouhani et al. 2018) for the SynthParts victim M: M's architecture with L2-normalised
features and class centres, trained with cross-entropy + 0.01 x center loss, RMSprop 1e-3.

Train N defenders with different seeds (the main job does this for you):

  for i in 0 1 2 3; do
    python3 train_m.py --config=configs/mrr_defender.py --config.seed=$i \
        --config.data.class_set=cs3a --workdir=runs/mrr_cs3a/defender_$i
  done

then evaluate with `mrr(n=4, sp=1)` in configs/evaluate.py and `mrr_dir=runs/mrr_cs3a` in the
class set. The victim's architecture is copied from configs/synthparts_m.py; change
`model.kwargs.base`/`base_kwargs` when the victim differs.
"""
from configs import synthparts_m


def get_config():
  c = synthparts_m.get_config()
  victim = c.model.to_dict()
  c.model.name = 'mrr_defender'
  c.model.kwargs = {'base': victim['name'], 'base_kwargs': dict(victim['kwargs'])}
  c.center_loss_weight = 0.01
  c.optimizer.name = 'rmsprop'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'constant'
  c.num_epochs = 5
  return c
