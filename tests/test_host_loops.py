"""Host-driven loops (common.host_loop): attacks called with arrays run their loops as jitted
chunks of unrolled steps from Python, with the results of the one-program form (the same attack
inside `jax.jit`), programs of at most HOST_CHUNK steps, and early exits checked on the host."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_attacks import D, KEY, SHAPE, mlp_apply, normal
from unmask_jax import attacks
from unmask_jax.attacks import apgd, common, cw, deepfool, fab, mifgsm, pgd

Partial = jax.tree_util.Partial


@pytest.fixture(scope='module')
def mlp():
  """A random 3-class MLP and 8 images with their predicted labels."""
  params = ((normal(1, (D, 8)), jnp.zeros(8)), (normal(2, (8, 3)), jnp.zeros(3)))
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(8,) + SHAPE), jnp.float32)
  y = jnp.asarray(np.asarray(mlp_apply(params, x)).argmax(-1), jnp.int32)
  return Partial(mlp_apply, params), x, y


@pytest.fixture(autouse=True)
def fresh_programs():
  """Each test traces its own host programs (they are cached per process by function)."""
  common.host_program.cache_clear()
  yield
  common.host_program.cache_clear()


# A toy loop: (steps run, value that stops growing at 5, sum of the indices seen).
def _toy_step(consts, i, c, *, inc):
  del consts
  return c[0] + 1, c[1] + jnp.where(c[1] < 5, inc, 0), c[2] + i


def _toy_done(consts, c, **_):
  del consts
  return c[1] >= 5


_TOY0 = (jnp.asarray(0), jnp.asarray(0), jnp.asarray(0))


@pytest.mark.parametrize('chunk,first', [(1, None), (3, None), (4, 1), (20, None)])
def test_host_loop_runs_every_index_and_stops_after_the_first_done_chunk(chunk, first):
  full = common.host_loop(_toy_step, (), _TOY0, 13, chunk=chunk, first=first, inc=1)
  assert [int(v) for v in full] == [13, 5, 78]   # no done: every step, i = 0 .. 12 in order
  steps, value, index_sum = (int(v) for v in common.host_loop(
      _toy_step, (), _TOY0, 50, chunk=chunk, first=first, done=_toy_done, inc=1))
  sizes = ([first] if first else []) + [chunk] * 50
  ends = np.cumsum(sizes)
  want = int(ends[np.argmax(ends >= 5)])   # the end of the first chunk at or after step 5
  assert value == 5 and steps == want and index_sum == want * (want - 1) // 2, steps
  with pytest.raises(ValueError, match='chunk'):
    common.host_loop(_toy_step, (), _TOY0, 5, chunk=0, inc=1)


def _compare(attack, fn, x, y, atol):
  """The attack called with arrays (host-driven) against the same attack in one jax.jit."""
  host = np.asarray(attack(fn, x, y, KEY))
  one = np.asarray(jax.jit(attack)(fn, x, y, KEY))
  np.testing.assert_allclose(host, one, atol=atol)
  again = np.asarray(attack(fn, x, y, KEY))
  np.testing.assert_array_equal(host, again)   # deterministic
  return host


def test_deepfool_on_host_equals_one_program_and_stops_early(mlp, monkeypatch):
  fn, x, y = mlp
  runs = []
  step = deepfool._step

  def counted(consts, i, carry, **kw):   # counts the steps traced into host programs
    runs.append(i)
    return step(consts, i, carry, **kw)

  monkeypatch.setattr(deepfool, '_step', counted)
  attack = functools.partial(deepfool.deepfool, steps=30)
  np.asarray(attack(fn, x, y, KEY))
  # On the host: one program of HOST_EXIT_CHUNK = 1 step, traced once, called until done.
  assert len(runs) == common.HOST_EXIT_CHUNK == 1
  out = _compare(attack, fn, x, y, atol=1e-6)
  assert np.mean(np.asarray(mlp_apply(fn.args[0], out)).argmax(-1) != np.asarray(y)) == 1.0
  # A plain function (not a Partial) works too, as a static part of the programs.
  plain = lambda xx: mlp_apply(fn.args[0], xx)
  np.testing.assert_allclose(np.asarray(attack(plain, x, y, KEY)), out, atol=1e-6)


@pytest.mark.parametrize('abort_early', [False, True])
def test_cw_on_host_equals_one_program(mlp, monkeypatch, abort_early):
  fn, x, y = mlp
  monkeypatch.setattr(common, 'HOST_CHUNK', 4)   # several chunks and a remainder per round
  attack = functools.partial(cw.cw_l2, steps=10, binary_search_steps=3, initial_const=10.0,
                             lr=0.1, abort_early=abort_early)
  out = _compare(attack, fn, x, y, atol=1e-5)
  assert np.mean(np.asarray(mlp_apply(fn.args[0], out)).argmax(-1) != np.asarray(y)) > 0.5
  # A traced eps (the attack runner's form) is an argument of the host programs.
  bounded = functools.partial(cw.cw_l2, steps=10, binary_search_steps=3, initial_const=10.0)
  np.testing.assert_allclose(np.asarray(bounded(fn, x, y, KEY, eps=jnp.float32(0.3))),
                             np.asarray(common.project_l2(jnp.asarray(np.asarray(bounded(
                                 fn, x, y, KEY))), x, 0.3)), atol=1e-6)


@pytest.mark.parametrize('spec,module,step,runs', [
    ('apgd_linf(eps=0.1, steps=10)', apgd, '_run_step', 1),
    ('apgd_linf(eps=0.1, steps=10, restarts=2)', apgd, '_run_step', 2),
    ('apgd_l2(eps=0.5, steps=10)', apgd, '_run_step', 1),
    ('pgd_linf(eps=0.1, steps=10, restarts=2)', pgd, '_step', 2),
    ('pgd_l2(eps=0.5, steps=10)', pgd, '_step', 1),
    ('bim(eps=0.1, steps=10)', pgd, '_step', 1),
    ('mifgsm_linf(eps=0.1, steps=10)', mifgsm, '_step', 1),
    ('mifgsm_l2(eps=0.5, steps=10)', mifgsm, '_step', 1)])
def test_long_runs_on_host_equal_one_program_in_chunks(mlp, monkeypatch, spec, module, step, runs):
  fn, x, y = mlp
  monkeypatch.setattr(common, 'HOST_CHUNK', 4)
  traced = []
  real = getattr(module, step)

  def counted(consts, i, c, **kw):
    traced.append(i)
    return real(consts, i, c, **kw)

  monkeypatch.setattr(module, step, counted)
  attack = attacks.parse_attack(spec).partial()
  _compare(attack, fn, x, y, atol=1e-6)
  # The host programs hold at most HOST_CHUNK steps (4, 4, then 2; reused across restarts): two
  # programs traced, not one of 10 steps; the one jax.jit traced all 10 per restart (after them).
  host_traces = traced[:len(traced) - 10 * runs]
  assert len(host_traces) == 4 + 2, host_traces
  # Up to HOST_CHUNK steps in all, the attack is one program (its traced form, i Python ints).
  traced.clear()
  short = attacks.parse_attack(spec.replace('steps=10', 'steps=4').replace(
      ', restarts=2', '')).partial()
  np.testing.assert_array_equal(np.asarray(short(fn, x, y, KEY)),
                                np.asarray(jax.jit(short)(fn, x, y, KEY)))
  assert traced == [0, 1, 2, 3] * 2


@pytest.mark.parametrize('name,module,fn_name,step', [
    ('apgd_t_linf', apgd, '_apgd_t', '_run_step'), ('fab_t', fab, '_fab_t', '_fab_step')])
def test_target_runs_on_host_short_is_one_program_long_runs_in_chunks(mlp, monkeypatch, name,
                                                                      module, fn_name, step):
  """Every host-driven attack dispatches through common.run_from_host: APGD-T or FAB-T whose runs
  total at most HOST_CHUNK steps is one program (not executed op by op), longer each target's run
  goes from the host in chunks of at most HOST_CHUNK steps, with the one-program result."""
  fn, x, y = mlp
  monkeypatch.setattr(common, 'HOST_CHUNK', 4)
  calls, traced = [], []
  real_call, real_step = common.call_on_host, getattr(module, step)

  def recorded(f, *args, **kwargs):
    calls.append(f.__name__)
    return real_call(f, *args, **kwargs)

  def counted(consts, i, c, **kw):
    traced.append(i)
    return real_step(consts, i, c, **kw)

  monkeypatch.setattr(common, 'call_on_host', recorded)
  monkeypatch.setattr(module, step, counted)
  short = attacks.parse_attack(f'{name}(eps=0.1, steps=2, n_targets=2)').partial()
  np.testing.assert_array_equal(np.asarray(short(fn, x, y, KEY)),
                                np.asarray(jax.jit(short)(fn, x, y, KEY)))
  assert calls == [fn_name]
  calls.clear()
  traced.clear()
  long = attacks.parse_attack(f'{name}(eps=0.1, steps=6, n_targets=2)').partial()
  _compare(long, fn, x, y, atol=1e-6)
  assert fn_name not in calls and 'clean_targets' in calls, calls
  # Host programs of 4 and then 2 steps (reused by the second target), before the one jax.jit's
  # 2 x 6 traced steps.
  assert len(traced) == 4 + 2 + 2 * 6, traced


def test_pgd_with_an_objective_on_host_is_one_program(mlp):
  """An objective (the adaptive attacks' form) passed as a Partial is an argument of the one
  program, so a new objective over the same function does not recompile."""
  fn, x, y = mlp
  attack = attacks.compile_attack('pgd_linf(eps=0.1, steps=5)')
  ce = lambda f, xx, yy, kk: common.cross_entropy(f(xx), yy)
  got = attack(fn, x, y, KEY, objective=Partial(ce, fn))
  np.testing.assert_allclose(np.asarray(got), np.asarray(attack(fn, x, y, KEY)), atol=1e-6)
  assert common.host_program.cache_info().currsize == 2   # with and without the objective
  attack(fn, x, y, KEY, objective=Partial(ce, fn))
  assert common.host_program.cache_info().currsize == 2


def test_adaptive_on_host_equals_one_program_in_chunks_and_reuses_them(mlp, monkeypatch):
  """The adaptive attack called with arrays (as the evaluation calls it) ascends its objective
  from the host in chunks of at most HOST_CHUNK steps, with the one-program result (best over
  steps, restarts and the 2 targets of a 3-class model); a new target over a new state of the
  same defense reuses every program (the defense is a program argument)."""
  from tests.test_adaptive import _toy_defense
  from unmask_jax.attacks import adaptive
  from unmask_jax.defenses import base
  fn, x, y = mlp
  monkeypatch.setattr(common, 'HOST_CHUNK', 4)
  traced = []
  real = common._objective_step

  def counted(consts, i, c, **kw):
    traced.append(i)
    return real(consts, i, c, **kw)

  monkeypatch.setattr(common, '_objective_step', counted)
  d = _toy_defense()
  ctx = base.Context(logits_fn=fn, num_classes=3)

  def target(threshold):
    state = {**d.fit(ctx, None, None), 'threshold': np.float32(threshold),
             'score_scale': np.float32(0.01)}
    return adaptive.target_of(d, state, ctx)

  spec = attacks.parse_attack('adaptive(base="pgd_linf(eps=0.1, steps=10, restarts=2)")')
  assert attacks.compiles_itself(spec.fn)
  attack = spec.compile()
  eps = jnp.float32(0.1)   # traced, as the evaluation passes it
  host = np.asarray(attack(fn, x, y, KEY, target=target(0.01), eps=eps))
  one = np.asarray(jax.jit(spec.partial())(fn, x, y, KEY, target=target(0.01), eps=eps))
  np.testing.assert_allclose(host, one, atol=1e-6)
  assert np.abs(host - np.asarray(x)).max() <= 0.1 + 1e-6
  # Host programs of 4 and 2 steps (reused by the second restart), then the jit's 2 x 10 steps.
  assert len(traced) == 4 + 2 + 2 * 10, traced
  compiles = []
  listener = lambda name, secs, **_: compiles.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    again = np.asarray(attack(fn, x, y, KEY, target=target(0.02), eps=jnp.float32(0.05)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert '/jax/core/compile/backend_compile_duration' not in compiles, compiles
  assert np.abs(again - np.asarray(x)).max() <= 0.05 + 1e-6


def test_host_driven_attacks_are_not_wrapped_in_one_jit():
  for spec in ('deepfool', 'cw_l2', 'apgd_linf(eps=0.03)', 'apgd_l2(eps=0.5)',
               'apgd_t_linf(eps=0.03)', 'pgd_linf(eps=0.03)', 'pgd_l2(eps=0.5)', 'bim(eps=0.03)',
               'mifgsm_linf(eps=0.03)', 'mifgsm_l2(eps=0.5)', 'autoattack(eps=0.03)'):
    aspec = attacks.parse_attack(spec)
    assert attacks.compiles_itself(aspec.fn), spec
    assert not hasattr(aspec.compile(), 'lower'), spec   # not a jax.jit
  assert hasattr(attacks.compile_attack('fgsm(eps=0.03)'), 'lower')
  with common.host_loops(False):
    assert not common.on_host(jnp.zeros(2))
  assert common.on_host(jnp.zeros(2)) and not common.host_driven(common.HOST_CHUNK)
