"""Projected Gradient Descent (Madry et al. 2018), L∞ and L2, and the projected steepest-ascent
loop it shares with BIM (`attacks/bim.py`).

Pure, batched and jit-able; bind the hyper-parameters with `functools.partial` and jit once at the
call site:

  attack = jax.jit(functools.partial(pgd_linf, eps=8/255, steps=20))
  x_adv = attack(logits_fn, x, y, key)   # logits_fn: a jax.tree_util.Partial over the weights
"""
from __future__ import annotations

from typing import Callable

from unmask_jax.attacks import common
from unmask_jax.attacks.common import Array, LogitsFn


def projected_ascent(logits_fn, x, y, key, *, norm, eps, steps, step_size, random_start,
                     restarts, targeted, loss, objective=None, success=None):
  """The projected steepest-ascent loop behind BIM (`bim.bim`) and PGD (`pgd_linf`, `pgd_l2`).

  x_{t+1} = Π_{B_norm(x, eps) ∩ [0,1]}(x_t + alpha * steepest_step_norm(∇_x L)), from x
  (`random_start=False`: BIM) or a uniform point of the ball (PGD), keeping each example's best of
  `restarts` runs. Parameters are those of `pgd_linf`, with `norm` ('linf' or 'l2') and every
  default made explicit, so each attack states what it fixes.

  With an `objective` (x_adv, y, key) -> [N] the steps ascend it instead of the loss; with a
  `success` predicate too, every iterate is checked and each example keeps its best one
  (`common.Best`: successful first, then the highest objective), over steps and restarts.
  """
  common.check_batch(x, y)
  common.check_eps(norm, eps, x.shape[1:])
  common.check_steps(steps)
  alpha = common.default_step_size(eps, steps, step_size)
  loss_fn = common.get_loss(loss)
  hyper = dict(norm=norm, loss=loss, targeted=targeted)
  if common.on_host(logits_fn, x, y, key, eps, alpha, objective, success):
    # Called with arrays (not traced): up to HOST_CHUNK steps in all, one jitted program (this
    # function, traced); longer, each run's steps go from the host in programs of HOST_CHUNK
    # unrolled steps (common.host_loop): PGD-L∞-100 ran 1.8x slower per step unrolled as one
    # program than at 20 steps, and rolled above MAX_UNROLL ~3x slower. An objective goes from
    # the host too when it and the success predicate are pytrees (`common.is_program_argument`;
    # the adaptive attacks' form); other callables are compile-time constants of one program.
    partials = all(common.is_program_argument(f) for f in (objective, success))
    return common.run_from_host(projected_ascent, _projected_ascent_on_host, steps * restarts,
                                logits_fn, x, y, key,
                                one_program=objective is not None and not partials,
                                norm=norm, eps=eps, steps=steps, step_size=step_size,
                                random_start=random_start, restarts=restarts, targeted=targeted,
                                loss=loss, objective=objective, success=success)
  if objective is not None:
    return common.ascend_objective(objective, success, x, y, key, norm=norm, eps=eps, steps=steps,
                                   alpha=alpha, random_init=random_start, restarts=restarts)
  consts = (logits_fn, x, y, eps, alpha)

  def run(k):
    x0 = common.random_start(norm, k, x, eps) if random_start else x
    return common.iterate(lambda i, x_adv: _step(consts, i, x_adv, **hyper), x0, steps)

  return common.best_of_restarts(run, logits_fn, x, y, key, restarts, loss_fn, targeted)


def _projected_ascent_on_host(logits_fn, x, y, key, *, norm, eps, steps, step_size,
                              random_start, restarts, targeted, loss, objective, success):
  """`projected_ascent`'s restarts and steps from the host; the same steps as its traced form."""
  alpha = common.default_step_size(eps, steps, step_size)
  if objective is not None:
    return common.ascend_objective_on_host(objective, success, x, y, key, norm=norm, eps=eps,
                                           steps=steps, alpha=alpha, random_init=random_start,
                                           restarts=restarts)
  consts = (logits_fn, x, y, eps, alpha)

  def run(k):
    x0 = (common.call_on_host(common.random_start, norm=norm, key=k, x=x, eps=eps)
          if random_start else x)
    return common.host_loop(_step, consts, x0, steps, norm=norm, loss=loss, targeted=targeted)

  return common.best_of_restarts_on_host(run, logits_fn, x, y, key, restarts, loss, targeted)


def _step(consts, i, x_adv, *, norm, loss, targeted):
  """One projected steepest-ascent step of the loss."""
  del i
  logits_fn, x, y, eps, alpha = consts
  _, g, _ = common.loss_and_grad(logits_fn, common.get_loss(loss), x_adv, y, targeted)
  return common.project(norm, x_adv + alpha * common.steepest_step(norm, g), x, eps)


@common.threat_model('linf')
def pgd_linf(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
             steps: int = 20, step_size: float | None = None, random_start: bool = True,
             restarts: int = 1, targeted: bool = False, loss: str = 'ce',
             objective: Callable | None = None, success: Callable | None = None) -> Array:
  """Projected Gradient Descent, L∞ (Madry et al., ICLR 2018).

  x_0 ~ U(B_∞(x, eps) ∩ [0,1]);  x_{t+1} = Π_{B_∞(x,eps) ∩ [0,1]}(x_t + alpha sign(∇_x L)).
  With `restarts` > 1, each example keeps its strongest run: a successful one (misclassified, or
  classified as the target if `targeted`), else the one with the highest loss.

  Args:
    logits_fn, x, y: as in `fgsm` (attacks/fgsm.py).
    key: random start; restart r uses jax.random.fold_in(key, r).
    eps: L∞ radius in [0, 1] units (e.g. 8/255).
    steps: iterations per restart.
    step_size: alpha; default 2.5 * eps / steps.
    random_start: start uniformly in the ball (Madry) instead of at x.
    restarts: independent random starts; per-example best is kept.
    targeted: descend the loss of target class y instead of ascending that of true class y.
    loss: 'ce' or 'margin' (max_{i≠y} Z_i - Z_y).
    objective: optional per-example objective (x_adv, y, key) -> [N] to ascend instead of the
      loss (any differentiable function, e.g. an attack on a defense, `attacks.adaptive`); pass
      it at call time (a `jax.tree_util.Partial`, so it is a jit argument). The loss, targeted and
      logits_fn are then unused. With the cross-entropy objective the iterates equal the default.
    success: optional (x_adv, y, key) -> bool [N]; with it each example returns its best iterate
      over all steps and restarts (successful first, then the highest objective), else the last.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_∞ <= eps.

  Example:
    >>> attack = jax.jit(functools.partial(pgd_linf, eps=8/255, steps=20))
    >>> x_adv = attack(jax.tree_util.Partial(apply_fn, params), x, y, jax.random.key(0))
  """
  return projected_ascent(logits_fn, x, y, key, norm='linf', eps=eps, steps=steps,
                          step_size=step_size, random_start=random_start, restarts=restarts,
                          targeted=targeted, loss=loss, objective=objective, success=success)


@common.threat_model('l2')
def pgd_l2(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
           steps: int = 20, step_size: float | None = None, random_start: bool = True,
           restarts: int = 1, targeted: bool = False, loss: str = 'ce',
           objective: Callable | None = None, success: Callable | None = None) -> Array:
  """Projected Gradient Descent, L2 (Madry et al., ICLR 2018).

  x_0 ~ U(B_2(x, eps)) clipped to [0,1];  x_{t+1} = Π_{B_2(x,eps)}(x_t + alpha g / ||g||_2),
  clipped to [0, 1], with g = ∇_x L and the norm taken per example, so each step has L2 length
  exactly alpha before projection (a batch-wide norm would shrink the steps of most examples).

  Args:
    As `pgd_linf`; eps is the L2 radius in [0, 1] units. For 150x150x3 images the UnMask paper used
    300/255 and 600/255; scale by sqrt(H*W*C / (150*150*3)) for other sizes.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_2 <= eps.

  Example:
    >>> attack = jax.jit(functools.partial(pgd_l2, eps=0.5, steps=20, restarts=2))
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return projected_ascent(logits_fn, x, y, key, norm='l2', eps=eps, steps=steps,
                          step_size=step_size, random_start=random_start, restarts=restarts,
                          targeted=targeted, loss=loss, objective=objective, success=success)


# Called with arrays, PGD (and BIM, which calls projected_ascent) jits its own programs (long runs
# go from the host): the attack runner and `compile_attack` call it as it is.
pgd_linf.compiles_itself = True
pgd_l2.compiles_itself = True
