"""Tests for unmask_jax.attacks: closed forms, optima, budgets, determinism, tracing, errors."""
from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unmask_jax import attacks
from unmask_jax.attacks import common
from unmask_jax.attacks.apgd import apgd_l2, apgd_linf, checkpoint_schedule
from unmask_jax.attacks.bim import bim
from unmask_jax.attacks.cw import cw_l2
from unmask_jax.attacks.deepfool import deepfool
from unmask_jax.attacks.fgsm import fgsm
from unmask_jax.attacks.mifgsm import mifgsm_l2, mifgsm_linf
from unmask_jax.attacks.pgd import pgd_l2, pgd_linf

Partial = jax.tree_util.Partial
SHAPE = (4, 4, 1)  # tiny images: d = 16
D = math.prod(SHAPE)


# ----------------------------------------------------------------------------------------------
# Tiny models (pure functions of (params, x), wrapped in Partial so the weights are jit arguments).
# ----------------------------------------------------------------------------------------------
def linear_apply(params, x):
  w, b = params
  return x.reshape(x.shape[0], -1) @ w + b


def mlp_apply(params, x):
  (w1, b1), (w2, b2) = params
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1)
  return h @ w2 + b2


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_ce_grad(w, b, x, y):
  """d CE / dx for the linear model, float64 (the closed form the attacks must reproduce)."""
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  p = np_softmax(flat @ w + b)
  p[np.arange(len(y)), y] -= 1.0
  return (p @ w.T).reshape(x.shape)


# Test data come from numpy: eager jax.random calls each compile a threefry kernel (~0.5 s each).
def normal(seed, shape, scale=1.0, loc=0.0):
  return jnp.asarray(loc + scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def random_linear(seed, num_classes=3, scale=1.0):
  w = normal(seed, (D + 1, num_classes))
  return scale * w[:D], 0.1 * w[D]


def make_data(seed, n, num_classes=3, spread=0.08, noise=0.05):
  """Separable-ish clusters around 0.5 (so minimal perturbations stay inside the pixel box)."""
  rng = np.random.default_rng(seed)
  mu = 0.5 + spread * rng.standard_normal((num_classes,) + SHAPE)
  y = rng.integers(0, num_classes, n)
  x = np.clip(mu[y] + noise * rng.standard_normal((n,) + SHAPE), 0.0, 1.0)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def train(apply_fn, params, x, y, steps=300, lr=0.5):
  """Full-batch gradient descent on cross-entropy; well under a second for these sizes."""
  def loss(p):
    return jnp.mean(common.cross_entropy(apply_fn(p, x), y))

  @jax.jit
  def fit(p):
    def step(p, _):
      g = jax.grad(loss)(p)
      return jax.tree.map(lambda a, b: a - lr * b, p, g), None
    return jax.lax.scan(step, p, None, length=steps)[0]

  return fit(params)


@pytest.fixture(scope='module')
def trained():
  """A linear 3-class model and a 16-unit MLP trained on the same data, with 32 points each that
  they classify correctly."""
  x, y = make_data(0, 512)
  lin = train(linear_apply, (jnp.zeros((D, 3)), jnp.zeros((3,))), x, y, steps=400, lr=2.0)
  mlp0 = ((normal(1, (D, 16), 0.5), jnp.zeros((16,))), (normal(2, (16, 3), 0.5), jnp.zeros((3,))))
  mlp = train(mlp_apply, mlp0, x, y, steps=400, lr=1.0)
  out = {}
  for name, apply_fn, params in (('linear', linear_apply, lin), ('mlp', mlp_apply, mlp)):
    fn = Partial(apply_fn, params)
    ok = np.asarray(jnp.argmax(fn(x), -1) == y)
    assert ok.mean() > 0.9, f'{name} did not train: accuracy {ok.mean():.2f}'
    idx = np.nonzero(ok)[0][:32]
    out[name] = (fn, params, x[idx], y[idx])
  return out


def success(fn, x_adv, y, targeted=False):
  return np.asarray(common.is_success(fn(x_adv), y, targeted))


def l2(a, b):
  return np.asarray(common.l2_norm(a - b))


def linf(a, b):
  return np.asarray(common.linf_norm(a - b))


# rbg keys: XLA:CPU compiles the threefry PRNG (the default) about 1 s slower per attack, and the
# attacks do not depend on the key implementation. test_same_key_same_x_adv uses threefry keys.
KEY = jax.random.key(42, impl='rbg')


# ----------------------------------------------------------------------------------------------
# Closed forms and known optima.
# ----------------------------------------------------------------------------------------------
def test_fgsm_matches_closed_form_on_linear_model():
  params = random_linear(1)
  # Pixels at and near 0 and 1 so that the final clip to [0, 1] matters.
  x = uniform(2, (8,) + SHAPE).at[:, 0, 0, 0].set(0.0).at[:, 1, 1, 0].set(1.0)
  y = jnp.arange(8, dtype=jnp.int32) % 3
  eps = 0.1
  fn = Partial(linear_apply, params)
  w, b = (np.asarray(p, np.float64) for p in params)
  sign_grad = np.sign(np_ce_grad(w, b, np.asarray(x), np.asarray(y)))
  x_adv = jax.jit(functools.partial(fgsm, eps=eps))(fn, x, y, KEY)
  np.testing.assert_allclose(np.asarray(x_adv), np.clip(np.asarray(x) + eps * sign_grad, 0, 1),
                             atol=1e-6)
  # Targeted FGSM descends the target's loss.
  x_t = jax.jit(functools.partial(fgsm, eps=eps, targeted=True))(fn, x, y, KEY)
  np.testing.assert_allclose(np.asarray(x_t), np.clip(np.asarray(x) - eps * sign_grad, 0, 1),
                             atol=1e-6)


def _binary_linear(seed=3):
  """logits = [0, w.x + b]: for y = 0 every loss increases with w.x, a linear objective.

  b = -sum(max(w, 0)) - 1 keeps w.x + b <= -1 on all of [0,1]^d, so no point is misclassified (the
  attacks then return their highest-loss iterate) while the loss is far from float32 saturation.
  """
  w = normal(seed, (D,))
  wm = jnp.stack([jnp.zeros(D), w], axis=1)
  return (wm, jnp.array([0.0, -float(jnp.sum(jnp.maximum(w, 0))) - 1.0])), np.asarray(w)


def test_pgd_linf_reaches_box_corner_optimum():
  params, w = _binary_linear()
  x = uniform(4, (6,) + SHAPE)
  y = jnp.zeros((6,), jnp.int32)
  eps = 0.1
  fn = Partial(linear_apply, params)
  # The maximiser of a linear objective over the box B_∞(x, eps) ∩ [0,1]^d is its corner.
  optimum = np.clip(np.asarray(x) + eps * np.sign(w).reshape(SHAPE), 0, 1)
  # BIM has no random start and accepts key=None.
  for attack, key in ((pgd_linf, KEY), (apgd_linf, KEY), (bim, None)):
    x_adv = jax.jit(functools.partial(attack, eps=eps, steps=5))(fn, x, y, key)
    np.testing.assert_allclose(np.asarray(x_adv), optimum, atol=1e-6, err_msg=attack.__name__)


def test_pgd_l2_reaches_gradient_direction_optimum():
  params, w = _binary_linear()
  x = normal(5, (6,) + SHAPE, 0.05, 0.5)  # far from the box faces
  y = jnp.zeros((6,), jnp.int32)
  eps = 0.3
  fn = Partial(linear_apply, params)
  optimum = np.asarray(x) + eps * (w / np.linalg.norm(w)).reshape(SHAPE)
  x_adv = jax.jit(functools.partial(pgd_l2, eps=eps, steps=5, random_start=False))(fn, x, y, KEY)
  np.testing.assert_allclose(np.asarray(x_adv), optimum, atol=1e-5)
  # From a random start the iterate converges to the same point: each projection shrinks the
  # random component. (With a step of eps the angle to the optimum about halves per step, so 5
  # steps are enough; the default 2.5 eps/steps is slower here.) APGD adapts its own step.
  for attack, kw in ((pgd_l2, dict(step_size=eps, steps=5)), (apgd_l2, dict(steps=4))):
    x_adv = jax.jit(functools.partial(attack, eps=eps, **kw))(fn, x, y, KEY)
    delta = (np.asarray(x_adv) - np.asarray(x)).reshape(6, -1)
    cos = delta @ w / (eps * np.linalg.norm(w))
    assert cos.min() > 0.99, (attack.__name__, cos)
    np.testing.assert_allclose(l2(x_adv, x), eps, rtol=1e-4)


def test_l2_steps_have_exactly_the_requested_norm_per_example():
  # Gradients of very different sizes in one batch: a confidently correct example (tiny gradient)
  # next to misclassified ones. A batch-wide norm (the cleverhans-JAX bug) would give each example
  # a different step length.
  params = random_linear(6, scale=3.0)
  fn = Partial(linear_apply, params)
  x = normal(7, (6,) + SHAPE, 0.1, 0.5)
  logits = fn(x)
  y = jnp.concatenate([jnp.argmax(logits[:3], -1), jnp.argmin(logits[3:], -1)]).astype(jnp.int32)
  grads = np_ce_grad(*(np.asarray(p, np.float64) for p in params), np.asarray(x), np.asarray(y))
  norms = np.linalg.norm(grads.reshape(6, -1), axis=1)
  assert norms.max() / norms.min() > 10, norms  # the batch really mixes gradient scales
  alpha = 0.05
  for attack in (pgd_l2, mifgsm_l2):
    kw = dict(random_start=False) if attack is pgd_l2 else {}
    one_step = functools.partial(attack, eps=1.0, steps=1, step_size=alpha, **kw)
    x_adv = jax.jit(one_step)(fn, x, y, KEY)
    np.testing.assert_allclose(l2(x_adv, x), alpha, rtol=1e-4, err_msg=attack.__name__)


def test_zero_gradient_gives_zero_step_not_nan():
  z = jnp.zeros((2,) + SHAPE)
  np.testing.assert_array_equal(np.asarray(common.normalize_l2(z)), 0.0)
  np.testing.assert_array_equal(np.asarray(common.normalize_l1(z)), 0.0)
  const = Partial(lambda x: jnp.zeros((x.shape[0], 3)))  # constant logits: zero gradient
  x = jnp.full((2,) + SHAPE, 0.5)
  y = jnp.zeros((2,), jnp.int32)
  for attack in (pgd_l2, mifgsm_l2, apgd_l2):
    x_adv = jax.jit(functools.partial(attack, eps=0.5, steps=1))(const, x, y, KEY)
    assert np.all(np.isfinite(np.asarray(x_adv))), attack.__name__


def test_mifgsm_momentum_matches_hand_computed_two_steps():
  params = random_linear(8, scale=2.0)
  w, b = (np.asarray(p, np.float64) for p in params)
  fn = Partial(linear_apply, params)
  x = np.asarray(normal(9, (4,) + SHAPE, 0.1, 0.5), np.float64)
  y = np.array([0, 1, 2, 0], np.int32)
  alpha, mu = 0.04, 0.5  # mu != 1 so that a hard-coded decay is caught

  def unit_l1(g):
    return g / np.abs(g).reshape(len(g), -1).sum(1)[:, None, None, None]

  def unit_l2(g):
    return g / np.linalg.norm(g.reshape(len(g), -1), axis=1)[:, None, None, None]

  for norm, attack, eps in (('linf', mifgsm_linf, 0.1), ('l2', mifgsm_l2, 0.5)):
    x_t, g = x.copy(), np.zeros_like(x)
    for _ in range(2):
      g = mu * g + unit_l1(np_ce_grad(w, b, x_t, y))
      step = np.sign(g) if norm == 'linf' else unit_l2(g)
      x_t = x_t + alpha * step
      if norm == 'linf':
        x_t = np.clip(x_t, x - eps, x + eps)
      else:
        d = x_t - x
        n = np.linalg.norm(d.reshape(len(d), -1), axis=1)[:, None, None, None]
        x_t = x + d * np.minimum(1, eps / n)
      x_t = np.clip(x_t, 0, 1)
    got = jax.jit(functools.partial(attack, eps=eps, steps=2, step_size=alpha, decay=mu))(
        fn, jnp.asarray(x, jnp.float32), jnp.asarray(y), KEY)
    np.testing.assert_allclose(np.asarray(got), x_t, atol=2e-5, err_msg=norm)
    if norm == 'l2':
      # The second step is not along the current gradient: momentum really enters.
      plain = x_t - alpha * unit_l2(np_ce_grad(w, b, x_t, y))
      assert not np.allclose(np.asarray(got), plain, atol=1e-3)


def test_apgd_checkpoints_match_the_paper():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): checkpoints at
  # ceil(p_j * 100) = 22, 41, 57, 70, 80, 87, 93, 99 (1-based iterations).
  is_check, window = checkpoint_schedule(100)
  assert list(np.nonzero(is_check)[0] + 1) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert list(window[is_check]) == [22, 19, 16, 13, 10, 7, 6, 6]


# ----------------------------------------------------------------------------------------------
# Budgets, determinism, restarts, tracing.
# ----------------------------------------------------------------------------------------------
ALL_ATTACKS = {
    'fgsm': dict(eps=0.1),
    'bim': dict(eps=0.1, steps=5),
    'pgd_linf': dict(eps=0.1, steps=5, restarts=2),
    'pgd_l2': dict(eps=0.4, steps=5, restarts=2),
    'mifgsm_linf': dict(eps=0.1, steps=5),
    'mifgsm_l2': dict(eps=0.4, steps=5),
    'cw_l2': dict(eps=0.4, steps=5, binary_search_steps=2, initial_const=10.0),
    'deepfool': dict(eps=0.4, steps=5),
    'apgd_linf': dict(eps=0.1, steps=3),
    'apgd_l2': dict(eps=0.4, steps=3),
}


def test_registry_lists_every_attack():
  # adaptive needs a defense to attack, and the AutoAttack members have their own tests
  # (tests/test_autoattack.py), so they are not in ALL_ATTACKS.
  others = {'adaptive', 'apgd_t_linf', 'apgd_t_l2', 'fab_t', 'square_linf', 'square_l2',
            'autoattack'}
  assert attacks.ATTACKS.names() == sorted(set(ALL_ATTACKS) | others)


@pytest.mark.parametrize('name', sorted(ALL_ATTACKS))
def test_every_attack_stays_in_its_ball_and_in_pixel_range(name, trained):
  fn, _, x, y = trained['mlp']
  # Saturated pixels at 0 and 1, where a missing clip shows.
  x = x.at[:, 0].set(0.0).at[:, 1].set(1.0)
  params = ALL_ATTACKS[name]
  attack = attacks.compile_attack(name, **params)
  x_adv = np.asarray(attack(fn, x, y, KEY))
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32
  assert np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  dist = linf(x_adv, x) if attacks.norm_of(name) == 'linf' else l2(x_adv, x)
  assert dist.max() <= params['eps'] * (1 + 1e-5) + 1e-6, dist.max()
  assert success(fn, x_adv, y).mean() > 0.0, 'the attack changed nothing'


def test_same_key_same_x_adv():
  fn = Partial(linear_apply, random_linear(10))
  x = jnp.full((4,) + SHAPE, 0.5)
  y = jnp.zeros((4,), jnp.int32)
  attack = functools.partial(pgd_linf, eps=0.1, steps=1, step_size=1e-3, restarts=2)
  # Two separately compiled programs, so that the equality is not just a cache hit; default
  # (threefry) keys.
  first = jax.jit(attack)
  a1, b = first(fn, x, y, jax.random.key(1)), first(fn, x, y, jax.random.key(2))
  a2 = jax.jit(functools.partial(attack))(fn, x, y, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  assert not np.allclose(np.asarray(a1), np.asarray(b))


def test_random_start_is_inside_ball():
  x = uniform(11, (64,) + SHAPE)
  for norm, eps in (('linf', 0.05), ('l2', 0.3)):
    x0 = jax.jit(functools.partial(common.random_start, norm, eps=eps))(KEY, x)
    dist = linf(x0, x) if norm == 'linf' else l2(x0, x)
    assert dist.max() <= eps + 1e-6 and dist.mean() > 0.3 * eps
    assert float(x0.min()) >= 0 and float(x0.max()) <= 1


def test_restarts_never_lower_success(trained):
  fn, _, x, y = trained['mlp']
  # One tiny step after the random start: the outcome is decided by the start, so the restarts
  # really differ and keeping the wrong one (e.g. the last) would show. The per-example best-of
  # logic is shared by every attack with restarts (common.best_of_restarts).
  runs = {}
  for r in (1, 4):
    attack = functools.partial(pgd_linf, eps=0.2, steps=1, step_size=0.02, restarts=r)
    x_adv = jax.jit(attack)(fn, x, y, KEY)
    runs[r] = (success(fn, x_adv, y), np.asarray(common.cross_entropy(fn(x_adv), y)))
  (s1, l1), (s4, l4) = runs[1], runs[4]
  assert 0 < s1.mean() < 0.5, f'eps should give partial success, got {s1.mean()}'
  assert np.all(s4 >= s1)  # per example, not just on average
  assert s4.mean() > s1.mean()  # and the extra starts do find more here
  both_fail = ~s1 & ~s4
  assert np.all(l4[both_fail] >= l1[both_fail] - 1e-5)


def test_iterative_at_least_as_strong_as_single_step(trained):
  fn, _, x, y = trained['mlp']
  eps = 0.05
  pgd = jax.jit(functools.partial(pgd_linf, steps=5))  # eps traced: one compilation for both eps
  s = {a.__name__: success(fn, jax.jit(functools.partial(a, eps=eps, **kw))(fn, x, y, KEY),
                           y).mean()
       for a, kw in ((fgsm, {}), (apgd_linf, dict(steps=5)))}
  s['pgd_linf'] = success(fn, pgd(fn, x, y, KEY, eps=jnp.float32(eps)), y).mean()
  # CE is only a surrogate of misclassification, so one FGSM step may cross for an example that
  # the iterates do not: allow one example of 32. A broken iterative attack loses far more.
  tol = 1.0 / len(y)
  assert s['pgd_linf'] >= s['fgsm'] - tol and s['apgd_linf'] >= s['fgsm'] - tol, s
  # Success rises with eps.
  big = pgd(fn, x, y, KEY, eps=jnp.float32(0.2))
  assert success(fn, big, y).mean() >= s['pgd_linf']


def test_targeted_pgd_reaches_target(trained):
  fn, _, x, y = trained['mlp']
  target = ((y + 1) % 3).astype(jnp.int32)
  attack = jax.jit(functools.partial(pgd_linf, eps=0.3, steps=10, targeted=True))
  x_adv = attack(fn, x, target, KEY)
  assert success(fn, x_adv, target, targeted=True).mean() >= 0.9
  # Targeting the true class is a no-op attack: it must keep every prediction.
  x_same = attack(fn, x, y, KEY)
  assert not success(fn, x_same, y).any()


def test_no_retracing_across_batches_and_weights():
  chex.clear_trace_counter()

  def pgd3(logits_fn, x, y, key):
    return pgd_linf(logits_fn, x, y, key, eps=0.1, steps=3)

  attack = jax.jit(chex.assert_max_traces(pgd3, n=1))
  for seed in range(3):  # new weights, new batch, new key; same shapes
    fn = Partial(linear_apply, random_linear(seed))
    x = uniform(100 + seed, (4,) + SHAPE)
    attack(fn, x, jnp.zeros((4,), jnp.int32), jax.random.key(seed, impl='rbg')).block_until_ready()
  # The compile_attack convention itself: one compiled program for all same-shaped calls.
  compiled = attacks.compile_attack('fgsm(eps=0.5)')
  for seed in range(3):
    fn = Partial(linear_apply, random_linear(seed))
    compiled(fn, jnp.full((4,) + SHAPE, 0.5), jnp.zeros((4,), jnp.int32), KEY)
  assert compiled._cache_size() == 1
  # Attacks that compile their own programs (host-driven loops) compile nothing after the first
  # call either: new weights, batch and key reuse every program.
  compiles = []
  listener = lambda name, secs, **_: compiles.append(name)
  for spec in ('mifgsm_l2(eps=0.5, steps=3)', 'pgd_linf(eps=0.1, steps=30)', 'deepfool(steps=5)'):
    host = attacks.compile_attack(spec)
    for seed in range(3):
      if seed == 1:
        jax.monitoring.register_event_duration_secs_listener(listener)
      fn = Partial(linear_apply, random_linear(seed))
      host(fn, uniform(100 + seed, (4,) + SHAPE), jnp.zeros((4,), jnp.int32),
           jax.random.key(seed, impl='rbg')).block_until_ready()
    jax.monitoring.unregister_event_duration_listener(listener)
    assert '/jax/core/compile/backend_compile_duration' not in compiles, (spec, compiles)


# ----------------------------------------------------------------------------------------------
# Minimum-norm attacks on a trained model.
# ----------------------------------------------------------------------------------------------
def _linear_min_distance(params, x, y):
  """Exact L2 distance to the decision region of another class for a linear classifier
  (distance to the nearest facet hyperplane; the box is not active for these data)."""
  w, b = (np.asarray(p, np.float64) for p in params)
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  z = flat @ w + b
  y = np.asarray(y)
  dists = []
  for i in range(len(y)):
    d = [(z[i, y[i]] - z[i, k]) / np.linalg.norm(w[:, y[i]] - w[:, k])
         for k in range(w.shape[1]) if k != y[i]]
    dists.append(min(d))
  return np.array(dists)


def test_deepfool_and_cw_find_the_minimal_perturbation_of_a_linear_model(trained):
  fn, params, x, y = trained['linear']
  d_min = _linear_min_distance(params, x, y)
  x_df = jax.jit(functools.partial(deepfool, steps=10))(fn, x, y, KEY)
  s_df = success(fn, x_df, y)
  assert s_df.mean() == 1.0
  ratio = l2(x_df, x) / d_min
  # One linearisation is exact here: the step lands (1 + overshoot) past the nearest facet.
  np.testing.assert_allclose(ratio, 1.02, atol=5e-3)

  x_cw = jax.jit(functools.partial(cw_l2, steps=100, binary_search_steps=6, initial_const=1.0,
                                   lr=5e-3))(fn, x, y, KEY)
  s_cw = success(fn, x_cw, y)
  assert s_cw.mean() >= 0.9
  ratio = l2(x_cw, x)[s_cw] / d_min[s_cw]
  assert ratio.min() >= 0.999  # nothing can beat the exact minimum...
  assert np.median(ratio) < 1.15, np.median(ratio)  # ...and CW gets close to it


def test_min_norm_attacks_need_much_less_than_pgd_l2(trained):
  fn, _, x, y = trained['mlp']
  x_df = jax.jit(functools.partial(deepfool, steps=5))(fn, x, y, KEY)
  x_cw = jax.jit(functools.partial(cw_l2, steps=60, binary_search_steps=5, initial_const=1.0))(
      fn, x, y, KEY)
  s_df, s_cw = success(fn, x_df, y), success(fn, x_cw, y)
  assert s_df.mean() >= 0.95 and s_cw.mean() >= 0.9, (s_df.mean(), s_cw.mean())
  # eps is traced here, so the whole sweep is one compilation.
  pgd = jax.jit(functools.partial(pgd_l2, steps=10))
  grid = np.arange(0.025, 1.0, 0.025)
  pgd_success = []
  for eps in grid:
    pgd_success.append(success(fn, pgd(fn, x, y, KEY, eps=jnp.float32(eps)), y).mean())
    if pgd_success[-1] == 1.0:
      break
  assert pgd._cache_size() == 1
  for name, x_adv, s in (('deepfool', x_df, s_df), ('cw_l2', x_cw, s_cw)):
    # The smallest eps at which PGD-L2 succeeds as often as the minimum-norm attack.
    eps_needed = grid[np.argmax(np.array(pgd_success) >= s.mean())]
    mean_norm = l2(x_adv, x)[s].mean()
    assert mean_norm < 0.8 * eps_needed, (name, mean_norm, eps_needed)


# ----------------------------------------------------------------------------------------------
# Errors: eps/steps checks, registry and spec parsing, input validation.
# ----------------------------------------------------------------------------------------------
def test_linf_eps_in_255_units_is_rejected_with_hint():
  with pytest.raises(ValueError, match=r'8/255'):
    attacks.compile_attack('pgd_linf(eps=8, steps=20)')
  fn = Partial(linear_apply, random_linear(0))
  x, y = jnp.full((2,) + SHAPE, 0.5), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r'/255'):
    jax.jit(functools.partial(fgsm, eps=8.0))(fn, x, y, KEY)


def test_l2_eps_larger_than_image_diameter_is_rejected():
  fn = Partial(linear_apply, random_linear(0))
  x, y = jnp.full((2,) + SHAPE, 0.5), jnp.zeros((2,), jnp.int32)
  ok = attacks.compile_attack('pgd_l2', eps=3.9, steps=1)  # diameter sqrt(16) = 4
  ok(fn, x, y, KEY)
  with pytest.raises(ValueError, match=r'diameter.*/255'):
    attacks.compile_attack('pgd_l2', eps=300, steps=1)(fn, x, y, KEY)
  with pytest.raises(ValueError, match=r'diameter'):
    jax.jit(functools.partial(cw_l2, eps=4.5, steps=1, binary_search_steps=1))(fn, x, y, KEY)


@pytest.mark.parametrize('spec', ['pgd_linf(eps=0)', 'pgd_l2(eps=-0.5)', 'fgsm(eps=-1/255)',
                                  'pgd_linf(eps=8/255, steps=0)', 'apgd_l2(eps=0.5, restarts=0)',
                                  'bim(eps=0.1, steps=2.5)', 'cw_l2(binary_search_steps=0)'])
def test_bad_eps_or_steps_rejected(spec):
  with pytest.raises(ValueError):
    attacks.parse_attack(spec)


def test_nan_eps_rejected():
  with pytest.raises(ValueError, match='positive finite'):
    common.check_eps('linf', float('nan'))


def test_spec_parsing_and_registry_errors():
  spec = attacks.parse_attack('pgd_linf(eps=8/255, steps=20)')
  assert spec.name == 'pgd_linf' and spec.fn is pgd_linf and spec.norm == 'linf'
  assert spec.params == {'eps': 8 / 255, 'steps': 20}
  assert attacks.parse_attack('fgsm', eps=0.1).params == {'eps': 0.1}
  with pytest.raises(KeyError, match=r"Did you mean 'pgd_linf'.*apgd_l2.*pgd_linf"):
    attacks.parse_attack('pgd_lnf(eps=0.1)')
  with pytest.raises(TypeError, match=r"\['stepz'\].*steps"):
    attacks.parse_attack('pgd_linf(eps=0.1, stepz=3)')
  with pytest.raises(TypeError, match=r'needs parameter.*eps'):
    attacks.parse_attack('pgd_l2(steps=3)')
  with pytest.raises(ValueError, match='Cannot parse'):
    attacks.parse_attack('pgd_linf(eps=')
  assert attacks.norm_of('pgd_l2') == 'l2' and attacks.norm_of('deepfool') == 'l2'
  assert attacks.norm_of('mifgsm_linf(eps=8/255)') == 'linf'
  with pytest.raises(KeyError):
    attacks.norm_of('nope')
  with pytest.raises(ValueError, match='Unknown loss'):
    attacks.compile_attack('pgd_linf', eps=0.1, loss='hinge')(
        Partial(linear_apply, random_linear(0)), jnp.zeros((1,) + SHAPE),
        jnp.zeros((1,), jnp.int32), KEY)


def test_threat_model_is_declared_next_to_each_attack():
  """The norm of every registered attack comes from its function's decorator (no table)."""
  assert not hasattr(attacks, '_NORMS') and not hasattr(attacks, '_NORM_PARAM')
  fixed = {'fgsm': 'linf', 'bim': 'linf', 'pgd_linf': 'linf', 'pgd_l2': 'l2', 'mifgsm_linf': 'linf',
           'mifgsm_l2': 'l2', 'cw_l2': 'l2', 'deepfool': 'l2', 'apgd_linf': 'linf', 'apgd_l2': 'l2',
           'apgd_t_linf': 'linf', 'apgd_t_l2': 'l2', 'square_linf': 'linf', 'square_l2': 'l2'}
  declared = {name: attacks.ATTACKS.get(name).threat_model for name in attacks.ATTACKS.names()}
  assert all(isinstance(d, common.ThreatModel) for d in declared.values())
  assert {n: d.norm for n, d in declared.items() if d.norm} == fixed
  assert {n: d.param or d.base for n, d in declared.items() if not d.norm} == {
      'fab_t': 'norm', 'autoattack': 'norm', 'adaptive': 'base'}
  assert all(attacks.norm_of(n) == norm for n, norm in fixed.items())
  assert attacks.norm_of('fab_t') == 'linf' and attacks.norm_of('fab_t(eps=0.5, norm="l2")') == 'l2'
  assert attacks.norm_of('adaptive(base="pgd_l2(eps=0.5)")') == 'l2'
  assert attacks.norm_of('adaptive()') == 'linf'  # its default base
  with pytest.raises(ValueError, match='base attack'):
    attacks.norm_of('adaptive')


def test_adding_an_attack_is_one_decorated_function_and_one_registry_line(monkeypatch):
  @common.threat_model('linf')
  def my_attack(logits_fn, x, y, key, *, eps, steps=3):
    del logits_fn, key, y, steps
    return common.clip_pixels(x + eps)

  monkeypatch.setitem(attacks.ATTACKS._entries, 'my_attack', my_attack)
  spec = attacks.parse_attack('my_attack(eps=0.1)')
  assert spec.norm == 'linf' == attacks.norm_of('my_attack') and spec.fn is my_attack
  with pytest.raises(ValueError, match='8/255'):  # eps checked in the declared norm
    attacks.parse_attack('my_attack(eps=8)')

  @common.threat_model(param='p')
  def by_param(logits_fn, x, y, key, *, eps, p='l2'):
    return x

  monkeypatch.setitem(attacks.ATTACKS._entries, 'by_param', by_param)
  assert attacks.norm_of('by_param') == 'l2'
  assert attacks.norm_of('by_param(eps=0.1, p="linf")') == 'linf'
  with pytest.raises(ValueError, match='p must be one of'):
    attacks.parse_attack('by_param(eps=0.1, p="l1")')

  def undeclared(logits_fn, x, y, key, *, eps):
    return x

  monkeypatch.setitem(attacks.ATTACKS._entries, 'undeclared', undeclared)
  with pytest.raises(TypeError, match='declares no threat model'):
    attacks.parse_attack('undeclared(eps=0.1)')
  with pytest.raises(TypeError, match='exactly one'):
    common.threat_model('linf', param='norm')
  with pytest.raises(ValueError, match='norm must be one of'):
    common.threat_model('l1')


def test_validate_inputs():
  x = np.full((2,) + SHAPE, 0.5, np.float32)
  y = np.array([0, 2])
  attacks.validate_inputs(x, y, num_classes=3)
  with pytest.raises(ValueError, match='NaN'):
    attacks.validate_inputs(np.where(np.arange(D).reshape(SHAPE) == 3, np.nan, x), y, 3)
  with pytest.raises(ValueError, match='divide by 255'):
    attacks.validate_inputs(x * 255, y, 3)
  with pytest.raises(ValueError, match='normalised'):
    attacks.validate_inputs(x - 1.0, y, 3)
  with pytest.raises(ValueError, match=r'labels must be in \[0, 3\)'):
    attacks.validate_inputs(x, np.array([0, 3]), 3)
  with pytest.raises(ValueError, match='labels'):
    attacks.validate_inputs(x, np.array([-1, 0]), 3)
  with pytest.raises(ValueError, match=r'y must be \[N\]'):
    attacks.validate_inputs(x, np.array([0]), 3)
  with pytest.raises(ValueError, match='uint8'):
    attacks.validate_inputs(x.astype(np.uint8), y, 3)


def test_loop_forms_agree():
  """Every loop form computes the same attack (the default is a speed choice, not semantics)."""
  fn = Partial(mlp_apply, ((normal(1, (D, 8)), jnp.zeros(8)), (normal(2, (8, 3)), jnp.zeros(3))))
  x = uniform(3, (4,) + SHAPE)
  y = jnp.array([0, 1, 2, 0], jnp.int32)
  cases = [(form, mifgsm_l2, 3) for form in common.LOOP_FORMS]
  # APGD indexes its checkpoint schedule with the step counter: a Python int when unrolled, traced
  # otherwise.
  cases += [('unrolled', apgd_linf, 3), ('fori', apgd_linf, 3)]
  outs = {}
  for form, attack, steps in cases:
    with common.loop_form(form):
      outs[form, attack] = np.asarray(
          jax.jit(functools.partial(attack, eps=0.1, steps=steps))(fn, x, y, KEY))
  for (form, attack), out in outs.items():
    np.testing.assert_allclose(out, outs['unrolled', attack], atol=1e-6,
                               err_msg=f'{form} {attack.__name__}')
  with pytest.raises(ValueError, match='loop form'):
    with common.loop_form('while'):
      pass
  # Long loops, and loops repeated by restarts, are not unrolled (compile time, program size).
  assert common.current_loop_form(common.MAX_UNROLL + 1) == 'scan'
  with common._repeated(common.MAX_UNROLL):
    assert common.current_loop_form(2) == 'scan'


@pytest.mark.parametrize('form', common.LOOP_FORMS)
def test_iterate_until_stops_when_done_and_equals_iterate(form):
  body = lambda i, c: (c[0] + 1, c[1] + jnp.where(c[1] < 3.0, 1.0, 0.0))
  with common.loop_form(form):
    # Counts the iterations run: done after 3 (the 4th would be a no-op for the second element).
    count, val = jax.jit(lambda c: common.iterate_until(body, c, 10, lambda c: c[1] >= 3.0))(
        (jnp.asarray(0), jnp.asarray(0.0)))
    _, full = jax.jit(lambda c: common.iterate(body, c, 10))((jnp.asarray(0), jnp.asarray(0.0)))
  # Rolled forms leave the loop; the unrolled form runs every step (faster on XLA:CPU than conds).
  assert int(count) == (10 if form == 'unrolled' else 3) and float(val) == float(full) == 3.0
  with common.loop_form(form):  # never done: all iterations run
    count, _ = jax.jit(lambda c: common.iterate_until(body, c, 5, lambda c: c[1] > 99.0))(
        (jnp.asarray(0), jnp.asarray(0.0)))
  assert int(count) == 5


def test_deepfool_early_exit_equals_the_fixed_count():
  """Skipping the iterations after every example is frozen changes nothing in the result."""
  fn = Partial(mlp_apply, ((normal(1, (D, 8)), jnp.zeros(8)), (normal(2, (8, 3)), jnp.zeros(3))))
  x = uniform(3, (4,) + SHAPE)
  y = jnp.asarray(np.asarray(fn(x)).argmax(-1), jnp.int32)
  with common.loop_form('scan'):
    fast = jax.jit(functools.partial(deepfool, steps=30))(fn, x, y, KEY)
  iterate_until = common.iterate_until
  try:  # the same attack with the early exit disabled
    common.iterate_until = lambda body, carry, steps, done: common.iterate(body, carry, steps)
    with common.loop_form('scan'):
      slow = jax.jit(functools.partial(deepfool, steps=30, overshoot=0.02))(fn, x, y, KEY)
  finally:
    common.iterate_until = iterate_until
  assert np.mean(np.asarray(fn(fast)).argmax(-1) != np.asarray(y)) == 1.0
  np.testing.assert_allclose(fast, slow, atol=1e-6)
