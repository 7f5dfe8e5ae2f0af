"""The early exit of iterative attacks (common.loop_until / iterate_until / over_runs): loops stop
once every example is done, with the result of the full-length loop (`common.early_exit(False)`)."""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_attacks import D, KEY, SHAPE, linear_apply, make_data, mlp_apply, normal, train
from unmask_jax.attacks import common
from unmask_jax.attacks.cw import cw_l2
from unmask_jax.attacks.deepfool import deepfool
from unmask_jax.attacks.square import square_linf

Partial = jax.tree_util.Partial


class Calls:
  """Counts model calls that actually run (a host callback inside the compiled loop)."""

  def __init__(self):
    self.n = 0

  def __call__(self):
    self.n += 1

  def wrap(self, apply_fn, params):
    def counted(p, x):
      jax.debug.callback(self)
      return apply_fn(p, x)
    return Partial(counted, params)


def _expected_calls(n, prefix, chunk, k_done):
  """The calls `loop_until` makes when `done` holds after k_done calls (checked between chunks)."""
  count = min(prefix, n)
  full, rest = divmod(n - count, chunk)
  for _ in range(full):
    if count >= k_done:
      break
    count += chunk
  if rest and count < k_done:
    count += rest
  return count


@pytest.mark.parametrize('prefix,chunk', [(0, 1), (2, 1), (0, 3), (2, 3), (7, 4), (20, 1)])
def test_loop_until_stops_at_the_first_check_after_done(prefix, chunk):
  # (calls, value, sum of the indices seen): the value stops changing after 5 calls.
  body = lambda i, c: (c[0] + 1, c[1] + jnp.where(c[1] < 5, 1, 0), c[2] + i)
  init = (jnp.asarray(0), jnp.asarray(0), jnp.asarray(0))
  for n, k_done in ((12, 5), (13, 99)):  # done after 5 calls; never done (the full loop)
    run = jax.jit(lambda c, n=n, k=k_done: common.loop_until(
        body, c, n, lambda c: c[0] >= k, prefix=prefix, chunk=chunk))
    calls, value, index_sum = (int(v) for v in run(init))
    want = _expected_calls(n, prefix, chunk, k_done)
    assert calls == want and value == 5 and index_sum == want * (want - 1) // 2, (n, calls)


def test_iterate_until_policy():
  body = lambda i, c: (c[0] + 1, c[1] + jnp.where(c[1] < 3, 1, 0))
  done = lambda c: c[1] >= 3
  init = (jnp.asarray(0), jnp.asarray(0))

  def calls(steps=40, **kw):
    return int(jax.jit(lambda c: common.iterate_until(body, c, steps, done, **kw))(init)[0])

  # Default: EXIT_PREFIX unrolled steps, then EXIT_CHUNK per while-loop iteration.
  assert calls() == max(common.EXIT_PREFIX, 3)
  assert calls(prefix=0, chunk=1) == 3 and calls(prefix=1, chunk=4) == 5
  with common.early_exit(prefix=0, chunk=2):
    assert calls() == 4
  with common.early_exit(False):  # the same loop run to the end
    assert calls() == 40
  with common.loop_form('unrolled'):  # fully unrolled: no exit
    assert calls() == 40
  with common.loop_form('fori'):  # rolled forms: one step per iteration, no prefix
    assert calls() == 3
  # The prefix and chunk count against MAX_UNROLL when the loop is repeated (restarts, runs).
  with common._repeated(common.MAX_UNROLL // 2):
    assert calls(prefix=10, chunk=1) == 3
  with pytest.raises(ValueError, match='prefix'):
    with common.early_exit(prefix=-1):
      pass


@pytest.fixture(scope='module')
def mlp():
  """A random 3-class MLP and 8 images with their predicted labels."""
  params = ((normal(1, (D, 8)), jnp.zeros(8)), (normal(2, (8, 3)), jnp.zeros(3)))
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(8,) + SHAPE), jnp.float32)
  y = jnp.asarray(np.asarray(mlp_apply(params, x)).argmax(-1), jnp.int32)
  return params, x, y


def _run(attack, params, x, y, *contexts):
  """(x_adv, model calls run) of a freshly jitted attack traced inside the contexts."""
  calls = Calls()
  fn = calls.wrap(mlp_apply, params)
  with contextlib.ExitStack() as stack:
    for c in contexts:
      stack.enter_context(c)
    out = np.asarray(jax.jit(attack)(fn, x, y, KEY))
  return out, calls.n


@pytest.mark.parametrize('prefix,chunk', [(None, None), (0, 1), (1, 3)])
def test_deepfool_early_exit_equals_the_full_loop(mlp, prefix, chunk):
  params, x, y = mlp
  attack = functools.partial(deepfool, steps=30)
  shape = common.early_exit(prefix=prefix, chunk=chunk)
  fast, n_fast = _run(attack, params, x, y, shape)
  full, n_full = _run(attack, params, x, y, common.early_exit(prefix=prefix, chunk=chunk),
                      common.early_exit(False))
  again, _ = _run(attack, params, x, y, common.early_exit(prefix=prefix, chunk=chunk))
  assert np.mean(np.asarray(mlp_apply(params, fast)).argmax(-1) != np.asarray(y)) == 1.0
  np.testing.assert_array_equal(fast, full)   # bit for bit: the skipped steps were no-ops
  np.testing.assert_array_equal(fast, again)  # deterministic
  assert n_full == 1 + 30 and n_fast <= 1 + 12, (n_fast, n_full)  # all fooled within ~9 steps
  # And the same as every step unrolled (the pre-early-exit program), up to float rounding.
  unrolled, _ = _run(attack, params, x, y, common.loop_form('unrolled'))
  np.testing.assert_allclose(fast, unrolled, atol=1e-6)


def test_cw_abort_early_exit_equals_the_full_loop(mlp):
  params, x, y = mlp
  attack = functools.partial(cw_l2, steps=30, binary_search_steps=3, initial_const=10.0, lr=0.1,
                             abort_early=True)
  shape = common.early_exit(prefix=2, chunk=2)  # small, so that the while loop is exercised
  fast, n_fast = _run(attack, params, x, y, shape)
  full, n_full = _run(attack, params, x, y, common.early_exit(prefix=2, chunk=2),
                      common.early_exit(False))
  np.testing.assert_array_equal(fast, full)
  assert n_full == 3 * 30 and n_fast < 0.75 * n_full, (n_fast, n_full)
  assert np.mean(np.asarray(mlp_apply(params, fast)).argmax(-1) != np.asarray(y)) == 1.0
  # Without abort_early (the default) every step runs, in every loop form alike.
  plain = functools.partial(cw_l2, steps=6, binary_search_steps=3, initial_const=1.0)
  a, n_a = _run(plain, params, x, y)
  b, _ = _run(plain, params, x, y, common.loop_form('fori'))
  assert n_a == 3 * 6
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_cw_skips_rounds_only_once_the_search_is_at_a_fixed_point():
  """A round with the same c as the one before replays it: once no example's c moves, the rest of
  the rounds are skipped, with the same result. On a linear model the bisection of every example
  reaches that point in float32 after about 40 rounds."""
  x, y = make_data(0, 64)
  lin = train(linear_apply, (jnp.zeros((D, 3)), jnp.zeros((3,))), x, y, steps=400, lr=2.0)
  ok = np.asarray(jnp.argmax(linear_apply(lin, x), -1) == y)
  x, y = x[ok][:8], y[ok][:8]
  attack = functools.partial(cw_l2, steps=2, binary_search_steps=60, initial_const=1.0, lr=0.05)
  outs = {}
  for on in (True, False):
    calls = Calls()
    with common.early_exit(on):
      outs[on] = np.asarray(jax.jit(attack)(calls.wrap(linear_apply, lin), x, y, KEY))
    outs[on, 'rounds'] = calls.n // 2
  np.testing.assert_array_equal(outs[True], outs[False])
  assert outs[False, 'rounds'] == 60 and 20 < outs[True, 'rounds'] < 60, outs[True, 'rounds']


def test_square_early_exit_equals_the_full_loop(mlp):
  params, x, y = mlp
  attack = functools.partial(square_linf, eps=0.3, queries=60)
  fast, n_fast = _run(attack, params, x, y)
  full, n_full = _run(attack, params, x, y, common.early_exit(False))
  np.testing.assert_array_equal(fast, full)
  assert n_full == 61 and n_fast < n_full, (n_fast, n_full)
