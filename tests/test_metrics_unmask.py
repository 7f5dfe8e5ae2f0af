import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from unmask_jax.defenses import base, unmask
from unmask_jax.eval import metrics

V = jnp.array([[1, 1, 0, 0, 0],    # class 0: parts a, b
               [0, 1, 1, 0, 0],    # class 1: parts b, c
               [0, 0, 1, 1, 1]], jnp.float32)  # class 2: parts c, d, e


def test_jaccard_hand_computed():
  k = jnp.array([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], jnp.float32)
  expected = np.array([[1.0, 1 / 3, 0.0], [1 / 4, 2 / 3, 2 / 4], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(unmask.jaccard(k, V), expected, atol=1e-6)
  # Both sets empty: defined as 0 (no evidence is not agreement).
  assert float(unmask.jaccard(jnp.zeros((1, 5)), jnp.zeros((1, 5)))[0, 0]) == 0.0


def test_detection_score_is_one_minus_jaccard_of_predicted_class():
  k = jnp.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], jnp.float32)
  d = unmask.detection_scores(k, jnp.array([0, 2]), V)
  np.testing.assert_allclose(d, [0.0, 1.0], atol=1e-6)


def test_rectify_best_match_ties_and_empty_set():
  k = jnp.array([
      [0, 1, 1, 1, 1],   # J = [1/5, 2/4, 3/4] -> class 2
      [0, 1, 0, 0, 0],   # tie between 0 and 1 (1/2 each); M says 1 -> keep 1
      [0, 1, 0, 0, 0],   # same tie; M says 2 (not tied) -> lowest index of most matched: 0
      [0, 0, 0, 0, 0],   # empty: all zero -> keep M's prediction
  ], jnp.float32)
  pred = jnp.array([0, 1, 2, 2])
  assert unmask.rectify(k, pred, V).tolist() == [2, 1, 0, 2]


def test_rectify_tie_prefers_more_matched_parts():
  v = jnp.array([[1, 0, 0, 0], [1, 1, 1, 1]], jnp.float32)
  k = jnp.array([[1, 1, 0, 0]], jnp.float32)   # J = [1/2, 2/4]: tie; class 1 matches 2 parts
  assert unmask.rectify(k, jnp.array([0]), v).tolist() == [0]
  v3 = jnp.concatenate([v, jnp.array([[0, 0, 0, 1]], jnp.float32)])
  assert unmask.rectify(k, jnp.array([2]), v3).tolist() == [1]


def test_unmask_defense_protocol():
  import jax
  logits = jax.tree_util.Partial(lambda x: jnp.stack([x[:, 0, 0, 0], 1 - x[:, 0, 0, 0], 0 * x[:, 0, 0, 0]], -1))
  parts_fn = jax.tree_util.Partial(lambda x: jnp.tile(jnp.array([[1., 1, 0, 0, 0]]), (x.shape[0], 1)))
  ctx = base.Context(logits_fn=logits, parts_fn=parts_fn, parts_matrix=V, num_classes=3)
  d = unmask.make()
  with pytest.raises(base.NotFittedError):
    d.score(None, ctx, jnp.zeros((2, 1, 1, 1)), None)
  state = d.fit(ctx, {}, None)
  x = jnp.array([1.0, 0.0]).reshape(2, 1, 1, 1)   # M predicts 0, then 1
  np.testing.assert_allclose(d.score(state, ctx, x, None), [0.0, 2 / 3], atol=1e-6)
  assert d.predict(state, ctx, x, None).tolist() == [0, 0]


def test_roc_auc_matches_sklearn_with_ties():
  rng = np.random.default_rng(0)
  neg = rng.integers(0, 6, 300).astype(float)
  pos = rng.integers(2, 9, 200).astype(float)
  y = np.r_[np.zeros(300), np.ones(200)]
  assert metrics.roc_auc(neg, pos) == pytest.approx(roc_auc_score(y, np.r_[neg, pos]), abs=1e-12)


def test_threshold_from_validation_bounds_fpr_and_tpr_matches_sklearn_curve():
  rng = np.random.default_rng(1)
  val = rng.normal(size=1000)
  t = metrics.threshold_at_fpr(val, 0.05)
  assert np.mean(val > t) <= 0.05 and np.mean(val >= t) > 0.05 - 1e-9
  neg, pos = rng.normal(size=400), rng.normal(1.5, 1, size=300)
  # Using the TEST negatives as "validation" must reproduce sklearn's ROC point at that FPR.
  t_test = metrics.threshold_at_fpr(neg, 0.05)
  fpr, tpr, thr = roc_curve(np.r_[np.zeros(400), np.ones(300)], np.r_[neg, pos])
  i = np.searchsorted(fpr, metrics.rate_above(neg, t_test), side='right') - 1
  assert metrics.rate_above(pos, t_test) == pytest.approx(tpr[i], abs=1 / 300 + 1e-9)


def test_threshold_never_sees_test_scores():
  rng = np.random.default_rng(2)
  val = rng.normal(size=500)
  test_clean, test_adv = rng.normal(size=200), rng.normal(2, 1, size=200)
  r1 = metrics.detection_report(val, test_clean, test_adv)
  # Changing only the TEST scores must leave the thresholds untouched.
  r2 = metrics.detection_report(val, test_clean + 5.0, test_adv - 5.0)
  assert r1['threshold@5%'] == r2['threshold@5%'] and r1['threshold@1%'] == r2['threshold@1%']
  assert r2['test_fpr@5%'] > r1['test_fpr@5%']
