"""DeepFool, L2 (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unmask_jax.attacks import common
from unmask_jax.attacks.common import Array, LogitsFn

# Added to the minimal step as in the reference code, so that the linearised boundary is crossed
# rather than landed on.
_STEP_SLACK = 1e-4


@common.threat_model('l2')
def deepfool(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float | None = None,
             steps: int = 50, overshoot: float = 0.02, candidates: int = 10) -> Array:
  """DeepFool L2 (Moosavi-Dezfooli et al., "DeepFool: a simple and accurate method to fool deep
  neural networks", CVPR 2016), a minimum-norm attack.

  At x_i, linearise the logit differences f_k = Z_k - Z_y, w_k = ∇Z_k - ∇Z_y over the candidate
  classes k ≠ y, step to the nearest linearised boundary
      l = argmin_k |f_k| / ||w_k||_2,   r_i = (|f_l| / ||w_l||_2 + 1e-4) * w_l / ||w_l||_2,
  accumulate r = Σ r_i and set x_{i+1} = clip_[0,1](x + (1 + overshoot) * r); stop (per example)
  as soon as the prediction differs from y, or after `steps` iterations. The loop ends once every
  example has stopped (an iteration later: the one that sees the last success), so a large
  `steps` costs nothing when the batch is fooled early. Called with arrays (as `compile_attack`
  returns it), each iteration is a jitted program called from the host, which checks after each
  whether every example has stopped (`common.host_loop`); traced inside a `jax.jit`, the loop is
  `common.iterate_until`'s, with the same result.

  The label moved away from is the given y (the true label), so that success means the same as
  for the other attacks; an example already misclassified is returned unchanged.

  Args:
    logits_fn: x -> logits [N, K].
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N].
    key: unused (deterministic); kept for the common signature.
    eps: optional L2 budget; None (default) = unbounded. If given, x_adv is projected onto the
      eps-ball around x.
    steps: maximum iterations (max_iter; reference: 50).
    overshoot: the paper's overshoot, 0.02.
    candidates: only y and the `candidates - 1` other classes with the highest clean logits are
      considered (reference: 10), which bounds the cost at `candidates` backward passes per step.

  Returns:
    x_adv [N, H, W, C] in [0, 1].

  Example:
    >>> attack = attacks.compile_attack('deepfool(steps=50)')
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  del key
  common.check_min_norm_args(x, y, eps, steps)
  common.check_positive(overshoot, 'overshoot', allow_zero=True)
  common.check_steps(candidates, 'candidates')

  if common.on_host(logits_fn, x, y, eps):
    # Called with arrays (not traced): the loop runs from the host in programs of
    # HOST_EXIT_CHUNK steps, checked after each, as the reference does (common.host_loop).
    logits_fn = common.as_partial(logits_fn)
    consts = common.call_on_host(_setup, logits_fn, x, y, candidates=candidates)
    carry = common.host_loop(_step, consts, _init(x), steps, chunk=common.HOST_EXIT_CHUNK,
                             done=_done, overshoot=overshoot)
    return common.call_on_host(_finish, x, carry, eps=eps, overshoot=overshoot)
  consts = _setup(logits_fn, x, y, candidates=candidates)
  # Once every example is frozen the remaining iterations change nothing, so the loop stops then,
  # as the reference implementation does, with the result of running every step
  # (`common.iterate_until`: the first steps unrolled, the rest a while loop checked per step).
  carry = common.iterate_until(
      lambda i, c: _step(consts, i, c, overshoot=overshoot), _init(x), steps,
      lambda c: _done(consts, c))
  return _finish(x, carry, eps=eps, overshoot=overshoot)


def _setup(logits_fn, x, y, *, candidates):
  """(logits_fn, x, y, the candidate classes [N, nc] (column 0 = y), the cotangents [nc-1, N, K]
  e_k - e_y of the competitors)."""
  logits0 = logits_fn(x)
  num_classes = logits0.shape[-1]
  nc = min(candidates, num_classes)
  if nc < 2:
    raise ValueError(f'DeepFool needs at least 2 candidate classes, got candidates={candidates} '
                     f'with {num_classes} classes')
  # Column 0 is y; the others are the strongest competitors at the clean point (fixed, as in the
  # reference implementation, so the candidate set does not change between iterations).
  others = jnp.where(jax.nn.one_hot(y, num_classes, dtype=bool), -jnp.inf, logits0)
  _, top = jax.lax.top_k(others, nc - 1)
  cls = jnp.concatenate([y[:, None], top], axis=1)  # [N, nc]
  # The cotangent e_k - e_y of each competitor k pulls back to w_k = ∇Z_k - ∇Z_y directly: one
  # backward pass per competitor (nc - 1), as the reference does, instead of one per class (nc).
  onehot = jax.nn.one_hot(cls.T, num_classes, dtype=logits0.dtype)  # [nc, N, K]
  cotangents = onehot[1:] - onehot[:1]  # [nc-1, N, K]
  return logits_fn, x, y, cls, cotangents


def _init(x):
  """(accumulated perturbation r, active [N]): every example active at the start."""
  return jnp.zeros_like(x), jnp.ones(x.shape[:1], bool)


def _step(consts, i, carry, *, overshoot):
  """One DeepFool iteration from x + (1 + overshoot) r (examples stopped earlier unchanged)."""
  del i
  logits_fn, x, y, cls, cotangents = consts
  r_tot, active = carry
  x_i = common.clip_pixels(x + (1.0 + overshoot) * r_tot)
  logits, vjp_fn = jax.vjp(logits_fn, x_i)
  # Freeze an example at its first success: DeepFool returns the first iterate past the boundary.
  active = active & ~common.is_success(logits, y)
  # w_k = ∇(Z_k - Z_y) per example for each competitor k; examples do not interact, so one VJP
  # per competitor gives every example's gradient. One backward pass after another rather than a
  # vmap over the cotangents: on XLA:CPU the vmapped (batched) backward pass was slower, the step
  # 40.1 -> 37.1 ms with 2 competitors and 166 -> 116 ms with 9 (CNN 16-32-64, batch 128, the
  # same result bit for bit; BENCHMARKS.md, record 7).
  w = jnp.stack([vjp_fn(ct)[0] for ct in cotangents])  # [nc-1, N, H, W, C]
  z = jnp.take_along_axis(logits, cls, axis=1)  # [N, nc]
  f = (z[:, 1:] - z[:, :1]).T  # [nc-1, N]
  w_norm = jax.vmap(common.l2_norm)(w)  # [nc-1, N]
  dist = jnp.abs(f) / jnp.maximum(w_norm, common.TINY)
  best = jnp.argmin(dist, axis=0)  # [N]
  w_l = jnp.take_along_axis(w, best[None, :, None, None, None], axis=0)[0]
  d_l = jnp.take_along_axis(dist, best[None, :], axis=0)[0]
  r_i = (d_l + _STEP_SLACK)[:, None, None, None] * common.normalize_l2(w_l)
  return r_tot + jnp.where(active[:, None, None, None], r_i, 0.0), active


def _done(consts, carry, **_):
  del consts
  return ~jnp.any(carry[1])


def _finish(x, carry, *, eps, overshoot):
  x_adv = common.clip_pixels(x + (1.0 + overshoot) * carry[0])
  if eps is not None:
    x_adv = common.project_l2(x_adv, x, eps)
  return x_adv


# Called with arrays, DeepFool jits its own programs (the loop runs from the host): the attack
# runner and `compile_attack` call it as it is instead of wrapping it in one `jax.jit`.
deepfool.compiles_itself = True
