"""LID detector (Ma et al. 2018) and the models' named intermediates (`functional.intermediates_fn`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unmask_jax import defenses, models
from unmask_jax.defenses import base, combiner, lid
from unmask_jax.eval import metrics
from unmask_jax.models import functional

P = jax.tree_util.Partial
_A = np.random.default_rng(0).normal(size=(2, 48)).astype(np.float32)
_W = np.asarray(jax.random.normal(jax.random.key(0), (48, 16)))


def _intermediates(x):
  f = x.reshape(x.shape[0], -1)
  return {'raw': f, 'hidden': jnp.tanh(f @ _W)}


CTX = base.Context(intermediates_fn=P(_intermediates))


def _clean(n, seed):
  """Images on a smooth 2-d manifold in 48-d pixel space (4x4x3)."""
  u = np.random.default_rng(seed).uniform(-1, 1, (n, 2)).astype(np.float32)
  return (1.0 / (1.0 + np.exp(-(u @ _A)))).reshape(n, 4, 4, 3)


def _noisy(x, std, seed=4):
  return np.clip(x + std * np.random.default_rng(seed).normal(size=x.shape), 0, 1).astype(np.float32)


def _data(n=300, seed=1):
  return {'image': _clean(n, seed), 'label': np.zeros(n, np.int32)}


@pytest.fixture(scope='module')
def fitted():
  d = defenses.make('lid(k=10, batch=100)')
  st = d.fit(CTX, _data(), jax.random.key(0))
  return d, st


def _numpy_lid(q, ref, k):
  q, ref = np.asarray(q, np.float64), np.asarray(ref, np.float64)
  r = np.sort(np.sqrt(((q[:, None, :] - ref[None]) ** 2).sum(-1)), axis=1)[:, :k]
  return -1.0 / np.mean(np.log(r / r[:, -1:]), axis=1)


def test_lid_matches_float64_numpy_reference():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(100, 30)) * rng.uniform(0.1, 2.0, 30) + 3.0  # off-centre, anisotropic
  q = np.concatenate([rng.normal(size=(20, 30)) + 3.0, ref[:5] + 1e-2 * rng.normal(size=(5, 30))])
  for k in (2, 5, 20, 100):
    got = np.asarray(lid.lid(q.astype(np.float32), ref.astype(np.float32), k))
    np.testing.assert_allclose(got, _numpy_lid(q, ref, k), rtol=2e-3)
  # The k smallest distances, ascending.
  d2 = np.asarray(lid.knn_sq_distances(q[:3].astype(np.float32), ref.astype(np.float32), 7))
  want = np.sort(((q[:3, None] - ref[None]) ** 2).sum(-1), axis=1)[:, :7]
  np.testing.assert_allclose(d2, want, rtol=1e-3)
  # Hand-computed: distances 1, 2, 4 -> LID = -1 / mean(log(1/4), log(2/4), 0) = 3 / (3 log 2).
  got = float(lid.lid_from_sq_distances(jnp.asarray([[1.0, 4.0, 16.0]]))[0])
  assert got == pytest.approx(1.0 / np.log(2.0), rel=1e-5)
  # Degenerate cases stay finite: equidistant neighbours, a query on a reference point.
  assert np.all(np.isfinite(np.asarray(lid.lid_from_sq_distances(jnp.asarray([[1.0, 1.0],
                                                                              [0.0, 1.0]])))))


def test_lid_of_points_on_a_low_dimensional_subspace():
  """LID estimates the dimension: ~2 on a plane, ~10 in a 10-d cube (both in 10-d space)."""
  rng = np.random.default_rng(1)
  plane = np.zeros((2000, 10), np.float32)
  plane[:, :2] = rng.uniform(size=(2000, 2))
  full = rng.uniform(size=(2000, 10)).astype(np.float32)
  lid2 = float(np.median(np.asarray(lid.lid(plane[:100], plane[100:], 20))))
  lid10 = float(np.median(np.asarray(lid.lid(full[:100], full[100:], 20))))
  assert 1.5 < lid2 < 3.0 and lid10 > 5.0


def test_state_contents_and_registry(fitted):
  d, st = fitted
  assert d.name == 'lid' and d.fit_adversarial is None and not d.corrects
  assert [str(s) for s in st['layers']] == ['hidden', 'raw']  # all intermediates by default
  assert int(st['k']) == 10 and st['reference.raw'].shape == (100, 48)
  assert st['reference.hidden'].shape == (100, 16) and st['lid_mean'].shape == (2,)
  # Reference and statistics images are disjoint: 100 reference, the other 200 for mu / sigma.
  assert len(np.unique(st['reference_index'])) == 100 and int(st['stats_count']) == 200
  assert 'lid' in defenses.DEFENSES.names()
  one = defenses.make('lid(k=5, batch=50, layers=("hidden",))').fit(CTX, _data(), jax.random.key(0))
  assert [str(s) for s in np.atleast_1d(one['layers'])] == ['hidden'] and 'reference.raw' not in one


def test_noisy_inputs_score_higher_than_clean(fitted):
  d, st = fitted
  x = _clean(200, 3)
  clean = d.score(st, CTX, x, None)
  for std, auc in ((0.03, 0.7), (0.1, 0.95)):  # more noise, more off-manifold dimensions
    noisy = d.score(st, CTX, _noisy(x, std), None)
    assert noisy.mean() > clean.mean() + 1.0
    assert metrics.roc_auc(clean, noisy) > auc
  # Standardised: the clean score has mean ~0 and std ~sqrt(L) scale (held-out clean images).
  assert abs(float(clean.mean())) < 1.0


def test_fit_calibrate_decide(fitted):
  d, st = fitted
  cal = base.calibrate(d, st, CTX, _clean(200, 2), jax.random.key(1))
  assert 'threshold' in cal and float(cal['score_scale']) > 0
  out = d.decide(cal, CTX, _clean(200, 5), jax.random.key(2))
  assert set(out) == {'score', 'flagged'} and out['score'].shape == (200,)
  assert out['flagged'].mean() < 0.15  # 5% FPR on the validation images
  assert d.decide(cal, CTX, _noisy(_clean(100, 6), 0.1), None)['flagged'].mean() > 0.9
  with pytest.raises(ValueError, match='detects but does not correct'):
    d.predict(cal, CTX, _clean(4, 5), None)
  with pytest.raises(base.NotFittedError):
    d.score(None, CTX, _clean(4, 5), None)


def test_surrogate_is_the_exact_score_with_finite_nonzero_gradients(fitted):
  d, st = fitted
  x = jnp.asarray(_noisy(_clean(16, 7), 0.02))
  apply, surrogate = base.bind(d, st, CTX)
  exact = np.asarray(apply(x, jax.random.key(0)).score)
  soft = np.asarray(surrogate(x, jax.random.key(0)).score)
  np.testing.assert_allclose(soft, exact, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(exact, d.score(st, CTX, np.asarray(x), None), rtol=1e-4, atol=1e-4)
  g = jax.jit(jax.grad(lambda x: jnp.sum(surrogate(x, jax.random.key(0)).score)))(x)
  g = np.asarray(g)
  assert np.all(np.isfinite(g))
  assert np.all(np.abs(g).reshape(16, -1).max(axis=1) > 0)  # every image gets a gradient
  # The gradient is the score's: a small step along it raises the score, against it lowers it.
  step = 1e-3 * g / np.linalg.norm(g.reshape(16, -1), axis=1)[:, None, None, None]
  up = np.asarray(apply(x + step, None).score)
  down = np.asarray(apply(x - step, None).score)
  assert np.mean(up > exact) > 0.8 and np.mean(down < exact) > 0.8


def test_determinism_and_state_round_trip(fitted, tmp_path):
  d, st = fitted
  again = d.fit(CTX, _data(), jax.random.key(0))
  assert set(again) == set(st)
  for k in st:
    np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(st[k]))
  x = _noisy(_clean(50, 8), 0.03)
  a = d.score(st, CTX, x, jax.random.key(0))
  np.testing.assert_array_equal(a, d.score(st, CTX, x, jax.random.key(9)))
  path = str(tmp_path / 'lid.npz')
  base.save_state(path, st)
  np.testing.assert_array_equal(a, d.score(base.load_state(path), CTX, x, None))
  other = d.fit(CTX, _data(), jax.random.key(1))  # another reference sample
  assert not np.array_equal(other['reference_index'], st['reference_index'])


def test_clear_errors():
  d = lid.make(k=5, batch=20)
  with pytest.raises(ValueError, match='intermediates_fn'):
    d.fit(base.Context(), _data(50), jax.random.key(0))
  st = d.fit(CTX, _data(50), jax.random.key(0))
  with pytest.raises(ValueError, match='intermediates_fn'):
    d.score(st, base.Context(), _clean(4, 1), None)
  with pytest.raises(ValueError, match=r"unknown layer.*\['hidden', 'raw'\]"):
    lid.make(k=5, batch=20, layers=('conv9',)).fit(CTX, _data(50), jax.random.key(0))
  with pytest.raises(ValueError, match='at least batch'):
    d.fit(CTX, _data(21), jax.random.key(0))
  with pytest.raises(ValueError, match='k must be'):
    lid.make(k=1)
  with pytest.raises(ValueError, match='at least k'):
    lid.make(k=20, batch=10)
  other = base.Context(intermediates_fn=P(lambda x: {'raw': x.reshape(len(x), -1)[:, :40],
                                                     'hidden': _intermediates(x)['hidden']}))
  with pytest.raises(ValueError, match='dimensional'):
    d.score(st, other, _clean(4, 1), None)


def test_fit_adversarial_logistic_regression(fitted):
  _, st = fitted
  d = defenses.make('lid(k=10, batch=100, lr=True)')
  assert d.fit_adversarial is not None and d.name == 'lid(lr)'
  x_h = _clean(60, 11)
  x_a = _noisy(x_h, 0.08, seed=12)  # stands in for held-out adversarial examples
  cal = base.calibrate(d, st, CTX, _clean(100, 2), jax.random.key(1))
  lr_state = d.fit_adversarial(cal, CTX, x_h, x_a, jax.random.key(3))
  assert lr_state['lr_coef'].shape == (2,) and 'threshold' not in lr_state
  assert 'score_scale' not in lr_state
  with pytest.raises(combiner.LeakageError):
    d.score(lr_state, CTX, x_a[:5], None)
  lr_state = base.calibrate(d, lr_state, CTX, _clean(100, 2), jax.random.key(1))
  x = _clean(80, 13)
  clean = d.score(lr_state, CTX, x, None)
  adv = d.score(lr_state, CTX, _noisy(x, 0.08, seed=14), None)
  assert np.mean(adv > clean) > 0.9
  _, surrogate = base.bind(d, lr_state, CTX)
  np.testing.assert_allclose(np.asarray(surrogate(jnp.asarray(x), None).score), clean,
                             rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Named intermediates of the models.

TINY = {
    'cnn_small': dict(widths=(4, 8), feature_dim=8),
    'cnn_mnist': dict(image_size=8, feature_dim=8),
    'resnet10': dict(width=2, stem='cifar'),
    'densenet121': dict(growth_rate=2, stem='cifar'),
}
NAMES = {
    'cnn_small': {'block0', 'block1', 'pool'},
    'cnn_mnist': {'conv1', 'conv2', 'pool'},
    'resnet10': {'stem', 'block0', 'block1', 'block2', 'block3'},
    'densenet121': {'stem', 'block0', 'transition0', 'block1', 'transition1', 'block2',
                    'transition2', 'block3'},
}


@pytest.mark.parametrize('name', list(TINY))
def test_intermediates_fn_of_models(name):
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
  if name == 'densenet121':  # names and shapes only (abstract model: no init, no compile)
    m = nnx.eval_shape(lambda: models.create(name, num_classes=3, rngs=nnx.Rngs(0), **TINY[name]))
    out = jax.eval_shape(lambda f, x: f(x), functional.intermediates_fn(m), x)
    assert set(out) == NAMES[name] | {'features', 'logits'}
    assert out['logits'].shape == (2, 3) and out['block3'].shape[:3] == (2, 1, 1)
    return
  m = models.create(name, num_classes=3, rngs=nnx.Rngs(0), **TINY[name])
  out = functional.intermediates_fn(m)(x)
  assert set(out) == NAMES[name] | {'features', 'logits'}
  assert all(v.shape[0] == 2 for v in out.values())
  np.testing.assert_allclose(out['logits'], functional.logits_fn(m)(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['features'], functional.features_fn(m)(x), rtol=1e-5, atol=1e-6)


def test_intermediates_of_a_cnn_by_hand_and_default_for_other_classifiers():
  m = models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), **TINY['cnn_small'])
  m.eval()
  x = jax.random.uniform(jax.random.key(2), (3, 8, 8, 3))
  out = functional.intermediates_fn(m)(x)
  h = m._normalize(x)
  b0 = nnx.relu(m.bns[0](m.convs[0](h)))
  np.testing.assert_allclose(out['block0'], b0, rtol=1e-5, atol=1e-6)
  assert out['block0'].shape == (3, 8, 8, 4) and out['block1'].shape == (3, 4, 4, 8)
  assert out['pool'].shape == (3, 8) and out['logits'].shape == (3, 3)
  # A classifier with no named layers (the MRR defender) still has 'features' and 'logits'.
  dm = models.create('mrr_defender', num_classes=3, rngs=nnx.Rngs(0), base='cnn_small',
                     base_kwargs=TINY['cnn_small'])
  assert set(functional.intermediates_fn(dm)(x)) == {'features', 'logits'}
  # Dropout follows the key as in __call__.
  k = jax.random.key(3)
  np.testing.assert_allclose(m.intermediates(x, dropout_key=k)['logits'], m(x, dropout_key=k),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(TypeError, match='not a classifier'):
    functional.intermediates_fn(models.create('unet', num_classes=3, rngs=nnx.Rngs(0)))


def test_lid_on_a_tiny_cnn_end_to_end():
  m = models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), **TINY['cnn_small'])
  ctx = base.Context(logits_fn=functional.logits_fn(m), features_fn=functional.features_fn(m),
                     intermediates_fn=functional.intermediates_fn(m), num_classes=3)
  rng = np.random.default_rng(0)
  smooth = lambda n: np.clip(0.5 + 0.3 * np.sin(np.linspace(0, 3, 8))[None, :, None, None]
                             * rng.uniform(0.5, 1.5, (n, 1, 1, 3)), 0, 1).astype(np.float32) \
      * np.ones((n, 8, 8, 3), np.float32)
  d = defenses.make('lid(k=10, batch=60, layers=("block0", "block1", "features"), chunk=64)')
  st = d.fit(ctx, {'image': smooth(160), 'label': np.zeros(160, np.int32)}, jax.random.key(0))
  x = smooth(40)
  clean = d.score(st, ctx, x, None)
  noisy = d.score(st, ctx, _noisy(x, 0.1), None)
  assert noisy.mean() > clean.mean()
  _, surrogate = base.bind(d, st, ctx)
  g = np.asarray(jax.grad(lambda x: jnp.sum(surrogate(x, None).score))(jnp.asarray(x[:4])))
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
