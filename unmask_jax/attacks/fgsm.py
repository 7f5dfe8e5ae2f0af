"""Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy 2015): one signed gradient step, L∞.

Pure, batched and jit-able; bind the hyper-parameters with `functools.partial` and jit once at the
call site:

  attack = jax.jit(functools.partial(fgsm, eps=8/255))
  x_adv = attack(logits_fn, x, y, key)   # logits_fn: a jax.tree_util.Partial over the weights
"""
from __future__ import annotations

from unmask_jax.attacks import common
from unmask_jax.attacks.common import Array, LogitsFn


@common.threat_model('linf')
def fgsm(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
         targeted: bool = False, loss: str = 'ce') -> Array:
  """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015), L∞.

  x' = clip_[0,1](x + eps * sign(∇_x L(f(x), y)))        (untargeted)
  x' = clip_[0,1](x - eps * sign(∇_x L(f(x), t)))        (targeted, y = t)

  Args:
    logits_fn: x -> logits [N, K].
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N] (targets if `targeted`).
    key: unused (FGSM is deterministic); kept for the common signature.
    eps: L∞ radius in [0, 1] pixel units (e.g. 8/255).
    targeted: move towards class y instead of away from it.
    loss: 'ce' (cross-entropy, the paper's) or 'margin'.

  Returns:
    x_adv [N, H, W, C] in [0, 1] with ||x_adv - x||_∞ <= eps.

  Example:
    >>> x_adv = jax.jit(functools.partial(fgsm, eps=8/255))(logits_fn, x, y, key)
  """
  del key
  common.check_batch(x, y)
  common.check_eps('linf', eps, x.shape[1:])
  _, g, _ = common.loss_and_grad(logits_fn, common.get_loss(loss), x, y, targeted)
  return common.project_linf(x + eps * common.steepest_step('linf', g), x, eps)
