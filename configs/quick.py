"""A smoke version of the main job (tiny data and models; about a minute on a 2-core CPU).

  python3 main.py --config=configs/quick.py --workdir=runs/quick
"""
from configs import main
from experiments.digits import config as digits_study


def get_config():
  c = main.get_config()
  c.data_options = {'train_per_class': 40, 'validation_per_class': 12, 'test_per_class': 12}
  c.k.model.kwargs = {'width': 4, 'levels': 2}
  c.k.num_epochs = 1
  for m in (c.m, c.at):
    m.model.kwargs = {'widths': (8, 16, 16), 'feature_dim': 32}
    m.num_epochs = 6   # enough for a non-constant classifier, so attacks have something to flip
    m.batch_size = 16
    m.optimizer.learning_rate = 3e-3
  c.mrr.num_defenders = 2
  c.mrr.defender.model.kwargs = {'base': 'cnn_small', 'base_kwargs': dict(c.m.model.kwargs)}
  c.mrr.defender.num_epochs = 2
  c.mrr.defender.batch_size = 16
  c.combiner_holdout = 12
  c.attack.max_examples = 24
  # Three vectors (single-step, iterative L∞, iterative L2) keep compile time small.
  c.attack.attacks = ('FGSM-Linf-8=fgsm(eps=8/255)', 'PGD-Linf-8=pgd_linf(eps=8/255, steps=3)',
                      'PGD-L2-600=pgd_l2(eps=0.5, steps=3)')
  c.attack.extra_attacks = ('AutoAttack-Linf-8=autoattack(eps=8/255, norm="linf", steps=3, queries=20)',)
  c.attack.batch_size = 32
  c.digits = digits_study.tiny()
  # The main job leaves Deep Protection to its study; the smoke run keeps a tiny one in the
  # evaluation so that this path stays exercised (and the study's test can reproduce it).
  c.evaluate.dip.update({'class_sets': ('cs3a',), 'attacks': ('PGD-Linf-8',), 'n_images': 6,
                         'val_size': 6, 'max_iters': 50, 'widths': (8, 16)})
  c.evaluate.max_fit = 64
  c.evaluate.defenses = ('unmask', 'mc_dropout(metric="mutual_information", T=8)', 'kde', 'kl',
                         'lr_combiner(members=("mc_dropout(T=8)", "kde", "kl"))', 'mrr(n=1)',
                         'mrr(n=2)', 'lid(k=10, batch=50)')
  c.evaluate.batch_size = 32
  # The adaptive stage compiles one attack per defense and norm: in the smoke run, one class set,
  # one attack and two defenses (a detector and a corrector) keep it short; Deep Protection's
  # BPDA surrogate is checked (gradient, agreement) in tests/test_defense_protocol.py.
  c.evaluate.adaptive.update({'n_images': 12, 'steps': 4, 'attacks': ('PGD-Linf-8',),
                              'class_sets': ('cs3a',), 'defenses': ('unmask', 'kde'),
                              'extra_defenses': ()})
  c.evaluate.adaptive.small = {'deep_protection': {'n_images': 4, 'steps': 2, 'n_calibration': 12}}
  c.evaluate.adaptive.budget_check.n_images = 8
  return c
