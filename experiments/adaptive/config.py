"""The adaptive-attack study on the main job's models (`experiments/adaptive/study.py`).

  python3 main.py --workdir=runs/main          # first: K, M, the gray-box attacks, the defenses
  python3 -m experiments.adaptive.study --workdir=runs/adaptive
  python3 -m experiments.adaptive.study --config.class_sets="('cs3a',)" --config.n_images=64

The evaluation's adaptive section (`eval/adaptive_eval.py`) with the budget of a skeptical
reviewer instead of the main job's 20 steps: 200 test images, 50 PGD steps of eps / 4, every
wrong class a target (Carlini et al. 2019, "On evaluating adversarial robustness"; Tramer et al.
2020, "On adaptive attacks to adversarial example defenses"). The defenses' fitted, calibrated
states are those of the main job's evaluation (read from its cache, so the same thresholds at 5%
clean-validation FPR); each row is paired with the main job's gray-box attack of the same eps and
reports the per-image worst case over both.
"""
import ml_collections

from configs import evaluate as evaluate_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Inputs: the main job's layout under `main_workdir` (k, m_<cs>, attacks_<cs>,
  # attacks_holdout_<cs>, eval/states).
  c.main_workdir = 'runs/main'
  c.data_dir = 'data'               # the main job's --config.data_dir
  main_eval = evaluate_config.get_config()
  c.seed = main_eval.seed           # the evaluation's seed (keys of the fits and the attacks)
  c.max_fit = main_eval.max_fit     # its fit subsample (used only when its states are not cached)
  c.class_sets = ('cs3a', 'cs3b')
  c.defenses = ('unmask', 'kde')    # entries of configs/evaluate.py's `defenses`
  c.n_images = 200                  # first n test images
  c.batch_size = 200                # images per attack call (memory); AUCs are exact in one batch
  # The evaluation's adaptive block with this study's budget (every key is documented there).
  c.adaptive = main_eval.adaptive
  c.adaptive.update({'steps': 50, 'restarts': 1, 'step_fraction': 0.25,
                     'attacks': ('PGD-Linf-8', 'PGD-Linf-16'),
                     'defenses': (), 'class_sets': (),   # this study's own lists (above)
                     'budget_check': {'n_images': 0}})
  # Deep Protection too, on few images and steps: DIP restores every image at every attack step
  # (BPDA + EOT), ~50 s per attack for 8 images x 5 steps on 2 cores.
  c.adaptive.extra_defenses = ('deep_protection(iters=100, widths=(16, 32), chunk=16)',)
  c.adaptive.small = ml_collections.ConfigDict(
      {'deep_protection': {'n_images': 8, 'steps': 5, 'n_calibration': 32}})
  return c
