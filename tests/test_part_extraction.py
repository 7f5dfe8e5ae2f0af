"""K's extraction rule, IoU and threshold choice on hand-made segmentation outputs."""
import jax.numpy as jnp
import numpy as np
import pytest

from unmask_jax.models import part_extraction as pe


def _logits(label_map, conf_map, num=4):
  """Per-pixel logits whose arg-max is `label_map` with softmax probability `conf_map` there."""
  h, w = label_map.shape
  out = np.zeros((1, h, w, num), np.float32)
  for i in range(h):
    for j in range(w):
      p = np.full(num, (1 - conf_map[i, j]) / (num - 1))
      p[label_map[i, j]] = conf_map[i, j]
      out[0, i, j] = np.log(p)
  return jnp.asarray(out)


def test_extraction_rule_area_and_confidence():
  # 4x4 image: part 1 (id 0) covers 3 confident pixels; part 2 (id 1) 4 pixels at low confidence;
  # part 3 (id 2) a single confident pixel; the rest is background.
  labels = np.array([[1, 1, 1, 0], [2, 2, 0, 0], [2, 2, 0, 3], [0, 0, 0, 0]])
  conf = np.where(labels == 2, 0.4, 0.9)
  lg = _logits(labels, conf)
  np.testing.assert_array_equal(pe.extract_parts(lg, min_area=2, min_conf=0.5), [[1, 0, 0]])
  np.testing.assert_array_equal(pe.extract_parts(lg, min_area=2, min_conf=0.3), [[1, 1, 0]])
  np.testing.assert_array_equal(pe.extract_parts(lg, min_area=1, min_conf=0.3), [[1, 1, 1]])
  np.testing.assert_array_equal(pe.extract_parts(lg, min_area=4, min_conf=0.3), [[0, 1, 0]])
  # Background is never a part, however large.
  assert pe.extract_parts(_logits(np.zeros((4, 4), int), np.full((4, 4), 0.99)), 1, 0.1).sum() == 0


def test_area_conf_stats_feed_threshold_choice():
  labels = np.array([[1, 1, 1, 0], [2, 2, 0, 0], [2, 2, 0, 3], [0, 0, 0, 0]])
  conf = np.where(labels == 2, 0.4, 0.9)
  stats = np.asarray(pe.area_conf_stats(_logits(labels, conf), (0.3, 0.5)))
  np.testing.assert_array_equal(stats[0], [[3, 4, 1], [3, 0, 1]])
  # Truth: parts 1 and 2 present, part 3 is a false blob -> min_area 2 with conf 0.3 is perfect.
  best = pe.choose_thresholds(stats, np.array([[1, 1, 0]]), (0.3, 0.5), (1, 2, 3, 4))
  assert (best['min_conf'], best['min_area'], best['f1']) == (0.3, 2.0, 1.0)


def test_iou_and_presence_hand_computed():
  conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])      # class 2 never seen
  iou = pe.iou_from_confusion(conf)
  assert iou[0] == pytest.approx(5 / 8) and iou[1] == pytest.approx(3 / 6) and np.isnan(iou[2])
  m = pe.presence_prf(np.array([[1, 1, 0], [0, 1, 0]]), np.array([[1, 0, 0], [0, 1, 1]]))
  assert (m['precision'], m['recall']) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
  cm = np.asarray(pe.confusion(jnp.asarray(np.eye(3)[None, None, [0, 1, 1]] * 5.0),
                               jnp.array([[[0, 1, 2]]]), 3))
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 1, 0]])


@pytest.mark.parametrize('min_conf', [0.0, 0.3, 0.6, 0.9])
@pytest.mark.parametrize('min_area', [1, 3, 6])
def test_margins_are_positive_exactly_where_parts_are_extracted(min_conf, min_area):
  import jax
  z = 4.0 * jax.random.normal(jax.random.key(0), (32, 8, 8, 6))
  exact = np.asarray(pe.extract_parts(z, min_area, min_conf))
  np.testing.assert_array_equal(np.asarray(pe.part_margins(z, min_area, min_conf) > 0), exact > 0)
  top = np.asarray(pe.top_pixel_margins(z, min_area, min_conf))
  assert top.shape == (32, 5, min_area)
  assert np.all(np.diff(top, axis=-1) <= 0)          # descending; the last is the k-th margin
  np.testing.assert_array_equal(top[..., -1], np.asarray(pe.part_margins(z, min_area, min_conf)))


def test_margin_keeps_a_gradient_on_confident_pixels():
  """An attack removing a confidently segmented part needs a gradient there: the confidence
  margin is the log-odds (gradient ~1), not the log-probability (gradient 1 - p ~ 1e-4)."""
  import jax
  lg = _logits(np.full((2, 2), 1), np.full((2, 2), 0.9999))
  g = jax.grad(lambda z: pe.part_margins(z, 4, 0.3)[0, 0])(lg)
  assert float(jnp.abs(g).sum()) > 0.5


def test_pixel_margins_match_their_definition_with_ties():
  """m = min(z_p - max_{q != p} z_q, z_p - logsumexp_{q != p} z_q - logit(min_conf)), checked in
  float64 NumPy, on logits where some pixels have two classes tied at the maximum (then the
  arg-max margin is 0 for both, as with top-2 = top-1)."""
  rng = np.random.default_rng(0)
  z = (2.0 * rng.standard_normal((4, 5, 5, 6))).astype(np.float32)
  z[:, 0, :, 2] = z[:, 0, :, 4] = z[:, 0].max(-1) + 1.0   # ties at the maximum
  min_conf = 0.4
  got = np.asarray(pe.pixel_margins(jnp.asarray(z), min_conf))
  zz = z.astype(np.float64)
  want = np.empty(z.shape[:-1] + (5,))
  for p in range(1, 6):
    others = np.delete(zz, p, axis=-1)
    m_arg = zz[..., p] - others.max(-1)
    m_conf = zz[..., p] - np.log(np.exp(others).sum(-1)) - np.log(min_conf / (1 - min_conf))
    want[..., p - 1] = np.minimum(m_arg, m_conf)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.all(got[:, 0, :, [1, 3]] <= 1e-6)   # tied parts (classes 2, 4): arg-max margin 0
