"""Detection metrics with thresholds chosen on held-out clean data only.

Conventions: a detector's score is higher for more adversarial inputs; an input is flagged when
its score is strictly greater than the threshold t. Positives = successful adversarial examples,
negatives = clean images.
"""
from __future__ import annotations

import numpy as np
import scipy.stats


def roc_auc(neg_scores, pos_scores) -> float:
  """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(equal) (Mann-Whitney U)."""
  neg = np.asarray(neg_scores, np.float64).ravel()
  pos = np.asarray(pos_scores, np.float64).ravel()
  if neg.size == 0 or pos.size == 0:
    return float('nan')
  # Average ranks handle ties exactly.
  ranks = scipy.stats.rankdata(np.concatenate([neg, pos]))
  u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
  return float(u / (neg.size * pos.size))


def threshold_at_fpr(clean_scores, fpr: float) -> float:
  """Threshold t such that at most a fraction `fpr` of these clean scores is > t.

  Call it with held-out clean VALIDATION scores, never with the scores being evaluated.
  """
  if not 0.0 <= fpr < 1.0:
    raise ValueError(f'fpr must be in [0, 1), got {fpr}')
  s = np.sort(np.asarray(clean_scores, np.float64).ravel())[::-1]
  if s.size == 0:
    raise ValueError('no clean scores to set a threshold on')
  k = int(np.floor(fpr * s.size))  # at most k clean scores may exceed t
  return float(s[k]) if k < s.size else float(s[-1])


def rate_above(scores, threshold: float) -> float:
  s = np.asarray(scores, np.float64).ravel()
  return float(np.mean(s > threshold)) if s.size else float('nan')


BOOTSTRAP_RESAMPLES = 1000


def bootstrap_auc_ci(neg_scores, pos_scores, *, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
                     level: float = 0.95) -> list[float]:
  """Percentile bootstrap confidence interval of `roc_auc` (Efron & Tibshirani 1993): negatives
  and positives resampled separately with replacement (stratified, so every resample has both),
  [lo, hi] = the (1 - level)/2 and (1 + level)/2 quantiles of the resampled AUCs."""
  neg = np.asarray(neg_scores, np.float64).ravel()
  pos = np.asarray(pos_scores, np.float64).ravel()
  if neg.size == 0 or pos.size == 0:
    return [float('nan'), float('nan')]
  rng = np.random.default_rng(seed)
  ni = rng.integers(0, neg.size, (n_resamples, neg.size))
  pi = rng.integers(0, pos.size, (n_resamples, pos.size))
  # Mann-Whitney per resample, vectorised: ranks of each resample's concatenation.
  both = np.concatenate([neg[ni], pos[pi]], axis=1)
  ranks = scipy.stats.rankdata(both, axis=1)
  u = ranks[:, neg.size:].sum(axis=1) - pos.size * (pos.size + 1) / 2.0
  aucs = u / (neg.size * pos.size)
  a = (1.0 - level) / 2.0
  return [float(np.quantile(aucs, a)), float(np.quantile(aucs, 1.0 - a))]


def bootstrap_mean_ci(values, *, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
                      level: float = 0.95) -> list[float]:
  """Percentile bootstrap CI of a mean over images (e.g. accuracy from per-image 0/1 correctness)."""
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    return [float('nan'), float('nan')]
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, v.size, (n_resamples, v.size))].mean(axis=1)
  a = (1.0 - level) / 2.0
  return [float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))]


def detection_report(val_clean, test_clean, test_adv, fprs=(0.05, 0.01)) -> dict:
  """AUC on test (with its bootstrap 95% CI); TPR and realised test FPR at thresholds set on
  validation clean scores."""
  out = {'auc': roc_auc(test_clean, test_adv), 'auc_ci': bootstrap_auc_ci(test_clean, test_adv),
         'n_pos': int(np.size(test_adv)), 'n_neg': int(np.size(test_clean))}
  for f in fprs:
    t = threshold_at_fpr(val_clean, f)
    key = f'{round(f * 100)}'
    out[f'threshold@{key}%'] = t
    out[f'tpr@{key}%fpr'] = rate_above(test_adv, t)
    out[f'test_fpr@{key}%'] = rate_above(test_clean, t)
  return out
