"""AutoAttack, standard version (Croce & Hein, ICML 2020): APGD-CE -> APGD-T -> FAB-T -> Square.

Four diverse, parameter-free attacks run in sequence; an image counts as robust only if it is
classified correctly under every one of them, so the robust accuracy is the per-image worst case
over the ensemble. The reference implementation runs each attack on the images that are still
robust; shapes are static under jit, so here every member runs on the whole batch, with the images
fooled so far marked as done: their results are ignored, and the members' rolled loops (target
runs, Square's queries) stop once every image is fooled.

Called with concrete arrays (as `compile_attack` and the attack runner call it), each member is its
own jitted program and a member is skipped on the host once every image of the batch is fooled,
as the reference skips it. Skipping inside one program (a `lax.cond` around a member) was measured
on XLA:CPU to run the member ~3x slower whenever it does run (the SynthParts CNN, batch 128, 20
steps: APGD-T 1.3 -> 3.9 s, FAB-T 1.6 -> 4.3 s), like every rolled loop over conv gradients
there; on the host the skip is free. On the undefended M, which APGD-CE fools entirely, a batch
then costs 0.7 s instead of 3.0 s. Traced (inside a user's `jax.jit`), it is one program as before.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unmask_jax.attacks import apgd, common, fab, square, targeting
from unmask_jax.attacks.common import Array, LogitsFn

VERSIONS = ('standard',)
MEMBERS = ('apgd_ce', 'apgd_t', 'fab_t', 'square')


@common.threat_model(param='norm')
def autoattack(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
               norm: str = 'linf', version: str = 'standard', steps: int = 100,
               n_targets: int = targeting.DEFAULT_TARGETS, queries: int = 5000) -> Array:
  """AutoAttack, standard version (Croce & Hein, "Reliable evaluation of adversarial robustness
  with an ensemble of diverse parameter-free attacks", ICML 2020), L∞ or L2.

  Members, in order, with AutoAttack's standard settings:
    0. APGD-CE (`apgd_linf`/`apgd_l2`, one start, `steps` iterations),
    1. APGD-T (`apgd_t_linf`/`apgd_t_l2`, `n_targets` targets, one start each, `steps`),
    2. FAB-T (`fab_t`, `n_targets` targets, `steps`),
    3. Square (`square_linf`/`square_l2`, `queries` queries, p_init = 0.8).
  Member m uses the key fold_in(key, m), so on the images not fooled yet each member computes what
  the standalone attack computes with that key. Per image, the result is the first member's
  adversarial that is misclassified
  (all are inside the eps-ball and [0, 1]); images that every member leaves correctly classified,
  and images misclassified already, are returned unchanged (as the reference does).

  Differences from the reference: APGD-T is skipped for 2-class models (its targeted DLR loss is
  constant there; the reference needs C >= 4, here C >= 3 works, see `apgd.dlr_targeted`); the
  members' own simplifications are in their docstrings. Only version='standard' exists ('plus'
  and 'rand' are not implemented).

  Args:
    logits_fn: x -> logits [N, C].
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N].
    key: randomness of APGD's starts and Square's search.
    eps: radius in [0, 1] units, in the norm `norm`.
    norm: 'linf' or 'l2'.
    version: 'standard'.
    steps: iterations of the APGD runs and of FAB-T per target (standard: 100).
    n_targets: target classes of APGD-T and FAB-T (standard: 9), capped at C - 1.
    queries: Square's query budget (standard: 5000).

  Returns:
    x_adv [N, H, W, C] in [0, 1] inside the eps-ball: the robust accuracy under AutoAttack is
    mean(argmax logits_fn(x_adv) == y).

  Example:
    >>> attack = attacks.compile_attack('autoattack(eps=8/255, norm="linf")')
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  if norm not in common.NORMS:
    raise ValueError(f'autoattack: norm must be one of {common.NORMS}, got {norm!r}')
  if version not in VERSIONS:
    raise ValueError(f'autoattack: version must be one of {VERSIONS}, got {version!r} '
                     '(plus and rand are not implemented)')
  common.check_batch(x, y)
  common.check_eps(norm, eps, x.shape[1:])
  common.check_steps(steps)
  common.check_steps(queries, 'queries')
  num_classes = targeting.num_classes_of(logits_fn, x)
  targeting.check_targets(n_targets, num_classes)
  key = jax.random.key(0) if key is None else key
  keys = [jax.random.fold_in(key, m) for m in range(len(MEMBERS))]

  # Concrete inputs: members are separate jitted programs, skipped on the host once all is fooled.
  on_host = not any(isinstance(a, jax.core.Tracer) for a in (x, y, eps))
  call = _jitted if on_host else _inline

  fooled = call(_misclassified, logits_fn, x, y)   # misclassified already: returned as they are
  x_out = x

  def finished(fooled):
    return on_host and bool(jnp.all(fooled))

  apgd_ce = apgd.apgd_linf if norm == 'linf' else apgd.apgd_l2
  # The APGD and FAB members drive their own runs from the host when called with arrays (as here
  # on the host): long runs then compile as chunks of common.HOST_CHUNK steps, and APGD-T and
  # FAB-T skip targets once all is fooled.
  direct = _inline if on_host else call
  members = [lambda f: direct(apgd_ce, logits_fn, x, y, keys[0], eps=eps, steps=steps)]
  if num_classes >= 3:
    members.append(lambda f: direct(apgd._apgd_t, logits_fn, x, y, keys[1], eps=eps, done=f,
                                    norm=norm, steps=steps, n_targets=n_targets, restarts=1,
                                    rho=0.75, momentum=0.75))
  members.append(lambda f: direct(fab._fab_t, logits_fn, x, y, keys[2], eps=eps, done=f,
                                  norm=norm, steps=steps, n_targets=n_targets, alpha_max=0.1,
                                  eta=1.05, beta=0.9))
  members.append(lambda f: call(square._square, logits_fn, x, y, keys[3], eps=eps, done=f,
                                norm=norm, queries=queries, p_init=0.8))
  for member in members:
    if finished(fooled):
      break
    x_out, fooled = call(_merge, logits_fn, member(fooled), x_out, y, fooled)
  return x_out


def _misclassified(logits_fn, x, y):
  return jnp.argmax(logits_fn(x), -1) != y


def _merge(logits_fn, x_m, x_out, y, fooled):
  """Every member returns points in the ball; an image takes the first that is misclassified."""
  new = ~fooled & _misclassified(logits_fn, x_m, y)
  return jnp.where(new[:, None, None, None], x_m, x_out), fooled | new


# Keyword arguments that are arrays (eps, done) are traced; the others are compile-time constants.
_TRACED = ('eps', 'done')


def _inline(fn, *args, **kwargs):
  return fn(*args, **kwargs)


def _jitted(fn, *args, **kwargs):
  """fn(*args, **kwargs) as one jitted program per (member, static parameters), kept for reuse
  across batches, eps values and models of one architecture (weights are arguments)."""
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in _TRACED))
  traced = {k: v for k, v in kwargs.items() if k in _TRACED}
  return common.host_program(fn, static)(*args, **traced)


# `compile_attack` and the attack runner call this attack as it is (its members are jitted above)
# instead of wrapping the whole in one `jax.jit`.
autoattack.compiles_itself = True
