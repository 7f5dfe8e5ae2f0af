"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), L∞ and L2: score-based.

A random search that uses only the model's logits, never its gradients, so gradient masking
(obfuscated gradients) does not stop it: AutoAttack's fourth member. Each query changes the
perturbation inside a random square window of the image and keeps the change if the margin
loss decreases. The window's area is a fraction p of the image, halved on a fixed schedule.

Query loops are long (AutoAttack: 5000), so they are rolled `lax.while_loop`s that stop once every
example is misclassified (`common.iterate_until`). The window side s_t varies over the loop, so
windows are masks (comparisons with a traced corner and side), not slices, and the L2 profile is
gathered from a static table of the few profiles the schedule uses: one compiled loop body.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.attacks import common
from unmask_jax.attacks.common import Array, LogitsFn

# The paper's schedule: p is halved after these iterations of a 10,000-query budget (other budgets
# are rescaled to it, as in the reference implementation).
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: int, queries: int, p_init: float) -> float:
  """p at iteration i of `queries`: p_init halved at each of _P_HALVINGS passed (rescaled)."""
  it = int(i / queries * 10000)
  return p_init / 2 ** sum(it > h for h in _P_HALVINGS)


def window_sides(norm: str, queries: int, p_init: float, h: int, w: int) -> list[int]:
  """The window side s per iteration: round(sqrt(p h w)), at least 1 (L∞) or 3 and odd (L2, whose
  windows hold a centred profile), at most min(h, w)."""
  sides = []
  for i in range(queries):
    s = int(round(math.sqrt(p_schedule(i, queries, p_init) * h * w)))
    if norm == 'linf':
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += 1 - s % 2
    sides.append(min(s, h, w))
  return sides


def _eta_rect(a: int, b: int) -> np.ndarray:
  """Rectangle [a, b] of nested rings with weight 1 / (ring + 1)^2 summed inwards, unit L2 norm."""
  delta = np.zeros((a, b))
  if a == 0 or b == 0:
    return delta
  c0, c1 = a // 2, b // 2
  for r in range(max(a // 2 + 1, b // 2 + 1)):
    delta[max(c0 - r, 0):min(c0 - r + 2 * r + 1, a), max(c1 - r, 0):min(c1 - r + 2 * r + 1, b)] += (
        1.0 / (r + 1) ** 2)
  return delta / np.sqrt(np.sum(delta ** 2))


def eta_profile(s: int) -> np.ndarray:
  """The L2 update's s x s profile (the paper's Fig. 2): two halves of opposite sign, each peaked
  at its centre, unit L2 norm. Centred mass keeps the new perturbation away from the window's
  edges, so that overlapping windows do not cancel."""
  delta = np.zeros((s, s))
  delta[:s // 2] = _eta_rect(s // 2, s)
  delta[s // 2:] = -_eta_rect(s - s // 2, s)
  return (delta / np.sqrt(np.sum(delta ** 2))).astype(np.float32)


def _margin_y(logits: Array, y: Array) -> Array:
  """z_y - max_{j != y} z_j (the loss the attack minimises; <= 0 once misclassified)."""
  return -common.margin(logits, y)


def _window(v_h: Array, v_w: Array, s: Array, h: int, w: int) -> Array:
  """Float mask [N, H, W, 1] of the s x s window at (v_h, v_w) per example (s may be traced)."""
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  m = ((rows >= v_h[:, None, None]) & (rows < v_h[:, None, None] + s)
       & (cols >= v_w[:, None, None]) & (cols < v_w[:, None, None] + s))
  return m[..., None].astype(jnp.float32)


def _corner(key: Array, n: int, s: Array, h: int, w: int) -> tuple[Array, Array]:
  """A uniformly random top-left corner per example among the windows that fit."""
  k_h, k_w = jax.random.split(key)
  return (jnp.floor(jax.random.uniform(k_h, (n,)) * (h - s + 1)).astype(jnp.int32),
          jnp.floor(jax.random.uniform(k_w, (n,)) * (w - s + 1)).astype(jnp.int32))


def _signs(key: Array, shape) -> Array:
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(jnp.float32)


def _init(norm, key, x, eps):
  """Initial perturbation on the sphere/box surface: vertical stripes of ±eps (L∞), or a grid of
  profile windows with random signs (L2), rescaled to norm eps."""
  n, h, w, c = x.shape
  if norm == 'linf':
    return common.clip_pixels(x + eps * _signs(key, (n, 1, w, c)))
  s = max(min(h, w) // 5, 1)
  n_h, n_w = h // s, w // s
  tile = np.zeros((h, w), np.float32)
  idx_h, idx_w = np.zeros(h, np.int32), np.zeros(w, np.int32)
  off_h, off_w = (h - s * n_h) // 2, (w - s * n_w) // 2
  eta = eta_profile(s)
  for a in range(n_h):
    idx_h[off_h + a * s: off_h + (a + 1) * s] = a
    for b in range(n_w):
      idx_w[off_w + b * s: off_w + (b + 1) * s] = b
      tile[off_h + a * s: off_h + (a + 1) * s, off_w + b * s: off_w + (b + 1) * s] = eta
  signs = _signs(key, (n, n_h, n_w, c))[:, idx_h][:, :, idx_w]   # [N, H, W, C], one per window
  delta = jnp.asarray(tile)[None, :, :, None] * signs
  return common.clip_pixels(x + common.normalize_l2(delta) * eps)


def _propose_linf(key, x, x_best, eps, s, profile):
  """Set a random window to x ± eps, one random sign per example and channel."""
  del profile
  n, h, w, c = x.shape
  k_pos, k_sign = jax.random.split(key)
  m = _window(*_corner(k_pos, n, s, h, w), s, h, w)
  x_new = x_best + m * 2.0 * eps * _signs(k_sign, (n, 1, 1, c))
  return common.project_linf(x_new, x, eps)


def _propose_l2(key, x, x_best, eps, s, profile):
  """The paper's L2 update: window 1 gets a fresh profile plus its old content, renormalised so
  that the perturbation's norm budget is kept; window 2's content is removed (its mass moves to
  window 1); the whole perturbation is rescaled to norm eps. `profile` is the s x s profile,
  zero-padded to the largest side."""
  n, h, w, c = x.shape
  k_1, k_2, k_sign, k_flip = jax.random.split(key, 4)
  v_h, v_w = _corner(k_1, n, s, h, w)
  m1 = _window(v_h, v_w, s, h, w)
  m2 = _window(*_corner(k_2, n, s, h, w), s, h, w)
  delta = x_best - x
  col = lambda v: v[:, None, None, None]
  win_norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))  # per channel
  norm_img = common.l2_norm(delta)
  norm_windows = common.l2_norm(delta * jnp.maximum(m1, m2))
  # The profile placed at the window (a gather, as s is traced), or its transpose, per example
  # (the reference flips one coin per batch).
  size = profile.shape[0]
  r = jnp.clip(jnp.arange(h)[None, :, None] - v_h[:, None, None], 0, size - 1)   # [N, H, 1]
  q = jnp.clip(jnp.arange(w)[None, None, :] - v_w[:, None, None], 0, size - 1)   # [N, 1, W]
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1))
  placed = jnp.where(flip, profile[q, r], profile[r, q])[..., None] * m1
  new = placed * _signs(k_sign, (n, 1, 1, c)) + delta * m1 / (1e-12 + win_norm(delta * m1))
  budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_img ** 2, 0.0) / c + norm_windows ** 2)
  new = new / (1e-12 + win_norm(new)) * col(budget)
  delta = delta * (1.0 - m2) * (1.0 - m1) + new * m1
  return common.clip_pixels(x + common.normalize_l2(delta) * eps)


def _square(logits_fn, x, y, key, *, norm, eps, queries, p_init, done=None):
  """Square Attack; `done` [N] marks examples fooled already (never queried: their result is
  the initial point and they count towards stopping the loop)."""
  common.check_batch(x, y)
  common.check_eps(norm, eps, x.shape[1:])
  common.check_steps(queries, 'queries')
  common.check_positive(p_init, 'p_init')
  if not isinstance(p_init, jax.core.Tracer) and p_init > 1:
    raise ValueError(f'p_init is a fraction of the image area, in (0, 1]; got {p_init}')
  key = jax.random.key(0) if key is None else key
  n, h, w, _ = x.shape
  propose = _propose_linf if norm == 'linf' else _propose_l2
  x_best = _init(norm, jax.random.fold_in(key, 0), x, eps)
  logits = logits_fn(x_best)
  fooled = jnp.argmax(logits, -1) != y
  if done is not None:
    fooled = fooled | done
  carry = (x_best, _margin_y(logits, y), fooled)

  sides_np = np.asarray(window_sides(norm, queries, p_init, h, w), np.int32)
  sides = jnp.asarray(sides_np)
  # The few distinct profiles (L2), zero-padded to the largest side, and each query's index.
  distinct = sorted(set(sides_np.tolist()))
  size = max(distinct)
  table = np.zeros((len(distinct), size, size), np.float32)
  for d, s in enumerate(distinct):
    if norm == 'l2':
      table[d, :s, :s] = eta_profile(s)
  table = jnp.asarray(table)
  which = jnp.asarray(np.searchsorted(distinct, sides_np).astype(np.int32))

  def body(i, c):
    x_best, m_best, fooled = c
    # Query i's randomness depends on i only: the result does not depend on whether the loop
    # stopped early, or on which other examples are in the batch.
    x_new = propose(jax.random.fold_in(key, i + 1), x, x_best, eps, sides[i], table[which[i]])
    logits = logits_fn(x_new)
    m_new = _margin_y(logits, y)
    fooled_new = jnp.argmax(logits, -1) != y
    # Fooled examples are frozen (the reference stops querying them); the others keep the
    # proposal if it lowers the margin or misclassifies.
    take = ~fooled & ((m_new < m_best) | fooled_new)
    return (jnp.where(take[:, None, None, None], x_new, x_best), jnp.where(take, m_new, m_best),
            fooled | (take & fooled_new))

  # Rolled even for short budgets (no unrolled prefix, one query per iteration), unless a loop
  # form is forced (`common.loop_form`). Unrolling pays on XLA:CPU for gradient steps; a query has
  # no gradient, and unrolled queries compile slowly (50 queries of a 2-layer MLP on 8x8x3 images,
  # XLA:CPU: 19.8 s to compile unrolled, 1.1 s rolled).
  carry = common.iterate_until(body, carry, queries, lambda c: jnp.all(c[2]), prefix=0, chunk=1)
  return carry[0]


@common.threat_model('linf')
def square_linf(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
                queries: int = 5000, p_init: float = 0.8) -> Array:
  """Square Attack, L∞ (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
  query-efficient black-box adversarial attack via random search", ECCV 2020).

  Minimises the margin L(x') = z_y(x') - max_{j != y} z_j(x') by random search. Start: vertical
  stripes x + eps ξ, ξ ∈ {-1, 1} per column and channel. At query t a window of side
  s_t = round(sqrt(p_t H W)) at a random position is set to x ± eps (one random sign per channel),
  and the proposal is kept if it lowers L. p_t = p_init halved after iterations 10, 50, 200, 500,
  1000, 2000, 4000, 6000 and 8000 of 10,000 (rescaled to `queries`). An example is frozen once
  misclassified. No gradients: a check against gradient masking.

  Simplifications: the original code resamples a window's signs while they would not change the
  image; here such a query is simply spent. Window positions are uniform over all positions.

  Args:
    logits_fn: x -> logits [N, C] (only its values are used).
    x: clean images [N, H, W, C] in [0, 1].
    y: true labels [N].
    key: the random search; iteration t uses fold_in(key, t + 1), the start fold_in(key, 0).
    eps: L∞ radius in [0, 1] units.
    queries: iterations, one model call each (plus one for the start); AutoAttack: 5000.
    p_init: initial fraction of the image area changed per query (AutoAttack: 0.8; the paper's
      untargeted L∞ experiments: 0.05).

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_∞ <= eps: per example the first misclassified point, else
    the lowest-margin one.

  Example:
    >>> attack = jax.jit(functools.partial(square_linf, eps=8/255, queries=5000))
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return _square(logits_fn, x, y, key, norm='linf', eps=eps, queries=queries, p_init=p_init)


@common.threat_model('l2')
def square_l2(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps: float,
              queries: int = 5000, p_init: float = 0.8) -> Array:
  """Square Attack, L2 (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

  As `square_linf` with the paper's L2 update: the start is a grid of profile windows (side
  min(H, W) // 5, the profile of `eta_profile`: two opposite-sign halves peaked at their centres)
  with random signs, rescaled to norm eps. At query t, with windows W1, W2 of side s_t (odd,
  >= 3) at random positions, δ the current perturbation, η the s x s profile (or its transpose)
  and ξ = ±1 at random, per channel

      v     = η ξ + δ_W1 / ||δ_W1||,
      δ_W1 <- v / ||v|| * sqrt(max(eps^2 - ||δ||^2, 0) / C + ||δ_{W1 ∪ W2}||^2),
      δ_W2 <- 0 (outside W1),   x' = clip_[0,1](x + eps δ / ||δ||_2),

  so the perturbation moves mass from W2 to W1 and stays on the eps-sphere (before the clip).

  Args:
    As `square_linf`; eps is the L2 radius in [0, 1] units. (The paper's L2 p_init: 0.1.)

  Returns:
    x_adv in [0, 1] with ||x_adv - x||_2 <= eps.

  Example:
    >>> attack = jax.jit(functools.partial(square_l2, eps=0.5, queries=5000))
    >>> x_adv = attack(logits_fn, x, y, jax.random.key(0))
  """
  return _square(logits_fn, x, y, key, norm='l2', eps=eps, queries=queries, p_init=p_init)
