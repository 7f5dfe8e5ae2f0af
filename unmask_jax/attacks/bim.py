"""Basic Iterative Method (Kurakin, Goodfellow & Bengio 2017): iterated FGSM from x, L∞.

BIM is PGD-L∞ without the random start and restarts, so it runs PGD's projected steepest-ascent
loop (`pgd.projected_ascent`) rather than a copy of it. Pure, batched and jit-able:

  attack = jax.jit(functools.partial(bim, eps=0.03, steps=10))
  x_adv = attack(logits_fn, x, y, key)   # key unused (no random start)
"""
from __future__ import annotations

from unmask_jax.attacks import common, pgd
from unmask_jax.attacks.common import Array, LogitsFn


@common.threat_model('linf')
def bim(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float, steps: int = 10,
        step_size: float | None = None, targeted: bool = False, loss: str = 'ce') -> Array:
  """Basic Iterative Method (Kurakin, Goodfellow & Bengio, ICLR 2017 workshop), L∞.

  x_0 = x;  x_{t+1} = Clip_{x,eps}( clip_[0,1]( x_t + alpha * sign(∇_x L(f(x_t), y)) ) ),
  i.e. iterated FGSM from the clean image, clipped to the eps-ball after every step (no random
  start; that is PGD).

  Args:
    logits_fn, x, y: as in `fgsm` (attacks/fgsm.py). key: unused (no random start); may be None.
    eps: L∞ radius in [0, 1] units.
    steps: number of iterations.
    step_size: alpha; default 2.5 * eps / steps (Kurakin used 1/255 with min(eps*255+4,
      1.25*eps*255) steps; the UnMask code used an unscaled 2.0, which saturates every step).
    targeted, loss: as in `fgsm`.

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_∞ <= eps.

  Example:
    >>> x_adv = jax.jit(functools.partial(bim, eps=0.03, steps=10))(logits_fn, x, y, key)
  """
  return pgd.projected_ascent(logits_fn, x, y, key, norm='linf', eps=eps, steps=steps,
                              step_size=step_size, random_start=False, restarts=1,
                              targeted=targeted, loss=loss)


# Called with arrays, BIM jits its own programs (pgd.projected_ascent: long runs go from the host).
bim.compiles_itself = True
