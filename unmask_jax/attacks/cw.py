"""Carlini & Wagner L2 attack (IEEE S&P 2017)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unmask_jax.attacks import common
from unmask_jax.attacks.common import Array, LogitsFn

# tanh-space needs arctanh of 2x - 1, which is infinite at pixels 0 and 1; shrinking by this factor
# keeps it finite (Carlini's code does the same with 0.999999).
_TANH_SHRINK = 1.0 - 1e-6
# "No upper bound found yet" for the binary search over c (Carlini's code uses 1e10 likewise).
_NO_UPPER = 1e10
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8


def cw_l2(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float | None = None,
          steps: int = 100, binary_search_steps: int = 9, initial_const: float = 1e-3,
          lr: float = 1e-2, kappa: float = 0.0, targeted: bool = False) -> Array:
  """Carlini-Wagner L2 (Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
  IEEE S&P 2017), a minimum-norm attack.

  Optimises w in tanh space, x' = (tanh(w) + 1) / 2 (so x' is always in [0, 1]), with Adam on
      ||x' - x||_2^2 + c * max(Z_y(x') - max_{i≠y} Z_i(x'), -kappa)        (untargeted)
      ||x' - x||_2^2 + c * max(max_{i≠t} Z_i(x') - Z_t(x'), -kappa)        (targeted, t = y)
  where Z are the logits. Each example has its own constant c, found by a binary search of
  `binary_search_steps` rounds (c *= 10 while no success has been found, then bisection; Adam and
  w are reset each round). The result is, per example, the smallest-L2 iterate that succeeded
  with margin kappa over all rounds; examples that never succeed are returned unchanged (x).

  Args:
    logits_fn: x -> logits [N, K].
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N] (targets if `targeted`).
    key: unused (deterministic); kept for the common signature.
    eps: optional L2 budget. None (default): unbounded, the natural mode of a minimum-norm attack.
      Otherwise x_adv is projected onto the eps-ball, so that it can be compared with PGD-L2 at the
      same budget (an example whose minimal perturbation is larger than eps then usually fails).
    steps: Adam iterations per binary-search round (the paper: up to 10,000 with early abort; 100
      here to keep evaluation affordable; raise it for a strong evaluation).
    binary_search_steps: rounds of the search over c (paper: 9).
    initial_const: first c (paper: 1e-3).
    lr: Adam learning rate (paper: 1e-2).
    kappa: confidence margin (paper's κ, default 0).
    targeted: make the prediction equal to y instead of different from it.

  Returns:
    x_adv [N, H, W, C] in [0, 1].

  Example:
    >>> attack = jax.jit(functools.partial(cw_l2, steps=100, binary_search_steps=5))
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  del key
  common.check_min_norm_args(x, y, eps, steps)
  common.check_steps(binary_search_steps, 'binary_search_steps')
  common.check_positive(initial_const, 'initial_const')
  common.check_positive(lr, 'lr')
  common.check_positive(kappa, 'kappa', allow_zero=True)
  n = x.shape[0]
  w0 = jnp.arctanh((2.0 * x - 1.0) * _TANH_SHRINK)

  def to_image(w):
    return (jnp.tanh(w) + 1.0) / 2.0

  def objective(w, c):
    x_adv = to_image(w)
    logits = logits_fn(x_adv)
    dist = jnp.sum(jnp.square(x_adv - x), axis=(1, 2, 3))
    # common.margin(logits, y) = max_{i≠y} Z_i - Z_y, i.e. minus the paper's untargeted f.
    m = common.margin(logits, y)
    f = jnp.maximum(m if targeted else -m, -kappa)
    return jnp.sum(dist + c * f), (x_adv, dist, m)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  # One flat loop of binary_search_steps * steps iterations rather than two nested ones, so that
  # common.iterate sees the true trip count when choosing between unrolling and a rolled loop.
  def body(i, carry):
    w, m1, m2, c, lower, upper, found, best_dist, best_x = carry
    t = jnp.mod(jnp.asarray(i, jnp.int32), steps)  # Adam step within the current round
    (_, (x_adv, dist, m)), g = grad_fn(w, c)
    # Carlini's success test with confidence: the margin must exceed kappa.
    succ = (-m if targeted else m) > kappa
    improved = succ & (dist < best_dist)
    best_dist = jnp.where(improved, dist, best_dist)
    best_x = jnp.where(improved[:, None, None, None], x_adv, best_x)
    found = found | succ

    # Adam on w (bias-corrected, as in Kingma & Ba); per-element, so examples stay independent.
    m1 = _ADAM_B1 * m1 + (1 - _ADAM_B1) * g
    m2 = _ADAM_B2 * m2 + (1 - _ADAM_B2) * jnp.square(g)
    tf = (t + 1).astype(jnp.float32)
    m1_hat = m1 / (1 - _ADAM_B1 ** tf)
    m2_hat = m2 / (1 - _ADAM_B2 ** tf)
    w_next = w - lr * m1_hat / (jnp.sqrt(m2_hat) + _ADAM_EPS)

    # End of a round: update the per-example search interval for c, and restart from x with a
    # fresh Adam state. The last iterate of a round is evaluated above but not stepped from.
    end = t == steps - 1
    new_upper = jnp.where(found, jnp.minimum(upper, c), upper)
    new_lower = jnp.where(found, lower, jnp.maximum(lower, c))
    bisect = (new_lower + new_upper) / 2
    new_c = jnp.where(new_upper < _NO_UPPER / 10, bisect, c * 10)
    c = jnp.where(end, new_c, c)
    upper = jnp.where(end, new_upper, upper)
    lower = jnp.where(end, new_lower, lower)
    found = jnp.where(end, False, found)
    w = jnp.where(end, w0, w_next)
    m1 = jnp.where(end, 0.0, m1)
    m2 = jnp.where(end, 0.0, m2)
    return w, m1, m2, c, lower, upper, found, best_dist, best_x

  zeros = jnp.zeros_like(x)
  carry = (w0, zeros, zeros, jnp.full((n,), initial_const, jnp.float32),
           jnp.zeros((n,), jnp.float32), jnp.full((n,), _NO_UPPER, jnp.float32),
           jnp.zeros((n,), bool), jnp.full((n,), jnp.inf, jnp.float32), x)
  carry = common.iterate(body, carry, binary_search_steps * steps)
  x_adv = carry[-1]
  if eps is not None:
    x_adv = common.project_l2(x_adv, x, eps)
  return x_adv
