"""attacks.adaptive and the objective-taking PGD: a toy defense with a known optimum, CE-objective
PGD bit-identical to the default, best-iterate monotonicity, and the adaptive evaluation's helpers
(8-bit rounding inside the ball, success accounting)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unmask_jax import attacks
from unmask_jax.attacks import adaptive, common
from unmask_jax.defenses import base
from unmask_jax.eval import adaptive_eval

Partial = jax.tree_util.Partial
SHAPE = (4, 4, 3)
D = 48
# M: class 1's logit is w.(x - 0.5) - 0.5 with w = 2 on the first half of the pixels and 0.5 on
# the second; class 0's logit is 0. Clean images have w.(x - 0.5) = 0 and mean pixel 0.5.
W = np.r_[np.full(D // 2, 2.0), np.full(D // 2, 0.5)].astype(np.float32)


def _logits(x):
  s = (x.reshape(x.shape[0], -1) - 0.5) @ W - 0.5
  return jnp.stack([jnp.zeros_like(s), s], -1)


def _clean(n):
  # +-0.1 alternating inside each half: mean 0.5 and w.(x - 0.5) = 0 exactly.
  row = 0.5 + 0.1 * np.tile([1.0, -1.0], D // 2)
  x = np.stack([np.roll(row, 2 * i) for i in range(n)]).reshape(n, *SHAPE).astype(np.float32)
  return x, np.zeros(n, np.int32)


def _toy_defense():
  """Flags an image whose mean pixel moved away from 0.5: score = |mean(x) - 0.5|."""
  def fit(ctx, data, key):
    return {'center': np.float32(0.5)}

  def apply(state, ctx, x, key):
    return base.Decision(jnp.abs(x.reshape(x.shape[0], -1).mean(-1) - state['center']))

  def surrogate(state, ctx, x, key):
    return base.Surrogate(apply(state, ctx, x, key).score)

  return base.Defense('toy_mean', fit, apply, surrogate)


def _toy_target():
  d = _toy_defense()
  ctx = base.Context(logits_fn=Partial(_logits), num_classes=2)
  state = {**d.fit(ctx, None, None), 'threshold': np.float32(0.01), 'score_scale': np.float32(0.01)}
  return d, state, ctx


@pytest.mark.parametrize('objective', ['orthogonal', 'balanced'])
def test_adaptive_finds_the_known_optimum_of_a_toy_defense(objective):
  """Within eps = 0.05: raising the w=2 pixels and lowering the w=0.5 ones fools M (margin
  0.05 * (48 - 12) = 1.8 > 0.5 + kappa) with the mean unchanged, so every image can succeed. The
  gray-box attack raises every pixel (all w > 0), moves the mean by eps and is always flagged.
  The balanced objective's step, sign(W / |W| - 1 / sqrt(D)) while the mean is high, is exactly
  that optimum's direction."""
  d, state, ctx = _toy_target()
  x, y = _clean(6)
  eps = 0.05
  gray = attacks.compile_attack(f'pgd_linf(eps={eps}, steps=20)')(ctx.logits_fn, x, y, jax.random.key(0))
  dec = d.decide(state, ctx, np.asarray(gray), None)
  fooled = np.asarray(jnp.argmax(_logits(gray), -1)) != y
  assert fooled.all() and dec['flagged'].all()      # gray-box: M fooled, but always caught

  # Sign steps of the selective objective alone oscillate here (the fooling step raises every
  # pixel, the hiding step lowers every pixel) and reach only part of the images.
  attack = attacks.compile_attack(
      f'adaptive(base="pgd_linf(eps={eps}, steps=30)", kappa=0.5, objective="{objective}")')
  x_adv = attack(ctx.logits_fn, x, y, jax.random.key(0), target=adaptive.target_of(d, state, ctx))
  dec = d.decide(state, ctx, np.asarray(x_adv), None)
  m_pred = np.asarray(jnp.argmax(_logits(x_adv), -1))
  success = adaptive_eval.attack_success(dec, m_pred, y, corrects=False)
  assert success.all(), (m_pred, dec['score'])
  assert np.abs(np.asarray(x_adv) - x).max() <= eps + 1e-6


def test_adaptive_needs_a_target_and_valid_options():
  d, state, ctx = _toy_target()
  x, y = _clean(2)
  with pytest.raises(ValueError, match='target'):
    adaptive.adaptive(ctx.logits_fn, x, y, jax.random.key(0))
  with pytest.raises(ValueError, match='targets must be'):
    adaptive.adaptive(ctx.logits_fn, x, y, jax.random.key(0), targets='some',
                      target=adaptive.target_of(d, state, ctx))
  with pytest.raises(ValueError, match='objective must be'):
    adaptive.adaptive(ctx.logits_fn, x, y, jax.random.key(0), objective='other',
                      target=adaptive.target_of(d, state, ctx))
  with pytest.raises(ValueError, match='corrector must be'):
    adaptive.adaptive(ctx.logits_fn, x, y, jax.random.key(0), corrector='some',
                      target=adaptive.target_of(d, state, ctx))
  with pytest.raises(ValueError, match='step_fraction'):
    adaptive.adaptive(ctx.logits_fn, x, y, jax.random.key(0), step_fraction=-0.25,
                      target=adaptive.target_of(d, state, ctx))
  with pytest.raises(ValueError, match='base must be one of'):
    adaptive.adaptive(ctx.logits_fn, x, y, jax.random.key(0), base='fgsm(eps=0.1)',
                      target=adaptive.target_of(d, state, ctx))
  with pytest.raises(ValueError, match='calibrate'):
    adaptive.target_of(d, {'center': 0.5}, ctx)


def _cnn_like(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  w1 = jax.random.normal(k1, (D, 16)) / 4
  w2 = jax.random.normal(k2, (16, 3))
  return Partial(lambda a, b, x: jnp.tanh(x.reshape(x.shape[0], -1) @ a) @ b, w1, w2)


@pytest.mark.parametrize('spec', ['pgd_linf(eps=0.03, steps=7)', 'pgd_l2(eps=0.5, steps=7)'])
def test_pgd_with_the_ce_objective_is_bit_identical_to_pgd(spec):
  f = _cnn_like()
  x = np.random.default_rng(0).uniform(size=(8, *SHAPE)).astype(np.float32)
  y = np.asarray(jnp.argmax(f(x), -1)).astype(np.int32)
  # Both as one program (inside jax.jit): called with arrays, the 7 steps of plain PGD would go
  # from the host in chunks, another loop form (equal to it up to float rounding).
  attack = attacks.parse_attack(spec).partial()
  ref = jax.jit(attack)(f, x, y, jax.random.key(1))
  ce = Partial(lambda fn, xx, yy, kk: common.cross_entropy(fn(xx), yy), f)
  got = jax.jit(lambda *a: attack(*a, objective=ce))(f, x, y, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(got))


def test_more_restarts_never_lose_a_success():
  """With a success predicate every example keeps its best iterate over steps and restarts, and
  restart 0 is the single run: success can only grow with restarts."""
  f = _cnn_like(1)
  x = np.random.default_rng(2).uniform(size=(32, *SHAPE)).astype(np.float32)
  y = np.asarray(jnp.argmax(f(x), -1)).astype(np.int32)
  ce = Partial(lambda fn, xx, yy, kk: common.cross_entropy(fn(xx), yy), f)
  ok = Partial(lambda fn, xx, yy, kk: jnp.argmax(fn(xx), -1) != yy, f)
  rates = []
  for restarts in (1, 3):
    x_adv = attacks.compile_attack(f'pgd_linf(eps=0.02, steps=3, restarts={restarts})')(
        f, x, y, jax.random.key(3), objective=ce, success=ok)
    rates.append(np.asarray(jnp.argmax(f(x_adv), -1)) != y)
  assert np.all(rates[1] >= rates[0]) and 0 < rates[0].mean() < 1


def test_round_to_8bit_stays_in_the_ball_and_on_the_grid():
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 256, (6, *SHAPE)) / 255).astype(np.float32)
  for norm, eps in (('linf', 8 / 255), ('l2', 0.3)):
    delta = rng.normal(size=x.shape).astype(np.float32)
    if norm == 'linf':
      delta = np.sign(delta) * eps
    else:
      delta *= eps / np.linalg.norm(delta.reshape(6, -1), axis=1)[:, None, None, None]
    x_adv = np.clip(x + delta, 0, 1)
    q = adaptive_eval.round_to_8bit(x_adv, x, norm, eps)
    np.testing.assert_allclose(q * 255, np.round(q * 255), atol=1e-4)
    assert adaptive_eval.ball_violations(q, x, norm, eps) == 0
  # A point outside the ball is counted.
  assert adaptive_eval.ball_violations(np.clip(x + 0.1, 0, 1), x, 'linf', 8 / 255) > 0


def test_attack_success_needs_fooled_unflagged_and_wrong_correction():
  y = np.array([0, 0, 0, 0])
  dec = {'flagged': np.array([False, True, False, False]), 'pred': np.array([1, 1, 0, 2])}
  m_pred = np.array([1, 1, 1, 0])
  np.testing.assert_array_equal(adaptive_eval.attack_success(dec, m_pred, y, corrects=True),
                                [True, False, False, False])
  np.testing.assert_array_equal(adaptive_eval.attack_success(dec, m_pred, y, corrects=False),
                                [True, False, True, False])


def test_step_fraction_is_the_base_step_size_as_a_fraction_of_eps():
  d, state, ctx = _toy_target()
  x, y = _clean(4)
  target = adaptive.target_of(d, state, ctx)
  a = attacks.compile_attack('adaptive(base="pgd_linf(eps=0.04, steps=5)", step_fraction=0.25)')
  b = attacks.compile_attack('adaptive(base="pgd_linf(eps=0.04, steps=5, step_size=0.01)")')
  c = attacks.compile_attack('adaptive(base="pgd_linf(eps=0.04, steps=5)")')
  xa, xb, xc = (np.asarray(f(ctx.logits_fn, x, y, jax.random.key(0), target=target))
                for f in (a, b, c))
  np.testing.assert_array_equal(xa, xb)
  assert not np.array_equal(xa, xc)     # the default step (2.5 eps / steps) differs
