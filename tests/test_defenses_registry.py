"""The MC-dropout, KDE and KL defenses as registry objects on a small fake victim: determinism,
errors, and KL's zero at a class mean. (Their formulas against hand-computed and float64
references are in test_defenses.py, once.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unmask_jax import defenses
from unmask_jax.defenses import base

P = jax.tree_util.Partial
W = np.asarray(jax.random.normal(jax.random.key(0), (48, 16)))
V = np.asarray(jax.random.normal(jax.random.key(1), (16, 3)))


def _feats(x):
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ W)


def _mc(x, key):
  f = _feats(x)
  return (f * jax.random.bernoulli(key, 0.5, f.shape) * 2.0) @ V


CTX = base.Context(logits_fn=P(lambda x: _feats(x) @ V), features_fn=P(_feats), mc_logits_fn=P(_mc),
                   head_fn=P(lambda f: f @ V), num_classes=3)


def _data(n=90, seed=0):
  x = np.random.default_rng(seed).uniform(size=(n, 4, 4, 3)).astype(np.float32)
  y = np.asarray(jnp.argmax(_feats(x) @ V, -1)).astype(np.int32)
  return x, y


def test_mc_dropout_defense_deterministic_and_errors():
  x, y = _data()
  d = defenses.make('mc_dropout(metric="mutual_information", T=8)')
  with pytest.raises(base.NotFittedError):
    d.score(None, CTX, x, jax.random.key(0))
  st = d.fit(CTX, {'image': x, 'label': y}, jax.random.key(1))
  a = d.score(st, CTX, x[:20], jax.random.key(2))
  b = d.score(st, CTX, x[:20], jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert np.all(np.asarray(a) >= -1e-6)
  with pytest.raises(ValueError, match='T >= 2|T'):
    defenses.make('mc_dropout(T=1)')


def _brute_kde(z, c, tz, ty, h):
  z, tz = np.asarray(z, np.float64), np.asarray(tz, np.float64)
  out = []
  for zi, ci in zip(z, c):
    pts = tz[ty == ci]
    d2 = ((pts - zi) ** 2).sum(1)
    a = -d2 / (2 * h * h)
    m = a.max()
    out.append(m + np.log(np.exp(a - m).sum()) - np.log(len(pts)) - z.shape[1] / 2 * np.log(2 * np.pi * h * h))
  return np.array(out)


def test_kde_defense_scores_with_predicted_class_and_errors():
  x, y = _data()
  d = defenses.make('kde(bandwidth=1.0)')
  st = d.fit(CTX, {'image': x, 'label': y}, jax.random.key(0))
  s = np.asarray(d.score(st, CTX, x[:10], None))
  z = np.asarray(_feats(x))
  pred = np.asarray(jnp.argmax(z[:10] @ V, -1))
  np.testing.assert_allclose(s, -_brute_kde(z[:10], pred, z, y, 1.0), atol=2e-3)
  with pytest.raises(ValueError):
    defenses.make('kde(bandwidth=0.0)').fit(CTX, {'image': x, 'label': y}, None)
  ctx2 = CTX._replace(features_fn=P(lambda x: _feats(x)[:, :8]))
  with pytest.raises(ValueError, match='dimensional'):
    d.score(st, ctx2, x[:4], None)


def test_kl_defense_is_zero_for_a_class_mean_and_unknown_pmf_errors():
  x, y = _data()
  d = defenses.make('kl(pmf="softmax")')
  st = d.fit(CTX, {'image': x, 'label': y}, None)
  assert np.all(np.asarray(d.score(st, CTX, x[:10], None)) >= -1e-6)
  with pytest.raises(ValueError, match='pmf'):
    defenses.make('kl(pmf="bogus")')


def test_defense_registry_lists_valid_names():
  with pytest.raises(KeyError) as e:
    defenses.make('unmsk')
  assert 'unmask' in str(e.value) and 'kde' in str(e.value)
