"""Tests for the AutoAttack members (APGD-T, FAB-T, Square) and the `autoattack` ensemble."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unmask_jax import attacks
from unmask_jax.attacks import apgd, common, fab, square
from unmask_jax.attacks.autoattack import autoattack
from unmask_jax.attacks.pgd import pgd_l2, pgd_linf

Partial = jax.tree_util.Partial
SHAPE = (8, 8, 1)  # tiny images, but large enough for Square's windows: d = 64
D = math.prod(SHAPE)
C = 10             # APGD-T and FAB-T target the 9 runner-up classes, as AutoAttack on CIFAR-10
# rbg keys compile faster on XLA:CPU than threefry (see tests/test_attacks.py).
KEY = jax.random.key(42, impl='rbg')


def linear_apply(params, x):
  w, b = params
  return x.reshape(x.shape[0], -1) @ w + b


def make_data(seed, n, spread=0.04, noise=0.1):
  """Overlapping clusters around 0.5: a linear model gets ~94%, with small margins."""
  rng = np.random.default_rng(seed)
  mu = 0.5 + spread * rng.standard_normal((C,) + SHAPE)
  y = rng.integers(0, C, n)
  x = np.clip(mu[y] + noise * rng.standard_normal((n,) + SHAPE), 0.0, 1.0)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


@pytest.fixture(scope='module')
def trained():
  """A 10-class linear model trained by full-batch gradient descent, with 32 correctly classified
  points and 4 misclassified ones."""
  x, y = make_data(0, 1024)

  def loss(p):
    return jnp.mean(common.cross_entropy(linear_apply(p, x), y))

  @jax.jit
  def fit(p):
    def step(p, _):
      return jax.tree.map(lambda a, g: a - 2.0 * g, p, jax.grad(loss)(p)), None
    return jax.lax.scan(step, p, None, length=400)[0]

  params = fit((jnp.zeros((D, C)), jnp.zeros((C,))))
  fn = Partial(linear_apply, params)
  ok = np.asarray(jnp.argmax(fn(x), -1) == y)
  assert ok.mean() > 0.9, ok.mean()
  good, bad = np.nonzero(ok)[0][:32], np.nonzero(~ok)[0][:4]
  return fn, params, x[good], y[good], x[bad], y[bad]


def fooled(fn, x_adv, y):
  return np.asarray(jnp.argmax(fn(x_adv), -1) != y)


def dist(norm, a, b):
  return np.asarray(common.linf_norm(a - b) if norm == 'linf' else common.l2_norm(a - b))


# Small budgets: each spec compiles in a second or two. case -> (registry name, parameters).
SPECS = {
    'apgd_t_linf': ('apgd_t_linf', dict(eps=0.04, steps=3, n_targets=3)),
    'apgd_t_l2': ('apgd_t_l2', dict(eps=0.5, steps=3, n_targets=3)),
    'fab_t_linf': ('fab_t', dict(eps=0.04, steps=5, n_targets=3)),
    'fab_t_l2': ('fab_t', dict(eps=0.5, steps=5, n_targets=3, norm='l2')),
    'square_linf': ('square_linf', dict(eps=0.04, queries=30)),
    'square_l2': ('square_l2', dict(eps=0.5, queries=30)),
    'autoattack_linf': ('autoattack', dict(eps=0.04, steps=3, n_targets=2, queries=20)),
    'autoattack_l2': ('autoattack', dict(eps=0.5, steps=3, n_targets=2, queries=20, norm='l2')),
}


@pytest.mark.parametrize('case', sorted(SPECS))
def test_outputs_stay_in_the_eps_ball_and_pixel_range(case, trained):
  fn, _, x, y, _, _ = trained
  # Saturated pixels at 0 and 1, where a missing clip shows.
  x = x.at[:, 0].set(0.0).at[:, 1].set(1.0)
  name, params = SPECS[case]
  spec = attacks.parse_attack(name, **params)
  assert spec.norm == case.rsplit('_', 1)[1] == attacks.norm_of(str(spec))
  x_adv = np.asarray(spec.compile()(fn, x, y, KEY))
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32
  assert np.all(np.isfinite(x_adv)) and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  d = dist(spec.norm, x_adv, x)
  assert d.max() <= params['eps'] * (1 + 1e-5) + 1e-6, d.max()
  assert fooled(fn, x_adv, y).mean() > 0.0, 'the attack changed nothing'


def test_apgd_t_at_least_as_strong_as_apgd_ce_and_scale_invariant(trained):
  fn, params, x, y, _, _ = trained
  eps = 0.04
  # steps * targets > MAX_UNROLL: the target loop is a rolled while loop (one compiled run).
  ce = jax.jit(functools.partial(apgd.apgd_linf, eps=eps, steps=20))
  t = jax.jit(functools.partial(apgd.apgd_t_linf, eps=eps, steps=20))
  s_ce, s_t = fooled(fn, ce(fn, x, y, KEY), y), fooled(fn, t(fn, x, y, KEY), y)
  assert 0.3 < s_ce.mean() < 1.0, s_ce.mean()   # partial success: there is something to gain
  assert s_t.mean() >= s_ce.mean() - 1 / len(y), (s_t.mean(), s_ce.mean())
  # Logits x 1e4: the softmax saturates in float32, CE's gradient is exactly 0 and APGD-CE is
  # stuck at its random start; the DLR loss is invariant to the scale, so APGD-T is unaffected.
  big = Partial(linear_apply, jax.tree.map(lambda a: a * 1e4, params))
  s_ce_big, s_t_big = fooled(big, ce(big, x, y, KEY), y), fooled(big, t(big, x, y, KEY), y)
  assert s_ce_big.mean() <= 0.1, s_ce_big.mean()
  assert s_t_big.mean() >= s_t.mean() - 1 / len(y), (s_t_big.mean(), s_t.mean())


def test_square_finds_most_of_what_pgd_finds(trained):
  fn, _, x, y, _, _ = trained
  found = {}
  for norm, pgd, sq, eps in (('linf', pgd_linf, square.square_linf, 0.03),
                             ('l2', pgd_l2, square.square_l2, 0.25)):
    s_pgd = fooled(fn, jax.jit(functools.partial(pgd, eps=eps, steps=20))(fn, x, y, KEY), y)
    x_sq = jax.jit(functools.partial(sq, eps=eps, queries=300))(fn, x, y, KEY)
    found[norm] = x_sq, fooled(fn, x_sq, y).mean(), s_pgd.mean()
    assert 0.3 < s_pgd.mean() < 1.0, (norm, s_pgd.mean())
  # Without a single gradient, 300 queries find most of what 20 PGD steps find.
  assert all(s_sq >= 0.8 * s_pgd for _, s_sq, s_pgd in found.values()), found
  # L∞ Square searches the vertices of the box: every pixel is at x ± eps, or clipped to [0, 1].
  x_sq = np.asarray(found['linf'][0])
  moved = np.abs(x_sq - np.asarray(x))
  assert np.all((np.abs(moved - 0.03) < 1e-5) | np.isin(x_sq, (0.0, 1.0)))
  # L2 Square keeps its perturbation on the eps-sphere, up to the clip to [0, 1].
  assert np.all(dist('l2', found['l2'][0], x) <= 0.25 * (1 + 1e-5))


def test_autoattack_is_the_per_image_worst_case_over_its_members(trained):
  fn, _, x, y, x_bad, y_bad = trained
  x = jnp.concatenate([x, x_bad])
  y = jnp.concatenate([y, y_bad])
  eps, steps, queries = 0.03, 12, 100   # 12 steps x 9 targets: rolled target loops
  x_aa = jax.jit(functools.partial(autoattack, eps=eps, steps=steps, queries=queries))(
      fn, x, y, KEY)
  # The members on their own, with the keys autoattack gives them (fold_in(key, m)).
  keys = [jax.random.fold_in(KEY, m) for m in range(4)]
  members = {
      'apgd_ce': functools.partial(apgd.apgd_linf, eps=eps, steps=steps),
      'apgd_t': functools.partial(apgd.apgd_t_linf, eps=eps, steps=steps),
      'fab_t': functools.partial(fab.fab_t, eps=eps, steps=steps),
      'square': functools.partial(square.square_linf, eps=eps, queries=queries),
  }
  robust = {name: ~fooled(fn, jax.jit(a)(fn, x, y, k), y)
            for (name, a), k in zip(members.items(), keys)}
  robust_aa = ~fooled(fn, x_aa, y)
  assert 0.0 < robust_aa.mean(), 'eps too large for a meaningful check'
  assert robust_aa.mean() <= min(r.mean() for r in robust.values()), (robust_aa.mean(), {
      k: r.mean() for k, r in robust.items()})
  # Per image: robust under AutoAttack iff robust under every member (one image of slack for
  # float differences between the separately compiled programs).
  assert np.sum(robust_aa != np.logical_and.reduce(list(robust.values()))) <= 1
  # The members disagree here, so the ensemble really takes a union.
  assert robust_aa.mean() < max(r.mean() for r in robust.values())
  assert dist('linf', x_aa, x).max() <= eps + 1e-6
  # Misclassified images are returned unchanged.
  np.testing.assert_array_equal(np.asarray(x_aa[-len(y_bad):]), np.asarray(x_bad))


def test_autoattack_on_the_host_equals_one_program_and_skips_members(trained, monkeypatch):
  """Called as compile_attack returns it, AutoAttack runs its members as separate programs and
  skips the rest once every image is fooled; the result equals the one-program (traced) form."""
  from unmask_jax.attacks import autoattack as aa_mod
  fn, _, x, y, x_bad, y_bad = trained
  x, y = jnp.concatenate([x[:12], x_bad]), jnp.concatenate([y[:12], y_bad])
  spec = attacks.parse_attack('autoattack(eps=0.03, steps=4, queries=20)')
  host = spec.compile()
  assert attacks.compiles_itself(spec.fn) and not hasattr(host, 'lower')   # not one jit
  calls = []
  # Members are called as jitted programs (`_jitted`) or, for the APGD and FAB members, which
  # drive their own runs from the host, directly (`_inline`).
  for name in ('_jitted', '_inline'):
    real = getattr(aa_mod, name)
    monkeypatch.setattr(aa_mod, name, lambda f, *a, real=real, **k: calls.append(f.__name__)
                        or real(f, *a, **k))
  np.testing.assert_allclose(np.asarray(host(fn, x, y, KEY)),
                             np.asarray(jax.jit(spec.partial())(fn, x, y, KEY)), atol=1e-6)
  assert [c for c in calls if c != '_merge'][:4] == ['_misclassified', 'apgd_linf', '_apgd_t', '_fab_t'], calls
  # At a large eps APGD-CE fools every image: the other members are not run at all.
  calls.clear()
  big = attacks.parse_attack('autoattack(eps=0.5, steps=4, queries=20)').compile()
  out = big(fn, x, y, KEY)
  assert fooled(fn, out, y).all()
  assert calls == ['_misclassified', 'apgd_linf', '_merge'], calls


def test_same_key_same_output_and_loop_forms_agree(trained):
  fn, _, x, y, _, _ = trained
  x, y = x[:8], y[:8]
  # eps is traced: one compilation per program serves a small eps (some images stay robust, so
  # every run or query is made) and a large one (all are fooled early, and rolled loops stop).
  cases = ((functools.partial(apgd.apgd_t_linf, steps=3, n_targets=3), (0.04, 0.2)),
           (functools.partial(fab.fab_t, norm='l2', steps=3, n_targets=3), (0.05, 2.0)),
           (functools.partial(square.square_l2, queries=6), (0.3, 3.0)))
  for attack, eps_values in cases:
    name = attack.func.__name__
    first = jax.jit(attack)
    # A separately compiled program, with the runs (APGD-T, FAB-T) or the queries (Square) in
    # the other loop form: rolled loops stop once every image is fooled, unrolled ones run to the
    # end, and the result must not depend on it.
    with common.loop_form('unrolled' if name.startswith('square') else 'fori'):
      second = jax.jit(functools.partial(attack))
      second(fn, x, y, KEY, eps=jnp.float32(eps_values[0]))   # traced in the context
    n_fooled = []
    for eps in eps_values:
      a1 = first(fn, x, y, KEY, eps=jnp.float32(eps))
      a2 = second(fn, x, y, KEY, eps=jnp.float32(eps))
      np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), atol=1e-6, err_msg=name)
      n_fooled.append(fooled(fn, a1, y).sum())
    assert n_fooled[0] < len(y) == n_fooled[1], (name, n_fooled)
    if name != 'fab_t':   # FAB-T is deterministic: no random start
      b = first(fn, x, y, jax.random.key(7, impl='rbg'), eps=jnp.float32(eps_values[0]))
      assert not np.allclose(np.asarray(a1), np.asarray(b)), name


def test_hyperplane_projection_is_exact():
  """The minimal-norm step onto {w·d = c} inside the box, against bisection on the KKT form."""
  rng = np.random.default_rng(0)
  n, d = 24, 20
  p = rng.uniform(size=(n, d)).astype(np.float32)
  w = rng.standard_normal((n, d)).astype(np.float32)
  w[:4, :8] = 0.0                                   # zero weights: those pixels never move
  c = (rng.standard_normal(n) * rng.choice([0.1, 1.0, 30.0], n)).astype(np.float32)
  c[0] = 0.0
  for norm in ('linf', 'l2'):
    got = np.asarray(jax.jit(fab.project_hyperplane_box, static_argnums=0)(norm, p, w, c))
    for i in range(n):
      u = np.sign(c[i]) * np.sign(w[i])
      room = np.where(u > 0, 1 - p[i], np.where(u < 0, p[i], 0)).astype(np.float64)
      aw = np.abs(w[i]).astype(np.float64)
      scale = np.ones(d) if norm == 'linf' else aw
      reach = lambda lam: np.sum(aw * np.minimum(lam * scale, room))
      lo, hi = 0.0, 1e6
      for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reach(mid) < abs(c[i]) else (lo, mid)
      want = u * np.minimum(hi * scale, room)      # all the way to the faces if unreachable
      np.testing.assert_allclose(got[i], want, atol=2e-5, err_msg=f'{norm} row {i}')
      assert np.all(p[i] + got[i] >= -1e-6) and np.all(p[i] + got[i] <= 1 + 1e-6)


def test_fab_finds_a_near_minimal_perturbation_of_a_linear_model(trained):
  fn, params, x, y, _, _ = trained
  w, b = (np.asarray(v, np.float64) for v in params)
  z = np.asarray(x, np.float64).reshape(len(x), -1) @ w + b
  t = np.argsort(-np.where(np.eye(C, dtype=bool)[np.asarray(y)], -np.inf, z), -1)[:, 0]
  yy = np.asarray(y)
  # Exact L2 distances to the y|t facet and to the nearest facet of any class (the box is not
  # active for these data).
  def facet(i, k):
    return (z[i, yy[i]] - z[i, k]) / np.linalg.norm(w[:, yy[i]] - w[:, k])

  d_t = np.array([facet(i, t[i]) for i in range(len(yy))])
  d_min = np.array([min(facet(i, k) for k in range(C) if k != yy[i]) for i in range(len(yy))])
  run = jax.jit(functools.partial(fab._fab_run, norm='l2', steps=20, alpha_max=0.1, eta=1.05,
                                  beta=0.9))
  adv, d_fab = run(fn, x, y, jnp.asarray(t, jnp.int32))
  assert fooled(fn, adv, y).all()
  d_fab = np.asarray(d_fab)
  np.testing.assert_allclose(d_fab, dist('l2', adv, x), rtol=1e-5)
  assert np.all(d_fab >= d_min * (1 - 1e-4))   # nothing beats the exact minimum...
  assert np.all(d_fab <= d_t * 1.02), np.max(d_fab / d_t)   # ...and FAB gets close to the facet


def test_specs_norms_and_bad_params():
  assert attacks.norm_of('autoattack(eps=8/255, norm="l2")') == 'l2'
  assert attacks.norm_of('autoattack(eps=8/255)') == attacks.norm_of('autoattack') == 'linf'
  assert attacks.norm_of('fab_t(eps=0.5, norm="l2")') == 'l2'
  assert attacks.norm_of('apgd_t_l2') == 'l2' and attacks.norm_of('square_linf') == 'linf'
  spec = attacks.parse_attack('autoattack(eps=8/255, norm="linf", queries=1000)')
  assert spec.eps == 8 / 255 and spec.norm == 'linf' and spec.fn is autoattack
  # eps is checked in the norm the spec names: 0.5 is a fine L2 radius, not an L∞ one.
  attacks.parse_attack('autoattack(eps=0.5, norm="l2")')
  with pytest.raises(ValueError, match=r'8/255'):
    attacks.parse_attack('autoattack(eps=8, norm="linf")')
  with pytest.raises(ValueError, match=r'norm must be one of'):
    attacks.parse_attack('autoattack(eps=0.1, norm="l1")')
  with pytest.raises(ValueError, match=r'norm must be one of'):
    attacks.parse_attack('fab_t(eps=0.1, norm="Linf")')
  with pytest.raises(ValueError, match=r'n_targets must be >= 1'):
    attacks.parse_attack('apgd_t_linf(eps=0.1, n_targets=0)')
  with pytest.raises(ValueError, match=r'queries must be >= 1'):
    attacks.parse_attack('square_linf(eps=0.1, queries=0)')
  with pytest.raises(ValueError, match=r'steps must be an integer'):
    attacks.parse_attack('fab_t(eps=0.1, steps=2.5)')
  with pytest.raises(TypeError, match=r'needs parameter.*eps'):
    attacks.parse_attack('square_l2(queries=10)')
  # Checked when traced (before any compilation).
  fn = Partial(linear_apply, (jnp.zeros((D, C)), jnp.zeros((C,))))
  x, y = jnp.full((2,) + SHAPE, 0.5), jnp.zeros((2,), jnp.int32)
  bad_at_trace = [
      (functools.partial(autoattack, eps=0.1, version='plus'), fn, r'version must be one of'),
      (functools.partial(fab.fab_t, eps=0.1, beta=1.5), fn, r'beta must be < 1'),
      (functools.partial(square.square_linf, eps=0.1, p_init=2.0), fn, r'p_init'),
      (functools.partial(square.square_l2, eps=9.0), fn, r'diameter'),   # sqrt(64) = 8
      (functools.partial(apgd.apgd_t_linf, eps=0.1),
       Partial(linear_apply, (jnp.zeros((D, 2)), jnp.zeros((2,)))), r'at least 3 classes'),
  ]
  for attack, model, msg in bad_at_trace:
    with pytest.raises(ValueError, match=msg):
      jax.jit(attack)(model, x, y, KEY)
