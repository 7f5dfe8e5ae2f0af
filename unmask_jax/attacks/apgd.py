"""Auto-PGD (Croce & Hein, ICML 2020), L∞ and L2: APGD-CE and the targeted APGD-T.

Both share one run (`apgd_run`: the momentum step and the step-size checkpoints of
`checkpoint_schedule`); they differ in the loss and in what is looped over: random restarts for
APGD-CE, target classes for APGD-T.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.attacks import common, targeting
from unmask_jax.attacks.common import Array, LogitsFn


def checkpoint_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Static step-size checkpoints of APGD: (is_checkpoint [steps] bool, window length [steps] int).

  Follows the reference implementation: the first window has max(int(0.22 * steps), 1) iterations,
  each next one is shorter by max(int(0.03 * steps), 1) down to max(int(0.06 * steps), 1) (the
  paper's p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)).
  """
  first = max(int(0.22 * steps), 1)
  shortest = max(int(0.06 * steps), 1)
  decrease = max(int(0.03 * steps), 1)
  is_check = np.zeros(steps, bool)
  window = np.zeros(steps, np.int32)
  k, count = first, 0
  for i in range(steps):
    count += 1
    if count == k:
      is_check[i], window[i] = True, k
      k, count = max(k - decrease, shortest), 0
  return is_check, window


def _check(norm, x, y, eps, steps, rho, momentum):
  common.check_batch(x, y)
  common.check_eps(norm, eps, x.shape[1:])
  common.check_steps(steps)
  common.check_positive(rho, 'rho')
  common.check_positive(momentum, 'momentum')


def _col(v: Array) -> Array:  # [N] -> broadcastable against images
  return v[:, None, None, None]


def apgd_run(logits_fn: LogitsFn, loss_fn, x: Array, y: Array, x0: Array, *, norm: str, eps,
             steps: int, rho: float, momentum: float) -> tuple[Array, Array, Array]:
  """One APGD run from x0 ascending `loss_fn(logits, y) -> [N]`, with APGD's step-size schedule.

  Shared by APGD-CE (`apgd_linf`/`apgd_l2`) and APGD-T (`apgd_t_linf`/`apgd_t_l2`, whose loss is
  the targeted DLR loss, a closure over the target classes). Success is misclassification
  (prediction != y) for both, as in the reference implementation: the target only shapes the loss.
  This is the form traced inside one program (`common.iterate`); `_apgd` drives the same steps
  (`_run_init`, `_run_step`, `_run_result`) from the host when called with arrays.

  Returns:
    (x_out, success [N], best loss [N]): per example the last misclassified iterate if one was
    found, else the iterate with the highest loss (whose loss is `best loss`).
  """
  consts = _run_consts(logits_fn, loss_fn, x, y, eps, steps=steps)
  init = _run_init(consts, x0)
  c = common.iterate(
      lambda i, c: _run_step(consts, i, c, norm=norm, rho=rho, momentum=momentum), init, steps)
  return _run_result(c)


def _run_consts(logits_fn, loss_fn, x, y, eps, *, steps):
  """What every step of a run needs: (logits_fn, loss_fn, x, y, eps, the checkpoint schedule).
  On the host both functions are `jax.tree_util.Partial`s (APGD-T's loss holds its targets)."""
  is_check, window = checkpoint_schedule(steps)
  return logits_fn, loss_fn, x, y, eps, jnp.asarray(is_check), jnp.asarray(window)


def _run_init(consts, x0):
  """The state of a run at x0, before its first step."""
  logits_fn, loss_fn, _, y, eps, _, _ = consts
  n = x0.shape[0]
  loss0, grad0, logits0 = common.loss_and_grad(logits_fn, loss_fn, x0, y)
  return dict(
      x=x0, x_old=x0, grad=grad0,
      # Initial step 2 * eps, as in the paper, for both norms.
      eta=jnp.full((n,), 2.0 * eps, jnp.float32),
      loss_prev=loss0, n_incr=jnp.zeros((n,), jnp.int32),
      x_best=x0, grad_best=grad0, loss_best=loss0,
      x_adv=x0, success=common.is_success(logits0, y),
      reduced_last=jnp.ones((n,), bool), loss_best_last=loss0,
  )


def _run_step(consts, i, c, *, norm, rho, momentum):
  """APGD iteration i of a run (i an int or traced: only used through jnp)."""
  logits_fn, loss_fn, x, y, eps, is_check, window = consts
  col = _col
  # Momentum step: z = P(x_k + eta s(∇)),
  # x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})), with a = 1 at the first step.
  a = jnp.where(jnp.asarray(i) == 0, 1.0, momentum)
  z = common.project(norm, c['x'] + col(c['eta']) * common.steepest_step(norm, c['grad']), x, eps)
  x_new = common.project(
      norm, c['x'] + a * (z - c['x']) + (1 - a) * (c['x'] - c['x_old']), x, eps)
  loss_new, grad_new, logits = common.loss_and_grad(logits_fn, loss_fn, x_new, y)

  succ = common.is_success(logits, y)
  x_adv = jnp.where(col(succ), x_new, c['x_adv'])
  n_incr = c['n_incr'] + (loss_new > c['loss_prev']).astype(jnp.int32)
  improved = loss_new > c['loss_best']
  x_best = jnp.where(col(improved), x_new, c['x_best'])
  grad_best = jnp.where(col(improved), grad_new, c['grad_best'])
  loss_best = jnp.where(improved, loss_new, c['loss_best'])

  # Checkpoint: halve eta and restart from the best point if the loss rose in at most a fraction
  # rho of the window's steps (oscillation), or if eta was not halved at the previous checkpoint
  # and the best loss has not improved since.
  check = is_check[i]
  oscillating = n_incr.astype(jnp.float32) <= window[i].astype(jnp.float32) * rho
  stalled = ~c['reduced_last'] & (c['loss_best_last'] >= loss_best)
  reduce = check & (oscillating | stalled)
  return dict(
      x=jnp.where(col(reduce), x_best, x_new),
      x_old=c['x'],
      grad=jnp.where(col(reduce), grad_best, grad_new),
      eta=jnp.where(reduce, c['eta'] / 2, c['eta']),
      loss_prev=loss_new,
      n_incr=jnp.where(check, 0, n_incr),
      x_best=x_best, grad_best=grad_best, loss_best=loss_best,
      x_adv=x_adv, success=c['success'] | succ,
      reduced_last=jnp.where(check, reduce, c['reduced_last']),
      loss_best_last=jnp.where(check, loss_best, c['loss_best_last']),
  )


def _run_result(c):
  # A misclassified iterate if one was found, else the highest-loss one.
  return jnp.where(_col(c['success']), c['x_adv'], c['x_best']), c['success'], c['loss_best']


def _run_on_host(consts, x0, *, steps, norm, rho, momentum):
  """`apgd_run` from the host: its init, steps in `common.host_loop` chunks, and result."""
  c = common.call_on_host(_run_init, consts, x0)
  c = common.host_loop(_run_step, consts, c, steps, norm=norm, rho=rho, momentum=momentum)
  return common.call_on_host(_run_result, c)


def _apgd(logits_fn, x, y, key, *, norm, eps, steps, restarts, rho, momentum, loss):
  _check(norm, x, y, eps, steps, rho, momentum)
  loss_fn = common.get_loss(loss)
  if common.on_host(logits_fn, x, y, key, eps):
    # Called with arrays (not traced): short attacks are one jitted program (this function,
    # traced); longer ones run each run's steps from the host in programs of HOST_CHUNK unrolled
    # steps (common.host_loop), so that they compile as fast as short ones and every step runs at
    # the unrolled speed (APGD-L∞-100: 33 s to compile as one program).
    return common.run_from_host(_apgd, _apgd_on_host, steps * restarts, logits_fn, x, y, key,
                                norm=norm, eps=eps, steps=steps, restarts=restarts, rho=rho,
                                momentum=momentum, loss=loss)

  def run(k):
    x0 = common.random_start(norm, k, x, eps)
    return apgd_run(logits_fn, loss_fn, x, y, x0, norm=norm, eps=eps, steps=steps, rho=rho,
                    momentum=momentum)[0]

  return common.best_of_restarts(run, logits_fn, x, y, key, restarts, loss_fn, False)


def _apgd_on_host(logits_fn, x, y, key, *, norm, eps, steps, restarts, rho, momentum, loss):
  """`_apgd`'s restarts and runs as host programs; the same steps as `apgd_run`."""
  key = jax.random.key(0) if key is None else key
  consts = common.call_on_host(_run_consts, logits_fn,
                               jax.tree_util.Partial(common.get_loss(loss)), x, y, eps,
                               steps=steps)

  def run(k):
    x0 = common.call_on_host(common.random_start, norm=norm, key=k, x=x, eps=eps)
    return _run_on_host(consts, x0, steps=steps, norm=norm, rho=rho, momentum=momentum)[0]

  return common.best_of_restarts_on_host(run, logits_fn, x, y, key, restarts, loss, False)


@common.threat_model('linf')
def apgd_linf(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
              steps: int = 100, restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
              loss: str = 'ce') -> Array:
  """APGD-CE, L∞ (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
  diverse parameter-free attacks", ICML 2020).

  PGD without a step-size parameter: eta_0 = 2 eps, momentum alpha = 0.75,
      z_{k+1} = P(x_k + eta_k sign(∇L(x_k))),
      x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1})),
  and at checkpoints w_j (windows of 22%, then shrinking by 3% down to 6% of the iterations) eta is
  halved and the iterate reset to the best point so far if (1) the loss increased in at most
  rho * (w_j - w_{j-1}) of the window's steps, or (2) eta was not reduced at the last checkpoint and
  the best loss did not improve since. Returns, per example, a misclassified iterate if any, else
  the one with the highest loss (best over `restarts` random starts).

  Args:
    logits_fn: x -> logits [N, K].
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N].
    key: random start; restart r uses jax.random.fold_in(key, r).
    eps: L∞ radius in [0, 1] units.
    steps: iterations (paper: 100).
    restarts: random restarts, per-example best kept.
    rho: oscillation threshold (paper: 0.75).
    momentum: alpha (paper: 0.75).
    loss: 'ce' (APGD-CE) or 'margin' (the CW loss).

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_∞ <= eps.

  Called with arrays (as `compile_attack` returns it), runs longer than `common.HOST_CHUNK`
  steps go from the host as jitted chunks of that many unrolled steps (`common.host_loop`; a
  100-step run compiled in 33 s as one program); traced inside a `jax.jit`, it is one program.

  Example:
    >>> attack = attacks.compile_attack('apgd_linf(eps=8/255, steps=100)')
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return _apgd(logits_fn, x, y, key, norm='linf', eps=eps, steps=steps, restarts=restarts,
               rho=rho, momentum=momentum, loss=loss)


@common.threat_model('l2')
def apgd_l2(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
            steps: int = 100, restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
            loss: str = 'ce') -> Array:
  """APGD-CE, L2 (Croce & Hein, ICML 2020).

  As `apgd_linf` with the L2 steepest step eta_k ∇L / ||∇L||_2 (per example) and P the
  projection onto the L2 eps-ball, then [0, 1].

  Args:
    As `apgd_linf`; eps is the L2 radius in [0, 1] units.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_2 <= eps.

  Example:
    >>> attack = attacks.compile_attack('apgd_l2(eps=0.5, steps=100)')
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return _apgd(logits_fn, x, y, key, norm='l2', eps=eps, steps=steps, restarts=restarts,
               rho=rho, momentum=momentum, loss=loss)


# ----------------------------------------------------------------------------------------------
# APGD-T: targeted DLR loss, one run per target class.
# ----------------------------------------------------------------------------------------------
def dlr_targeted(logits: Array, y: Array, t: Array) -> Array:
  """Targeted DLR loss (Croce & Hein 2020), to maximise; shape [N].

  DLR_t(x, y) = -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2 + 1e-12),  π sorting z decreasingly.

  The denominator makes the loss invariant to shifting and rescaling the logits, so a model with
  huge or tiny logits (saturated softmax, where CE's gradient vanishes) gets the same steps. With
  fewer than 4 classes, π4 (and π3) fall back to the smallest logit (the reference needs C >= 4).
  """
  z = logits.astype(jnp.float32)
  num_classes = z.shape[-1]
  zs = -jnp.sort(-z, axis=-1)
  z3, z4 = zs[:, min(2, num_classes - 1)], zs[:, min(3, num_classes - 1)]
  z_y = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (zs[:, 0] - 0.5 * (z3 + z4) + 1e-12)


def _apgd_t(logits_fn, x, y, key, *, norm, eps, steps, n_targets, restarts, rho, momentum,
            done=None):
  """APGD-T; `done` [N] marks examples fooled already (e.g. by an earlier AutoAttack member):
  they count as successes, so the target loop can stop once every other example is fooled."""
  _check(norm, x, y, eps, steps, rho, momentum)
  common.check_steps(restarts, 'restarts')
  num_classes = targeting.num_classes_of(logits_fn, x)
  if num_classes < 3:
    raise ValueError(f'APGD-T needs at least 3 classes, the model has {num_classes}: with 2 the '
                     'only target is the other class and the targeted DLR loss is constant (±1); '
                     'use apgd_linf/apgd_l2')
  k = targeting.check_targets(n_targets, num_classes)
  n = x.shape[0]
  done = jnp.zeros((n,), bool) if done is None else done
  if common.on_host(logits_fn, x, y, key, eps, done):
    # Called with arrays: the runs go from the host (each in `common.host_loop` chunks), and the
    # remaining runs are skipped on the host once every example is fooled, as the reference does.
    return common.run_from_host(_apgd_t, _apgd_t_on_host, k * restarts * steps, logits_fn, x, y,
                                key, norm=norm, eps=eps, steps=steps, n_targets=k,
                                restarts=restarts, rho=rho, momentum=momentum, done=done)
  targets = targeting.top_targets(logits_fn(x), y, k)  # [k, N], from the clean logits

  def body(j, best):
    # Run j: target j // restarts (best first), restart j % restarts.
    i_t, r = j // restarts, j % restarts
    t = targets[i_t]
    k_run = jax.random.fold_in(jax.random.fold_in(key, i_t), r)
    x0 = common.random_start(norm, k_run, x, eps)
    x_out, succ, loss = apgd_run(logits_fn, lambda logits, yy: dlr_targeted(logits, yy, t), x,
                                 y, x0, norm=norm, eps=eps, steps=steps, rho=rho,
                                 momentum=momentum)
    return _take_run(best, x_out, succ, loss)

  best = _best_t(x, done)
  best = common.over_runs(body, best, k * restarts, steps, lambda b: jnp.all(b.success))
  return best.x


def _best_t(x, done):
  return common.Best(x, done, jnp.full(done.shape, -jnp.inf, jnp.float32))


def _take_run(best, x_out, succ, loss):
  """The first successful run is final (as in the reference, which attacks only the examples
  still robust); until then, the run with the highest targeted DLR loss is kept."""
  take = ~best.success & (succ | (loss > best.loss))
  return common.Best(jnp.where(_col(take), x_out, best.x), best.success | succ,
                     jnp.where(take, loss, best.loss))


def _dlr_loss(t, logits, y):
  return dlr_targeted(logits, y, t)


def _apgd_t_on_host(logits_fn, x, y, key, *, norm, eps, steps, n_targets, restarts, rho,
                    momentum, done):
  """`_apgd_t`'s runs from the host; the same runs as its traced form, skipped once all is done."""
  call = common.call_on_host
  k = n_targets
  targets = call(targeting.clean_targets, logits_fn, x, y, k=k)  # [k, N], from the clean logits
  best = call(_best_t, x, done)
  for j in range(k * restarts):
    if bool(jnp.all(best.success)):
      break
    i_t, r = j // restarts, j % restarts   # target i_t (best first), restart r
    k_run = jax.random.fold_in(jax.random.fold_in(key, i_t), r)
    x0 = call(common.random_start, norm=norm, key=k_run, x=x, eps=eps)
    consts = call(_run_consts, logits_fn, jax.tree_util.Partial(_dlr_loss, targets[i_t]), x, y,
                  eps, steps=steps)
    x_out, succ, loss = _run_on_host(consts, x0, steps=steps, norm=norm, rho=rho,
                                     momentum=momentum)
    best = call(_take_run, best, x_out, succ, loss)
  return best.x


@common.threat_model('linf')
def apgd_t_linf(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
                steps: int = 100, n_targets: int = targeting.DEFAULT_TARGETS, restarts: int = 1,
                rho: float = 0.75, momentum: float = 0.75) -> Array:
  """APGD-T, L∞ (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
  diverse parameter-free attacks", ICML 2020): AutoAttack's second member.

  For each of the k = min(n_targets, C - 1) classes t with the highest clean logits other than y
  (best first), an APGD run (`apgd_linf`'s steps and step-size schedule) maximises the targeted
  DLR loss

      DLR_t(x, y) = -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2),   π sorting z decreasingly,

  from a random start in the ball. Success is misclassification (any class but y), as in the
  reference: the target only steers the loss. Each example keeps the iterate of its first
  successful run (runs after that cannot change it; once every example is fooled the remaining
  runs are skipped when the loop is rolled), else the iterate with the highest targeted DLR loss.

  Args:
    logits_fn: x -> logits [N, C], C >= 3.
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N].
    key: random starts; target i's restart r uses fold_in(fold_in(key, i), r).
    eps: L∞ radius in [0, 1] units.
    steps: iterations per run (paper: 100).
    n_targets: number of target classes (AutoAttack: 9), capped at C - 1.
    restarts: random starts per target class (AutoAttack standard: 1).
    rho, momentum: as in `apgd_linf`.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_∞ <= eps.

  Called with arrays (as `compile_attack` returns it), the runs go from the host (each in
  `common.host_loop` chunks) and the remaining ones are skipped once every example is fooled.

  Example:
    >>> attack = attacks.compile_attack('apgd_t_linf(eps=8/255, steps=100)')
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return _apgd_t(logits_fn, x, y, key, norm='linf', eps=eps, steps=steps, n_targets=n_targets,
                 restarts=restarts, rho=rho, momentum=momentum)


@common.threat_model('l2')
def apgd_t_l2(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
              steps: int = 100, n_targets: int = targeting.DEFAULT_TARGETS, restarts: int = 1,
              rho: float = 0.75, momentum: float = 0.75) -> Array:
  """APGD-T, L2 (Croce & Hein, ICML 2020).

  As `apgd_t_linf` with `apgd_l2`'s steps: eta_k ∇L / ||∇L||_2 per example and P the projection
  onto the L2 eps-ball, then [0, 1].

  Args:
    As `apgd_t_linf`; eps is the L2 radius in [0, 1] units.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_2 <= eps.

  Example:
    >>> attack = attacks.compile_attack('apgd_t_l2(eps=0.5, steps=100)')
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return _apgd_t(logits_fn, x, y, key, norm='l2', eps=eps, steps=steps, n_targets=n_targets,
                 restarts=restarts, rho=rho, momentum=momentum)


# Called with arrays, APGD-CE and APGD-T jit their own programs (their runs go from the host): the
# attack runner and `compile_attack` call them as they are instead of wrapping them in one jax.jit.
apgd_linf.compiles_itself = True
apgd_l2.compiles_itself = True
apgd_t_linf.compiles_itself = True
apgd_t_l2.compiles_itself = True
