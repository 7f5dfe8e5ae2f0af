"""Shared defaults for training configs; variants import `base()` and override a few fields."""
import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'classifier'        # 'classifier' (M) or 'segmenter' (K)
  c.seed = 0                   # initialization, shuffling and dropout keys
  c.data = ml_collections.ConfigDict({
      'name': 'synthparts', 'data_dir': 'data', 'options': {}, 'class_set': '', 'classes': (),
      'max_train': 0, 'max_validation': 0, 'max_test': 0})
  c.model = ml_collections.ConfigDict({'name': 'cnn_small', 'kwargs': {}})
  c.optimizer = ml_collections.ConfigDict({
      'name': 'adam', 'learning_rate': 1e-3, 'momentum': 0.9, 'weight_decay': 0.0,
      'schedule': 'cosine', 'warmup_epochs': 0.0})
  c.batch_size = 64            # training images per step (divisible by the device count)
  c.eval_batch_size = 256      # images per step when evaluating
  c.num_epochs = 10            # passes over the training split
  c.adv_training = ml_collections.ConfigDict({
      'enabled': False, 'eps': 4 / 255, 'steps': 7, 'step_size_factor': 2.5})
  c.extraction = ml_collections.ConfigDict({
      'conf_grid': (0.3, 0.5, 0.7, 0.9), 'area_grid': (1, 2, 3, 4, 6, 8, 12)})
  # A workdir whose weights start the training (fine-tuning), e.g. torchvision weights converted
  # by `python3 -m unmask_jax.models.torch_import`; '' = from scratch (seeded initialization).
  c.init_from = ''
  c.center_loss_weight = 0.0   # > 0 only for MRR defenders (configs/mrr_defender.py)
  c.debug_stop_after_steps = 0   # > 0: simulated kill after this many steps (resume tests)
  return c
