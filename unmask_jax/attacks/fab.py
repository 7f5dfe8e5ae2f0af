"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L∞ and L2.

FAB looks for the smallest perturbation that changes the class: at each step it linearises the
decision boundary between the true class y and a target t at the current iterate, and moves to a
convex combination of the projections of the iterate and of the original image onto that
hyperplane (the projections respect the [0, 1] box). Once it has crossed, it steps back towards x
by a factor beta and keeps the smallest adversarial found. It is AutoAttack's third member.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unmask_jax.attacks import common, targeting
from unmask_jax.attacks.common import Array, LogitsFn

def project_hyperplane_box(norm: str, p: Array, w: Array, c: Array) -> Array:
  """The minimal-norm d with w·d = c and p + d in [0, 1]^D, per row of p, w [N, D], c [N].

  Moving coordinate i in the direction u_i = sign(c) sign(w_i) until its box face (room r_i), the
  reachable |w·d| as a function of a scalar lambda >= 0 is

      L∞:  g(lambda) = sum_i |w_i| min(lambda, r_i)          (d_i = u_i min(lambda, r_i))
      L2:  g(lambda) = sum_i |w_i| min(lambda |w_i|, r_i)    (d_i = u_i min(lambda |w_i|, r_i),
                                                               the KKT form clip(lambda w, box)),

  continuous and non-decreasing, so the answer is the smallest lambda with g(lambda) >= |c|. It is
  found by bisection on the float32 bit patterns of lambda (monotone for lambda >= 0): 32 halvings
  of [0, max_i breakpoint] give the smallest such float exactly, whatever the scale. (The same
  lambda as sorting the breakpoints and solving on the right linear piece, which the reference
  does, but 13x faster on XLA:CPU: 3 ms vs 40 ms for 64 rows of 32x32x3, where argsort was the
  whole cost.) Where the hyperplane cannot be reached inside the box, every coordinate moves to
  its face (the closest point to it).
  """
  u = jnp.sign(c)[:, None] * jnp.sign(w)
  room = jnp.where(u > 0, 1.0 - p, jnp.where(u < 0, p, 0.0))
  aw = jnp.abs(w)
  if norm == 'linf':
    scale, brk = jnp.ones_like(aw), room
  else:  # coordinate i reaches its face at lambda = r_i / |w_i| (never, for a zero weight)
    scale, brk = aw, jnp.where(aw > 0, room / jnp.maximum(aw, common.TINY), 0.0)
  target = jnp.abs(c)

  def reach(lam):
    return jnp.sum(aw * jnp.minimum(lam[:, None] * scale, room), axis=-1)

  def halve(_, bounds):  # invariant: the answer's bits are in [lo, hi]
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = reach(jax.lax.bitcast_convert_type(mid, jnp.float32)) >= target
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  hi = jax.lax.bitcast_convert_type(jnp.max(brk, axis=-1), jnp.int32)
  # A rolled loop: 32 cheap element-wise passes, not attack steps (`common.iterate` is for those).
  _, hi = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(hi), hi))
  lam = jax.lax.bitcast_convert_type(hi, jnp.float32)
  return u * jnp.minimum(lam[:, None] * scale, room)


def _norm(norm: str, v: Array) -> Array:
  return common.linf_norm(v) if norm == 'linf' else common.l2_norm(v)


def _fab_init(consts):
  """A run's start (x^(0) = x, its flat form, the best norm so far): an example misclassified
  already is its own smallest adversarial (norm 0)."""
  logits_fn, x, y, _ = consts
  clean_adv = jnp.argmax(logits_fn(x), -1) != y
  return x, x.reshape(x.shape[0], -1), jnp.where(clean_adv, 0.0, jnp.inf).astype(jnp.float32)


def _fab_step(consts, i, c, *, norm, alpha_max, eta, beta):
  """One FAB step towards the targets t (`fab_t`'s update); c = (x^(i), smallest adversarial so
  far [N, D], its norm or inf)."""
  del i  # every step is the same
  logits_fn, x, y, t = consts
  x1, adv, dist = c
  n = x.shape[0]
  flat = lambda v: v.reshape(n, -1)
  x0 = flat(x)

  def diff(xx):  # f = z_t - z_y: the boundary between y and t is f = 0, f > 0 on t's side
    logits = logits_fn(xx).astype(jnp.float32)
    f = (jnp.take_along_axis(logits, t[:, None], -1) - jnp.take_along_axis(logits, y[:, None], -1))
    return jnp.sum(f), f[:, 0]

  (_, f), g = jax.value_and_grad(diff, has_aux=True)(x1)
  w = flat(g)
  x1f = flat(x1)
  # The linearised boundary {z : f + w·(z - x1) = 0}; project x1 and x onto it (inside the
  # box): w·d1 = -f and w·d2 = -f - w·(x - x1), written without forming w·x1 - f, which would
  # cancel in float32.
  c2 = -f - jnp.sum(w * (x0 - x1f), -1)
  d = project_hyperplane_box(norm, jnp.concatenate([x1f, x0]), jnp.concatenate([w, w]),
                             jnp.concatenate([-f, c2]))
  d1, d2 = d[:n], d[n:]
  a = jnp.maximum(_norm(norm, d), 1e-8)
  a1, a2 = a[:n], a[n:]
  # Biased towards x's projection (small perturbations), the more so the closer x is to the
  # boundary relative to x1; at most alpha_max. eta > 1 overshoots slightly, to cross it.
  alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
  x1f = jnp.clip((x1f + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
  is_adv = jnp.argmax(logits_fn(x1f.reshape(x.shape)), -1) != y
  dist_new = _norm(norm, x1f - x0)
  better = is_adv & (dist_new < dist)
  adv = jnp.where(better[:, None], x1f, adv)
  dist = jnp.where(better, dist_new, dist)
  # Past the boundary: step back towards x, to search for a closer crossing.
  x1f = jnp.where(is_adv[:, None], x0 + (x1f - x0) * beta, x1f)
  return x1f.reshape(x.shape), adv, dist


def _fab_run(logits_fn, x, y, t, *, norm, steps, alpha_max, eta, beta):
  """One FAB-T run towards targets t [N] from x: (smallest adversarial found or x, its norm or
  inf)."""
  consts = (logits_fn, x, y, t)
  hyper = dict(norm=norm, alpha_max=alpha_max, eta=eta, beta=beta)
  _, adv, dist = common.iterate(lambda i, c: _fab_step(consts, i, c, **hyper), _fab_init(consts),
                                steps)
  return adv.reshape(x.shape), dist


def _take_target(logits_fn, x, y, c, run, *, norm, eps):
  """Judges a run inside the eps-ball: its smallest adversarial projected onto the ball (a no-op
  when its norm is <= eps) must still be misclassified; the first target that succeeds is final.
  c = (x_out, success [N]); run = `_fab_step`'s carry at the run's end."""
  x_out, success = c
  _, adv, dist = run
  cand = common.project(norm, adv.reshape(x.shape), x, eps)
  ok = jnp.isfinite(dist) & (jnp.argmax(logits_fn(cand), -1) != y)
  take = ok & ~success
  return jnp.where(take[:, None, None, None], cand, x_out), success | ok


def _fab_t(logits_fn, x, y, key, *, norm, eps, steps, n_targets, alpha_max, eta, beta,
           done=None):
  """FAB-T; `done` [N] marks examples fooled already (e.g. by an earlier AutoAttack member)."""
  if norm not in common.NORMS:
    raise ValueError(f'fab_t: norm must be one of {common.NORMS}, got {norm!r}')
  common.check_batch(x, y)
  common.check_eps(norm, eps, x.shape[1:])
  common.check_steps(steps)
  common.check_positive(alpha_max, 'alpha_max')
  common.check_positive(eta, 'eta')
  common.check_positive(beta, 'beta')
  if not isinstance(beta, jax.core.Tracer) and beta >= 1:
    raise ValueError(f'fab_t: beta must be < 1 (it shrinks the perturbation), got {beta}')
  k = targeting.check_targets(n_targets, targeting.num_classes_of(logits_fn, x))
  n = x.shape[0]
  done = jnp.zeros((n,), bool) if done is None else done
  hyper = dict(norm=norm, alpha_max=alpha_max, eta=eta, beta=beta)
  if common.on_host(logits_fn, x, y, eps, done, alpha_max, eta, beta):
    # Called with arrays: each target's steps go from the host in `common.host_loop` chunks (at
    # 100 steps per target the one program's rolled loop ran 7x slower than at 20 steps), and the
    # remaining targets are skipped once every example is fooled. Hyper-parameters given as
    # arrays make it one program (they are compile-time constants of the host steps).
    numbers = all(isinstance(v, (int, float)) for v in (alpha_max, eta, beta))
    return common.run_from_host(_fab_t, _fab_t_on_host, k * steps, logits_fn, x, y, key,
                                one_program=not numbers, eps=eps, steps=steps, n_targets=k,
                                done=done, **hyper)
  del key  # no random restarts: deterministic (AutoAttack's standard FAB-T has one start)
  targets = targeting.top_targets(logits_fn(x), y, k)

  def body(j, c):
    run = _fab_init((logits_fn, x, y, targets[j]))
    run = common.iterate(lambda i, r: _fab_step((logits_fn, x, y, targets[j]), i, r, **hyper),
                         run, steps)
    return _take_target(logits_fn, x, y, c, run, norm=norm, eps=eps)

  x_out, _ = common.over_runs(body, (x, done), k, steps, lambda c: jnp.all(c[1]))
  return x_out


def _fab_t_on_host(logits_fn, x, y, key, *, norm, eps, steps, n_targets, alpha_max, eta, beta,
                   done):
  """`_fab_t`'s target runs from the host: the same steps as its traced form, the remaining
  targets skipped once every example is fooled."""
  del key
  call = common.call_on_host
  targets = call(targeting.clean_targets, logits_fn, x, y, k=n_targets)   # [k, N]
  c = (x, done)
  for j in range(n_targets):
    if bool(jnp.all(c[1])):
      break
    consts = (logits_fn, x, y, targets[j])
    run = call(_fab_init, consts)
    run = common.host_loop(_fab_step, consts, run, steps, norm=norm, alpha_max=alpha_max,
                           eta=eta, beta=beta)
    c = call(_take_target, logits_fn, x, y, c, run, norm=norm, eps=eps)
  return c[0]


@common.threat_model(param='norm')
def fab_t(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
          norm: str = 'linf', steps: int = 100, n_targets: int = targeting.DEFAULT_TARGETS,
          alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9) -> Array:
  """Targeted FAB (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
  boundary attack", ICML 2020), as in AutoAttack's standard version (Croce & Hein 2020).

  For each of the k = min(n_targets, C - 1) classes t with the highest clean logits other than y,
  starting at x^(0) = x and with f = z_t - z_y, w = ∇f(x^(i)):

      d1 = proj(x^(i)), d2 = proj(x)   minimal-norm steps onto {z : f(x^(i)) + w·(z - x^(i)) = 0}
                                       inside [0, 1]^D (`project_hyperplane_box`),
      a  = min(||d1|| / (||d1|| + ||d2||), alpha_max),
      x^(i+1) = clip_[0,1]((1 - a)(x^(i) + eta d1) + a (x + eta d2)),
      and if x^(i+1) is misclassified (any class but y): record it if it is the smallest so far,
      then x^(i+1) <- x + beta (x^(i+1) - x).

  The smallest adversarial of a run is projected onto the eps-ball (a no-op when its norm is at
  most eps); each example keeps the first target whose projected adversarial is misclassified,
  else returns the clean image x.

  Simplifications (documented, not silent): no random restarts (AutoAttack's standard FAB-T uses
  one start, at x), so `key` is unused and the attack is deterministic; one boundary (the target)
  per step, as FAB-T; the result is the first success within eps over the targets, not the
  smallest over all of them (the reference's eps-bounded evaluation does the same); L1 is not
  implemented. One addition: where the smallest adversarial is larger than eps, its projection
  onto the ball still counts if it is misclassified (the reference counts only norms <= eps).

  Args:
    logits_fn: x -> logits [N, C].
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N].
    key: unused (deterministic); kept for the common signature.
    eps: radius in [0, 1] units in the norm `norm`.
    norm: 'linf' or 'l2'.
    steps: iterations per target (AutoAttack: 100).
    n_targets: number of target classes (AutoAttack: 9), capped at C - 1.
    alpha_max: the largest weight of x's projection (paper: 0.1).
    eta: overshoot of the projection steps (paper: 1.05).
    beta: backward step factor after crossing the boundary, < 1 (paper: 0.9).

  Returns:
    x_adv in [0, 1] inside the eps-ball; x itself where no adversarial within eps was found.

  Example:
    >>> attack = jax.jit(functools.partial(fab_t, eps=8/255, norm='linf'))
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return _fab_t(logits_fn, x, y, key, norm=norm, eps=eps, steps=steps, n_targets=n_targets,
                alpha_max=alpha_max, eta=eta, beta=beta)


fab_t.compiles_itself = True
