"""Momentum Iterative FGSM (Dong et al., CVPR 2018), L∞ and L2."""
from __future__ import annotations

import jax.numpy as jnp

from unmask_jax.attacks import common
from unmask_jax.attacks.common import Array, LogitsFn


def _mifgsm(logits_fn, x, y, *, norm, eps, steps, step_size, decay, targeted, loss):
  common.check_batch(x, y)
  common.check_eps(norm, eps, x.shape[1:])
  common.check_steps(steps)
  common.check_positive(decay, 'decay', allow_zero=True)
  alpha = common.default_step_size(eps, steps, step_size)
  common.get_loss(loss)  # an unknown loss fails here, before anything runs
  hyper = dict(norm=norm, decay=decay, targeted=targeted, loss=loss)
  if common.on_host(logits_fn, x, y, eps, alpha):
    # Called with arrays: one jitted program up to HOST_CHUNK steps, else the steps go from the
    # host in programs of HOST_CHUNK unrolled steps (common.host_loop; see pgd.projected_ascent).
    return common.run_from_host(_mifgsm, _mifgsm_on_host, steps, logits_fn, x, y, norm=norm,
                                eps=eps, steps=steps, step_size=step_size, decay=decay,
                                targeted=targeted, loss=loss)
  consts = (logits_fn, x, y, eps, alpha)
  x_adv, _ = common.iterate(lambda i, c: _step(consts, i, c, **hyper), (x, jnp.zeros_like(x)),
                            steps)
  return x_adv


def _mifgsm_on_host(logits_fn, x, y, *, norm, eps, steps, step_size, decay, targeted, loss):
  """`_mifgsm`'s steps from the host (`common.host_loop`); the same steps as its traced form."""
  consts = (logits_fn, x, y, eps, common.default_step_size(eps, steps, step_size))
  return common.host_loop(_step, consts, (x, jnp.zeros_like(x)), steps, norm=norm, decay=decay,
                          targeted=targeted, loss=loss)[0]


def _step(consts, i, carry, *, norm, decay, targeted, loss):
  del i
  logits_fn, x, y, eps, alpha = consts
  x_adv, g = carry
  _, grad, _ = common.loss_and_grad(logits_fn, common.get_loss(loss), x_adv, y, targeted)
  # The L1 normalisation makes the gradients of different steps commensurate, so that the
  # accumulated direction is not dominated by whichever step had the largest gradient.
  g = decay * g + common.normalize_l1(grad)
  x_adv = common.project(norm, x_adv + alpha * common.steepest_step(norm, g), x, eps)
  return x_adv, g


@common.threat_model('linf')
def mifgsm_linf(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
                steps: int = 20, step_size: float | None = None, decay: float = 1.0,
                targeted: bool = False, loss: str = 'ce') -> Array:
  """Momentum Iterative FGSM, L∞ (Dong et al., "Boosting Adversarial Attacks with Momentum",
  CVPR 2018).

  g_0 = 0;  g_{t+1} = mu * g_t + ∇_x L(x_t, y) / ||∇_x L(x_t, y)||_1;
  x_{t+1} = Π_{B_∞(x,eps) ∩ [0,1]}( x_t + alpha * sign(g_{t+1}) ),  x_0 = x.

  Args:
    logits_fn: x -> logits [N, K].
    x: clean images [N, H, W, C] in [0, 1].
    y: labels [N] (targets if `targeted`).
    key: unused (deterministic); kept for the common signature.
    eps: L∞ radius in [0, 1] units.
    steps: iterations T.
    step_size: alpha; default 2.5 * eps / steps (the paper uses eps / T, which can only just reach
      the boundary; the UnMask code used an unscaled 2.0).
    decay: momentum mu (paper: 1.0).
    targeted: descend the loss of target class y.
    loss: 'ce' or 'margin'.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_∞ <= eps.

  Example:
    >>> attack = jax.jit(functools.partial(mifgsm_linf, eps=16/255, steps=20))
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  del key
  return _mifgsm(logits_fn, x, y, norm='linf', eps=eps, steps=steps, step_size=step_size,
                 decay=decay, targeted=targeted, loss=loss)


@common.threat_model('l2')
def mifgsm_l2(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
              steps: int = 20, step_size: float | None = None, decay: float = 1.0,
              targeted: bool = False, loss: str = 'ce') -> Array:
  """Momentum Iterative FGSM, L2 (Dong et al., CVPR 2018).

  g_{t+1} = mu * g_t + ∇_x L(x_t, y) / ||∇_x L(x_t, y)||_1;
  x_{t+1} = clip_[0,1]( Π_{B_2(x,eps)}( x_t + alpha * g_{t+1} / ||g_{t+1}||_2 ) ),  x_0 = x,
  with all norms per example.

  Args:
    As `mifgsm_linf`; eps is the L2 radius in [0, 1] units.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_2 <= eps.

  Example:
    >>> attack = jax.jit(functools.partial(mifgsm_l2, eps=1.0, steps=20))
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  del key
  return _mifgsm(logits_fn, x, y, norm='l2', eps=eps, steps=steps, step_size=step_size,
                 decay=decay, targeted=targeted, loss=loss)


# Called with arrays, MI-FGSM jits its own programs (long runs go from the host).
mifgsm_linf.compiles_itself = True
mifgsm_l2.compiles_itself = True
