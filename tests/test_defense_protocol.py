"""Every registered defense through the whole protocol (like optax's alias_test):

fit on clean data -> calibrate on clean validation -> apply (exact decision) -> surrogate ->
finite, non-zero gradient in x -> the surrogate's decision agrees with the exact one on clean and
perturbed images at a stated rate -> `attacks.adaptive` runs against it and stays in the ball.

A new registry entry without a spec in SPECS fails `test_every_registered_defense_is_covered`.
The models are tiny pure-jax fakes, so the test is about the protocol, not about the models.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unmask_jax import attacks, defenses
from unmask_jax.attacks import adaptive
from unmask_jax.data import parts as parts_lib
from unmask_jax.defenses import base
from unmask_jax.models import part_extraction

Partial = jax.tree_util.Partial
SHAPE = (8, 8, 3)
C = 3

# A cheap spec per registry name. `agree` = the least share of images on which the surrogate's
# decision (score > threshold; a corrector's argmax) matches the exact one. It is 1.0 where the
# surrogate IS the exact function (KDE, KL, MRR's smooth max at a small temperature, LR over
# them) and lower where it is a stand-in: MC dropout (its surrogate draws its own dropout masks),
# UnMask (soft part presence; its class surrogate is a hinge on K's part margins, not the
# Jaccard); Deep Protection's forward pass is the exact restoration (BPDA only
# changes the backward pass).
SPECS = {
    'unmask': ('unmask', 0.7),
    'mc_dropout': ('mc_dropout(T=8, surrogate_T=8)', 0.6),
    'kde': ('kde(bandwidth=1.0)', 1.0),
    'kl': ('kl', 1.0),
    'lr_combiner': ('lr_combiner(members=("kde(bandwidth=1.0)", "kl"))', 1.0),
    'mrr': ('mrr(n=2, smooth=0.001)', 0.95),
    'deep_protection': ('deep_protection(iters=4, widths=(4, 8), chunk=8)', 1.0),
    'lid': ('lid(k=5)', 0.8),
}


def _params(seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  d = math.prod(SHAPE)
  p = parts_lib.NUM_PARTS
  return {'w1': jax.random.normal(ks[0], (d, 32)) / math.sqrt(d) * 4.0,
          'b1': 0.1 * jax.random.normal(ks[1], (32,)),
          'w2': jax.random.normal(ks[2], (32, C)) / math.sqrt(32) * 3.0,
          'seg': jax.random.normal(ks[3], (3, p + 1)) * 4.0,
          'd1': jax.random.normal(ks[4], (d, 16)) / math.sqrt(d) * 4.0,
          'd2': jax.random.normal(ks[5], (d, 16)) / math.sqrt(d) * 4.0}


def _features(p, x):
  return jax.nn.relu((x.reshape(x.shape[0], -1) - 0.5) @ p['w1'] + p['b1'])


def _head(p, f):
  return f @ p['w2']


def _logits(p, x):
  return _head(p, _features(p, x))


def _mc_logits(p, x, key):
  f = _features(p, x)
  return _head(p, jnp.where(jax.random.bernoulli(key, 0.5, f.shape), 2.0 * f, 0.0))


def _segment(p, x):
  return (x - 0.5) @ p['seg']


def _defender(w, x):
  return jax.nn.relu((x.reshape(x.shape[0], -1) - 0.5) @ w)


def _intermediates(p, x):
  f = _features(p, x)
  return {'hidden': f, 'logits': _head(p, f)}


def make_ctx(seed=0):
  p = _params(seed)
  v = np.zeros((C, parts_lib.NUM_PARTS), np.float32)
  for c in range(C):
    v[c, c * 3:c * 3 + 5] = 1.0          # overlapping part sets
  return base.Context(
      logits_fn=Partial(_logits, p), features_fn=Partial(_features, p),
      mc_logits_fn=Partial(_mc_logits, p), head_fn=Partial(_head, p),
      parts_fn=part_extraction.part_extractor(Partial(_segment, p), 3.0, 0.5),
      parts_matrix=jnp.asarray(v), defenders=(Partial(_defender, p['d1']), Partial(_defender, p['d2'])),
      intermediates_fn=Partial(_intermediates, p), num_classes=C, class_names=('a', 'b', 'c'))


def make_data(ctx, n, seed):
  x = np.random.default_rng(seed).uniform(0, 1, (n, *SHAPE)).astype(np.float32)
  y = np.asarray(jnp.argmax(ctx.logits_fn(jnp.asarray(x)), -1)).astype(np.int32)
  return x, y


@pytest.fixture(scope='module')
def setup():
  ctx = make_ctx()
  x_tr, y_tr = make_data(ctx, 240, 1)
  assert np.bincount(y_tr, minlength=C).min() >= 10, 'the fake model must predict every class'
  x_val, _ = make_data(ctx, 80, 2)
  x_te, y_te = make_data(ctx, 32, 3)
  noise = np.random.default_rng(4).uniform(-16 / 255, 16 / 255, x_te.shape).astype(np.float32)
  x_noisy = np.clip(x_te + noise, 0, 1)
  return ctx, {'image': x_tr, 'label': y_tr}, x_val, x_te, y_te, x_noisy


def test_every_registered_defense_is_covered():
  assert set(SPECS) == set(defenses.DEFENSES.names()), (
      'add the new defense to SPECS in this file: it must pass the protocol test')


def _fit(name, setup):
  ctx, data, x_val, x_te, _, x_noisy = setup
  spec, _ = SPECS[name]
  d = defenses.make(spec)
  state = d.fit(ctx, data, jax.random.key(0))
  if d.fit_adversarial is not None:
    # Held-out "attacks": perturbed copies of validation images the thresholds never see.
    x_h = x_val[:40]
    x_a = np.clip(x_h + np.sign(np.random.default_rng(5).normal(size=x_h.shape)) * 0.2, 0, 1)
    state = d.fit_adversarial(state, ctx, x_h, x_a.astype(np.float32), jax.random.key(1))
    x_val = x_val[40:]
  state = base.calibrate(d, state, ctx, x_val, jax.random.key(2))
  return d, state


@pytest.mark.parametrize('name', sorted(SPECS))
def test_protocol(name, setup):
  if name not in defenses.DEFENSES.names():
    pytest.skip(f'{name} is not registered')
  ctx, _, _, x_te, y_te, x_noisy = setup
  d, state = _fit(name, setup)
  assert 'threshold' in state and float(state['score_scale']) > 0

  # apply: exact decision, deterministic for a key.
  key = jax.random.key(3)
  dec = d.decide(state, ctx, x_te, key)
  assert dec['score'].shape == (len(x_te),) and np.all(np.isfinite(dec['score']))
  assert dec['flagged'].dtype == bool
  np.testing.assert_array_equal(dec['score'], d.decide(state, ctx, x_te, key)['score'])
  if d.corrects:
    assert dec['pred'].shape == (len(x_te),) and dec['pred'].min() >= 0 and dec['pred'].max() < C
  else:
    with pytest.raises(ValueError, match='does not correct'):
      d.predict(state, ctx, x_te, key)

  # surrogate: differentiable, finite and informative gradient.
  apply_fn, surrogate_fn = base.bind(d, state, ctx)
  x = jnp.asarray(x_te[:8])
  g = jax.jit(jax.grad(lambda xx: jnp.sum(surrogate_fn(xx, key).score)))(x)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).max()) > 0, f'{name}: the surrogate gives zero gradients'

  # The surrogate's decision agrees with the exact one (same key: same randomness, e.g. the same
  # DIP restoration or dropout masks), on clean and perturbed images.
  _, agree = SPECS[name]
  thr = float(state['threshold'])
  for xs in (x_te, x_noisy):
    exact = jax.jit(apply_fn)(jnp.asarray(xs), key)
    sur = jax.jit(surrogate_fn)(jnp.asarray(xs), key)
    same = np.mean((np.asarray(sur.score) > thr) == (np.asarray(exact.score) > thr))
    assert same >= agree, f'{name}: surrogate flags agree with the exact decision on {same:.2f} < {agree}'
    if d.corrects:
      same_pred = np.mean(np.argmax(np.asarray(sur.logits), -1) == np.asarray(exact.pred))
      assert same_pred >= agree, f'{name}: surrogate classes agree on {same_pred:.2f} < {agree}'


@pytest.mark.parametrize('name', ['kde', 'unmask', 'mrr'])
def test_adaptive_attack_runs_on_defense_and_stays_in_the_ball(name, setup):
  ctx, _, _, x_te, y_te, _ = setup
  d, state = _fit(name, setup)
  eps = 8 / 255
  attack = attacks.compile_attack(f'adaptive(base="pgd_linf(eps={eps!r}, steps=5)")')
  x = jnp.asarray(x_te[:8])
  x_adv = np.asarray(attack(ctx.logits_fn, x, jnp.asarray(y_te[:8]), jax.random.key(0),
                            target=adaptive.target_of(d, state, ctx)))
  assert np.abs(x_adv - x_te[:8]).max() <= eps + 1e-6
  assert x_adv.min() >= 0 and x_adv.max() <= 1
