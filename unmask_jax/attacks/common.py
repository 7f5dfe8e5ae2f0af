"""Helpers shared by every attack: losses, norms, projections, random starts, checks, the loop.

Conventions (all attacks):
  * `x` is float32 [N, H, W, C] with pixels in [0, 1]; `y` is int32 [N]; `key` is a new-style
    `jax.random.key`; `logits_fn(x) -> [N, num_classes]` (usually a `jax.tree_util.Partial` whose
    leaves are the model weights, so that the weights are jit arguments, not baked-in constants).
  * Norms, projections and losses are per example: the batch axis is never reduced, so an attack on
    a batch equals the attack on each example alone (as long as `logits_fn` has no batch coupling,
    e.g. BatchNorm in training mode).
  * `eps`, `steps` and the other hyper-parameters are static Python numbers, bound with
    `functools.partial` before `jax.jit`, so they can be checked at trace time. `eps` may instead
    be passed as a traced scalar (`attack(fn, x, y, key, eps=jnp.float32(e))` on a jitted attack)
    to sweep eps with one compilation; its range is then not checked.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LogitsFn = Callable[[Array], Array]

# Smallest norm we divide by. A zero gradient (saturated softmax, dead ReLUs) then yields a zero
# step instead of NaNs that would silently poison the whole batch.
TINY = 1e-12

NORMS = ('linf', 'l2')

# Default step size as a multiple of eps / steps (PGD, BIM, MI-FGSM). With 2.5 * eps / steps the
# iterates can travel 2.5 eps in total, enough to cross the ball from a random start and still
# correct course (the rule of thumb of the MadryLab `robustness` library). The original UnMask code
# used an unscaled step of 2.0 in [0, 1] units: every step leaves the ball and is projected back.
DEFAULT_REL_STEP = 2.5


# ----------------------------------------------------------------------------------------------
# Losses (per example, shape [N]).
# ----------------------------------------------------------------------------------------------
def cross_entropy(logits: Array, y: Array) -> Array:
  """Per-example softmax cross-entropy -log p_y(x); shape [N]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def margin(logits: Array, y: Array) -> Array:
  """Per-example margin max_{i != y} Z_i - Z_y (> 0 iff misclassified); shape [N].

  This is the negative of Carlini & Wagner's f(x') = Z_y - max_{i != y} Z_i.
  """
  logits = logits.astype(jnp.float32)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  other = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return jnp.max(other, axis=-1) - z_y


LOSSES = {'ce': cross_entropy, 'margin': margin}


def get_loss(name: str) -> Callable[[Array, Array], Array]:
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}; valid losses: {", ".join(sorted(LOSSES))}')
  return LOSSES[name]


def is_success(logits: Array, y: Array, targeted: bool = False) -> Array:
  """Bool [N]: untargeted -> prediction != y; targeted -> prediction == y (the target)."""
  pred = jnp.argmax(logits, axis=-1)
  return pred == y if targeted else pred != y


def loss_and_grad(logits_fn: LogitsFn, loss_fn: Callable, x: Array, y: Array,
                  targeted: bool = False) -> tuple[Array, Array, Array]:
  """Returns (per-example objective to maximise [N], its input gradient, logits).

  The objective is loss(x, y) untargeted and -loss(x, target) targeted, so every attack ascends.
  Summing over the batch gives per-example gradients because examples do not interact.
  """
  sign = -1.0 if targeted else 1.0

  def total(xx):
    logits = logits_fn(xx)
    per_ex = sign * loss_fn(logits, y)
    return jnp.sum(per_ex), (per_ex, logits)

  (_, (per_ex, logits)), g = jax.value_and_grad(total, has_aux=True)(x)
  return per_ex, g, logits


# ----------------------------------------------------------------------------------------------
# Norms, projections, clipping.
# ----------------------------------------------------------------------------------------------
def _bcast(v: Array, like: Array) -> Array:
  """Reshapes a per-example [N] vector to broadcast against [N, ...]."""
  return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim))


def l2_norm(v: Array) -> Array:
  """Per-example L2 norm over all non-batch axes; shape [N]."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))))


def l1_norm(v: Array) -> Array:
  """Per-example L1 norm over all non-batch axes; shape [N]."""
  return jnp.sum(jnp.abs(v), axis=tuple(range(1, v.ndim)))


def linf_norm(v: Array) -> Array:
  """Per-example L∞ norm over all non-batch axes; shape [N]."""
  return jnp.max(jnp.abs(v), axis=tuple(range(1, v.ndim)))


def normalize_l2(v: Array) -> Array:
  """v / ||v||_2 per example, safe at zero (a zero row stays zero)."""
  return v / _bcast(jnp.maximum(l2_norm(v), TINY), v)


def normalize_l1(v: Array) -> Array:
  """v / ||v||_1 per example, safe at zero."""
  return v / _bcast(jnp.maximum(l1_norm(v), TINY), v)


def clip_pixels(x: Array) -> Array:
  return jnp.clip(x, 0.0, 1.0)


def project_linf(x_adv: Array, x: Array, eps: float) -> Array:
  """Projects onto {x' : ||x' - x||_∞ <= eps} ∩ [0, 1]^d (exact: both sets are boxes)."""
  return clip_pixels(jnp.clip(x_adv, x - eps, x + eps))


def project_l2(x_adv: Array, x: Array, eps: float) -> Array:
  """Projects onto the L2 ball of radius eps around x, then clips to [0, 1].

  Clipping after the ball projection keeps the point in the ball, because x is in [0, 1]: clipping
  only moves a coordinate towards x's. (It is not the exact projection onto the intersection,
  which needs an iterative solver; every L2 attack library makes the same approximation.)
  """
  delta = x_adv - x
  norm = l2_norm(delta)
  scale = jnp.minimum(1.0, eps / jnp.maximum(norm, TINY))
  return clip_pixels(x + delta * _bcast(scale, delta))


def project(norm: str, x_adv: Array, x: Array, eps: float) -> Array:
  return project_linf(x_adv, x, eps) if norm == 'linf' else project_l2(x_adv, x, eps)


def steepest_step(norm: str, g: Array) -> Array:
  """Unit-norm steepest-ascent direction: sign(g) for L∞, g / ||g||_2 (per example) for L2."""
  return jnp.sign(g) if norm == 'linf' else normalize_l2(g)


def random_start(norm: str, key: Array, x: Array, eps: float) -> Array:
  """Uniform sample from the eps-ball around x, clipped to [0, 1].

  L∞: x + U(-eps, eps)^d. L2: a Gaussian direction with radius eps * u^(1/d), u ~ U(0, 1), which
  is uniform in the ball (in high dimension almost all the volume is near the sphere).
  """
  if norm == 'linf':
    delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  else:
    k_dir, k_rad = jax.random.split(key)
    d = math.prod(x.shape[1:])
    direction = normalize_l2(jax.random.normal(k_dir, x.shape, x.dtype))
    radius = eps * jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / d)
    delta = direction * _bcast(radius, x)
  return clip_pixels(x + delta)


# ----------------------------------------------------------------------------------------------
# Threat model: declared next to each attack function, read by `attacks.norm_of` and the checks.
# ----------------------------------------------------------------------------------------------
class ThreatModel(NamedTuple):
  """Where an attack's norm comes from: exactly one field is set (see `threat_model`)."""
  norm: str | None = None   # fixed: 'linf' or 'l2'
  param: str | None = None  # the value of this keyword parameter (its default when not given)
  base: str | None = None   # the norm of the attack spec in this parameter (composite attacks)


def threat_model(norm: str | None = None, *, param: str | None = None,
                 base: str | None = None) -> Callable[[Callable], Callable]:
  """Decorator declaring the norm an attack's eps is measured in; the function is returned
  unchanged, with a `threat_model` attribute (a `ThreatModel`) that `attacks.norm_of`,
  `AttackSpec.norm` and the eps checks read. Every registered attack needs one.

    @threat_model('linf')          # fixed norm
    @threat_model(param='norm')    # the attack's `norm` parameter (e.g. fab_t, autoattack)
    @threat_model(base='base')     # the norm of the attack spec in `base` (e.g. adaptive)
  """
  if sum(v is not None for v in (norm, param, base)) != 1:
    raise TypeError('threat_model: give exactly one of a norm, param= or base=')
  if norm is not None and norm not in NORMS:
    raise ValueError(f'threat_model: norm must be one of {", ".join(NORMS)}, got {norm!r}')
  declared = ThreatModel(norm, param, base)

  def mark(fn: Callable) -> Callable:
    fn.threat_model = declared
    return fn

  return mark


# ----------------------------------------------------------------------------------------------
# Parameter checks (trace-time / host-side; they raise clear errors instead of silently running
# an attack that is 255 times too strong or does nothing).
# ----------------------------------------------------------------------------------------------
def _is_static_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_eps(norm: str, eps: Any, image_shape: tuple[int, ...] | None = None) -> None:
  """Raises ValueError for an eps that cannot be meant for pixels in [0, 1].

  Args:
    norm: 'linf' or 'l2'.
    eps: the radius; traced values are not checked.
    image_shape: (H, W, C) of one image, for the L2 bound; None skips that bound.
  """
  if norm not in NORMS:
    raise ValueError(f'Unknown norm {norm!r}; valid norms: {", ".join(NORMS)}')
  if isinstance(eps, jax.core.Tracer) or eps is None:
    return
  if not _is_static_number(eps) and not (hasattr(eps, 'shape') and eps.shape == ()):
    raise ValueError(f'eps must be a number, got {eps!r}')
  eps = float(eps)
  if not math.isfinite(eps) or eps <= 0:
    raise ValueError(f'eps must be a positive finite number, got {eps}')
  if norm == 'linf' and eps > 1:
    raise ValueError(
        f'L∞ eps={eps:g} is larger than 1, but pixels are in [0, 1]: an eps given in 0-255 units '
        f'must be divided by 255 (e.g. eps={eps:g} -> eps={eps:g}/255 = {eps / 255:.5f}).')
  if norm == 'l2' and image_shape is not None:
    diameter = math.sqrt(math.prod(image_shape))
    if eps > diameter:
      raise ValueError(
          f'L2 eps={eps:g} is larger than the diameter sqrt(H*W*C)={diameter:.4g} of the image '
          f'cube [0,1]^{tuple(image_shape)}, so it constrains nothing: an eps given in 0-255 units '
          f'must be divided by 255 (e.g. eps={eps:g}/255 = {eps / 255:.5f}).')


def check_steps(steps: Any, name: str = 'steps') -> None:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
    raise ValueError(f'{name} must be an integer, got {steps!r}')
  if steps < 1:
    raise ValueError(f'{name} must be >= 1, got {steps}')


def check_positive(value: Any, name: str, allow_zero: bool = False) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  v = float(value)
  if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
    kind = 'non-negative' if allow_zero else 'positive'
    raise ValueError(f'{name} must be {kind}, got {value!r}')


def check_batch(x: Array, y: Array) -> None:
  """Shape checks at trace time (values are checked host-side by `validate_inputs`)."""
  if x.ndim != 4:
    raise ValueError(f'x must be [N, H, W, C], got shape {x.shape}')
  if y.ndim != 1 or y.shape[0] != x.shape[0]:
    raise ValueError(f'y must be [N] with N={x.shape[0]}, got shape {y.shape}')
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f'y must hold integer class indices, got dtype {y.dtype}')


def check_min_norm_args(x: Array, y: Array, eps: Any, steps: Any) -> None:
  """The checks shared by the minimum-norm L2 attacks (CW, DeepFool): eps is optional there."""
  check_batch(x, y)
  if eps is not None:
    check_eps('l2', eps, x.shape[1:])
  check_steps(steps)


def default_step_size(eps: float, steps: int, step_size: float | None) -> float:
  """`step_size` if given, else DEFAULT_REL_STEP * eps / steps (eps may be traced)."""
  if step_size is None:
    return DEFAULT_REL_STEP * eps / steps
  check_positive(step_size, 'step_size')
  return step_size


def validate_inputs(x: Any, y: Any, num_classes: int | None = None) -> None:
  """Host-side check of a batch before attacking it; raises ValueError with the first problem.

  Checks: x is [N, H, W, C], finite, inside [0, 1] (catches 0-255 images and mean/std-normalised
  ones); y is [N] integer with 0 <= y < num_classes.

  Example:
    >>> validate_inputs(np.zeros((2, 8, 8, 3), np.float32), np.array([0, 1]), num_classes=10)
  """
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim != 4:
    raise ValueError(f'x must be [N, H, W, C], got shape {x.shape}')
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'x must be floating point in [0, 1], got dtype {x.dtype} '
                     '(convert uint8 images with x.astype(np.float32) / 255)')
  n_bad = int(np.sum(~np.isfinite(x)))
  if n_bad:
    raise ValueError(f'x has {n_bad} NaN/inf pixel values')
  lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
  if lo < 0.0 or hi > 1.0:
    hint = (' It looks like 0-255 pixels: divide by 255.' if hi > 1.0 and hi <= 255.0 and lo >= 0
            else ' Is it mean/std-normalised? Attacks expect raw [0, 1] pixels and the model to '
                 'normalise inside logits_fn.')
    raise ValueError(f'x must lie in [0, 1], got values in [{lo:g}, {hi:g}].{hint}')
  if y.ndim != 1 or y.shape[0] != x.shape[0]:
    raise ValueError(f'y must be [N] with N={x.shape[0]}, got shape {y.shape}')
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'y must hold integer class indices, got dtype {y.dtype}')
  if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
    raise ValueError(f'labels must be in [0, {num_classes}), got values in [{y.min()}, {y.max()}]')


# ----------------------------------------------------------------------------------------------
# The one place that decides how a loop over attack steps is compiled.
# ----------------------------------------------------------------------------------------------
# Two cases. An attack called with arrays (as `compile_attack` and the attack runner call it) runs
# loops longer than HOST_CHUNK steps, and every loop with an early exit, from the host in jitted
# chunks (`host_loop`, `host_driven`, the section "Host-driven loops" below). Inside one program
# (an attack traced inside a user's `jax.jit`, adversarial training, adaptive attacks, and short
# loops), the rules that follow apply.
# Rolled loops (lax.scan / fori_loop) over conv input-gradients ran about 2x slower on XLA:CPU than
# the same steps unrolled, also with several steps per rolled iteration, so the slowdown is in how
# XLA:CPU runs conv gradients inside a while loop (BENCHMARKS.md, "Loop form of iterative attacks",
# `benchmarks/bench_loop_form.py`). Steps are therefore unrolled by default. Unrolling grows compile
# time linearly with the steps, so loops longer than MAX_UNROLL (CW's binary_search_steps * steps,
# long APGD runs) are rolled `lax.scan`s. To trade run time for compile time, trace the attack
# inside `with loop_form('fori'):`. Not measured on GPU/TPU.
#
# Why rolled loops are slow on XLA:CPU (found for the early exit, BENCHMARKS.md "Early exit"): the
# CPU compiler rewrites convolutions into its canonical NHWC/HWIO form only in the entry
# computation. The input gradient of a convolution uses the kernel with its I/O axes swapped;
# at the top level that becomes a transposed copy of the kernel and a fast library convolution,
# inside a while/cond body it stays an Eigen convolution on the swapped kernel, ~10x slower
# (SynthParts CNN: a PGD step 34 ms unrolled, 156-233 ms in a while loop). Writing the model's
# convolutions with a custom VJP whose input gradient is a canonical HWIO convolution (explicitly
# flipped, I/O-swapped kernel) made a while loop as fast as unrolled code in a 3-conv test
# network, with bitwise equal gradients; that is a change to the models, not made here.
#
# Early exit (`iterate_until`, `over_runs`): loops whose steps become no-ops once every example is
# done (DeepFool, CW with abort_early, Square, the target runs) run their first EXIT_PREFIX steps
# unrolled, then a while loop of EXIT_CHUNK steps per iteration that stops once done. Exits
# within the prefix (DeepFool typically: a few steps) run at unrolled speed; later steps run at
# the rolled speed above; compile time is that of prefix + chunk steps at any step count.
LOOP_FORMS = ('unrolled', 'scan_unrolled', 'scan', 'fori')
LOOP_FORM = 'unrolled'
MAX_UNROLL = 100  # APGD's default 100 steps still unroll; CW's 9 x 100 do not.
UNROLL_CHUNK = 1  # steps per rolled-loop iteration; larger chunks did not run faster (BENCHMARKS.md)
_loop_form_override: list[str] = []
# How many copies of the loop being traced end up in the program (restarts), so that the
# MAX_UNROLL limit applies to the program's total number of unrolled steps.
_copies: list[int] = [1]
# Early exit: steps unrolled before the first check of "every example done" (DeepFool-50, 128
# images, fooled after 5 steps: 1.2 s with 10, 1.6 s with 5, 4.4 s with 0, 5.8 s for the 50 steps
# unrolled), then steps per while-loop iteration between two checks (1: larger chunks ran no
# faster per step on XLA:CPU and exit later).
EXIT_PREFIX = 10
EXIT_CHUNK = 1
_early_exit: list[bool] = [True]
_exit_shape: list[tuple[int, int]] = []  # (prefix, chunk) set by `early_exit`


@contextlib.contextmanager
def loop_form(form: str) -> Iterator[None]:
  """Forces a loop form while tracing (benchmarks, tests). Applies to functions traced inside.

  JAX caches traces per function object, so jit a fresh one inside the context (a new
  `functools.partial`, as below): a function already traced outside keeps its cached form, and one
  first traced inside hands the forced form to every later `jax.jit` of the same object.

  Example:
    >>> with loop_form('fori'):
    ...   x_adv = jax.jit(functools.partial(pgd_linf, eps=8/255))(logits_fn, x, y, key)
  """
  if form not in LOOP_FORMS:
    raise ValueError(f'Unknown loop form {form!r}; valid forms: {", ".join(LOOP_FORMS)}')
  _loop_form_override.append(form)
  try:
    yield
  finally:
    _loop_form_override.pop()


def current_loop_form(steps: int) -> str:
  """The loop form for a loop of `steps` iterations traced now."""
  if _loop_form_override:
    return _loop_form_override[-1]
  if LOOP_FORM in ('unrolled', 'scan_unrolled') and steps * _copies[-1] > MAX_UNROLL:
    return 'scan'
  return LOOP_FORM


@contextlib.contextmanager
def _repeated(copies: int) -> Iterator[None]:
  """Tells `iterate` that loops traced inside will be repeated `copies` times in the program."""
  _copies.append(_copies[-1] * copies)
  try:
    yield
  finally:
    _copies.pop()


def iterate(body: Callable[[Any, Any], Any], carry: Any, steps: int) -> Any:
  """Returns the carry after `carry = body(i, carry)` for i = 0 .. steps - 1.

  `i` is a Python int in the unrolled form and a traced int32 otherwise, so bodies must only use it
  through jnp operations (e.g. indexing a precomputed schedule array).
  """
  form = current_loop_form(steps)
  if form == 'unrolled':
    for i in range(steps):
      carry = body(i, carry)
    return carry
  if form == 'fori':
    return jax.lax.fori_loop(0, steps, body, carry)
  unroll = True if form == 'scan_unrolled' else UNROLL_CHUNK

  def scan_body(c, i):
    return body(i, c), None

  carry, _ = jax.lax.scan(scan_body, carry, jnp.arange(steps, dtype=jnp.int32), unroll=unroll)
  return carry


def iterate_until(body: Callable[[Any, Any], Any], carry: Any, steps: int,
                  done: Callable[[Any], Array], *, prefix: int | None = None,
                  chunk: int | None = None) -> Any:
  """`iterate`, leaving the loop once `done(carry)` (a scalar bool) holds: the early exit.

  For loops whose iterations become no-ops once done (DeepFool when every example is frozen at its
  first success, CW when every example has stopped its round, Square when every example is
  fooled): the result is then the full loop's whether or not it stops early (the tests compare
  with the same attack traced inside `with early_exit(False):`).

  How it is compiled (this and `current_loop_form` are the one place that decides):
    * default: `loop_until` with the first `prefix` steps (EXIT_PREFIX) unrolled at the level of
      the caller, then one `lax.while_loop` of `chunk` steps (EXIT_CHUNK) per iteration that
      checks `done` between chunks, both capped at MAX_UNROLL per copy of the loop. Compile time is
      that of prefix + chunk steps at any step count. The prefix exists because XLA:CPU runs the
      input gradient of a convolution several times slower inside a while loop than outside
      (BENCHMARKS.md, "Early exit"): attacks that are done within the prefix never pay that.
      Pass prefix=0, chunk=1 for steps that compile slowly and run cheaply (Square's queries).
    * inside `loop_form('unrolled')`: every step unrolled, no exit (a `lax.cond` around each
      unrolled step measured slower than running all of them on XLA:CPU);
    * inside another forced `loop_form` (rolled): prefix 0, one step per while-loop iteration;
    * inside `early_exit(False)`: the same loop, never left early (tests and benchmarks: the
      full-length loop whose result the early exit must reproduce).
  """
  if _loop_form_override:
    if _loop_form_override[-1] == 'unrolled':
      return iterate(body, carry, steps)
    prefix, chunk = 0, 1
  else:
    shape = _exit_shape[-1] if _exit_shape else (EXIT_PREFIX, EXIT_CHUNK)
    prefix = shape[0] if prefix is None else prefix
    chunk = shape[1] if chunk is None else chunk
    budget = max(1, MAX_UNROLL // _copies[-1])
    prefix, chunk = min(prefix, budget), min(chunk, budget)
  if not _early_exit[-1]:
    done = _never
  return loop_until(body, carry, steps, done, prefix=prefix, chunk=chunk)


def _never(carry: Any) -> Array:
  del carry
  return jnp.asarray(False)


def loop_until(body: Callable[[Any, Any], Any], carry: Any, n: int,
               done: Callable[[Any], Array], *, prefix: int = 0, chunk: int = 1) -> Any:
  """`carry = body(i, carry)` for i = 0 .. n - 1, stopping early once `done(carry)` holds.

  The mechanism behind `iterate_until`, also used as is for loops that are not attack steps (CW's
  binary-search rounds, the target runs of APGD-T and FAB-T). The first `prefix` calls are
  unrolled (i a Python int), unchecked; then one `lax.while_loop` runs chunks of `chunk` calls
  unrolled (i traced), checking `done` before each chunk; the (n - prefix) % chunk last calls
  follow, unrolled, under one `lax.cond` that skips them if done. The result equals the full
  loop's whenever calls are no-ops once `done` holds; at most chunk - 1 no-op calls run after it.
  """
  check_steps(n, 'n')
  prefix = max(0, min(int(prefix), n))
  for i in range(prefix):
    carry = body(i, carry)
  if prefix == n:
    return carry
  chunk = max(1, min(int(chunk), n - prefix))
  full, rest = divmod(n - prefix, chunk)

  def cond_fn(state):
    j, c = state
    return (j < full) & ~done(c)

  def body_fn(state):
    j, c = state
    for k in range(chunk):
      c = body(prefix + j * chunk + k, c)
    return j + 1, c

  carry = jax.lax.while_loop(cond_fn, body_fn, (jnp.asarray(0, jnp.int32), carry))[1]
  if rest:
    def tail(c):
      for k in range(rest):
        c = body(prefix + full * chunk + k, c)
      return c
    carry = jax.lax.cond(done(carry), lambda c: c, tail, carry)
  return carry


def over_runs(body: Callable[[Any, Any], Any], carry: Any, runs: int, steps_per_run: int,
              done: Callable[[Any], Array]) -> Any:
  """`carry = body(j, carry)` for the runs j = 0 .. runs - 1, each a loop of steps_per_run steps
  (the target runs of APGD-T and FAB-T, CW's binary-search rounds).

  Unrolled (a Python loop, j an int) when the whole program, runs * steps_per_run steps, is short
  enough to unroll (`current_loop_form`); else `loop_until` one run per iteration, which stops once
  `done(carry)` holds, so an attack whose remaining runs are no-ops skips them. The runs are marked
  as repeated (`_repeated`), so that the loops inside them are rolled, or their early-exit prefix
  and chunk shortened, when the total is too long to unroll, as for restarts.
  """
  form = current_loop_form(runs * steps_per_run)
  with _repeated(runs):
    if form == 'unrolled':
      for j in range(runs):
        carry = body(j, carry)
      return carry
    return loop_until(body, carry, runs, done if _early_exit[-1] else _never)


@contextlib.contextmanager
def early_exit(enabled: bool | None = None, *, prefix: int | None = None,
               chunk: int | None = None) -> Iterator[None]:
  """Turns the early exit of `iterate_until` and `over_runs` off (or on), or sets the prefix and
  chunk of `iterate_until`, for attacks traced inside (as with `loop_form`, jit a fresh function
  inside the context). None keeps the setting of the enclosing context.

  `early_exit(False)` runs the same loops to their full length: the reference that the early
  exit must reproduce (tests, benchmarks).

  Example:
    >>> with early_exit(False):
    ...   x_full = jax.jit(functools.partial(deepfool, steps=50))(logits_fn, x, y, key)
  """
  shape = _exit_shape[-1] if _exit_shape else (EXIT_PREFIX, EXIT_CHUNK)
  if prefix is not None:
    if isinstance(prefix, bool) or not isinstance(prefix, (int, np.integer)) or prefix < 0:
      raise ValueError(f'prefix must be an integer >= 0, got {prefix!r}')
    shape = (int(prefix), shape[1])
  if chunk is not None:
    check_steps(chunk, 'chunk')
    shape = (shape[0], int(chunk))
  _early_exit.append(_early_exit[-1] if enabled is None else bool(enabled))
  _exit_shape.append(shape)
  try:
    yield
  finally:
    _early_exit.pop()
    _exit_shape.pop()


# ----------------------------------------------------------------------------------------------
# Host-driven loops: jitted chunks of unrolled steps, "all done" checked on the host.
# ----------------------------------------------------------------------------------------------
# Inside one program, a loop is either unrolled (fast per step, compile time linear in the steps)
# or a nested computation (while/scan/cond: ~3x slower per step on XLA:CPU, see above). An attack
# called with concrete arrays (not inside a user's `jax.jit`) can do better than both: it runs its
# loop as jitted programs of HOST_CHUNK unrolled steps each, called from Python, so every step
# runs at the unrolled speed, the compile time is that of HOST_CHUNK steps at any step count, and
# an early exit is checked on the host between two programs at no cost to the steps themselves
# (benchmarks/records/5_time_to_result_gaps.md). Attacks that do this (PGD, BIM, MI-FGSM, APGD-CE,
# APGD-T, FAB-T, CW-L2, DeepFool; AutoAttack through its members) are marked `compiles_itself`;
# traced inside a jit they fall back to `iterate`/`iterate_until`/`over_runs`. Their results are
# the same in both forms (tests/test_host_loops.py).
# Steps per host program, from `benchmarks/bench_host_chunk.py` on the trained SynthParts CNN,
# batch 128, 2 cores (BENCHMARKS.md, record 6): programs of 5 steps against one of 20 ran PGD-L∞
# 1.23x faster at 20 steps (0.487 -> 0.397 s) and 1.15x at 100, MI-FGSM-L∞ 1.14x, APGD-L∞
# 1.11x / 0.96x, PGD-L2 1.05x / 0.98x, with the same images, and compile no slower (APGD-L∞-100
# 5.4 -> 2.1 s). 5 divides the usual step counts (10, 20, 50, 100, 1000), so a loop compiles one
# program; the host's dispatch per program (~0.1 ms) is small against a step (~20 ms here).
HOST_CHUNK = 5
HOST_EXIT_CHUNK = 1   # steps per program between two checks for loops that usually exit early
_host_loops: list[bool] = [True]


@contextlib.contextmanager
def host_loops(enabled: bool) -> Iterator[None]:
  """Turns the host-driven loops off (or on) for attacks called inside: off, an attack called
  with concrete arrays runs as one jitted program, as inside a user's `jax.jit` (tests,
  benchmarks)."""
  _host_loops.append(bool(enabled))
  try:
    yield
  finally:
    _host_loops.pop()


def on_host(*trees: Any) -> bool:
  """True when an attack called with these arguments may drive its loop from the host: no leaf
  is a tracer (the attack is not being traced inside a jit) and `host_loops` is not off."""
  if not _host_loops[-1]:
    return False
  leaves = jax.tree_util.tree_leaves(trees)
  return not any(isinstance(a, jax.core.Tracer) for a in leaves)


def host_driven(total_steps: int) -> bool:
  """Whether an attack called with arrays whose loops total `total_steps` steps (all runs) should
  drive them from the host rather than compile them as one unrolled program: when they are longer
  than one HOST_CHUNK. Up to that one program holds the start, the steps and the result, with
  the step index a compile-time constant. Loops with an early exit (DeepFool, CW's abort) do not
  ask: they are always driven from the host, where the exit is free."""
  return total_steps > HOST_CHUNK


def is_program_argument(v: Any) -> bool:
  """Whether a host program takes `v` as an argument (traced) rather than as a compile-time
  constant: arrays (a traced eps), and callables that are pytrees (`jax.tree_util.Partial`s, or
  registered dataclasses such as the adaptive attacks' objectives), whose leaves are weights and
  states. Plain functions, numbers and strings are constants."""
  if isinstance(v, (jax.Array, np.ndarray, jax.tree_util.Partial)):
    return True
  return callable(v) and not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(v))


def split_static(kwargs: dict) -> tuple[tuple, dict]:
  """(static, dynamic) parts of keyword arguments for a host program: program arguments
  (`is_program_argument`: arrays, pytree callables) and compile-time constants (the rest)."""
  dynamic = {k: v for k, v in kwargs.items() if is_program_argument(v)}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dynamic))
  return static, dynamic


@functools.lru_cache(maxsize=None)
def host_program(fn: Callable, static: tuple) -> Callable:
  """`jax.jit(partial(fn, **static))`, one per (function, static parameters) for the process, so
  that batches, models of one architecture and eps values (arrays) reuse it. `fn` must be a
  module-level function; a `logits_fn` that is not a `jax.tree_util.Partial` goes in `static`."""
  return jax.jit(functools.partial(fn, **dict(static)))


def call_on_host(fn: Callable, *args: Any, **kwargs: Any) -> Any:
  """fn(*args, **kwargs) as the cached `host_program` (arrays traced, the rest static)."""
  static, dynamic = split_static(kwargs)
  return host_program(fn, static)(*args, **dynamic)


def _chunk(consts, carry, start, *, step, done, size, params, whole):
  """`size` steps of `step` unrolled (i = start + j, traced; or i = j, a Python int, for a
  `whole` loop), then `done` of the result."""
  kw = dict(params)
  for j in range(size):
    carry = step(consts, j if whole else start + j, carry, **kw)
  finished = jnp.asarray(False) if done is None else done(consts, carry, **kw)
  return carry, finished


def as_partial(logits_fn: Callable) -> Callable:
  """logits_fn as a `jax.tree_util.Partial`, so that it can be a host program's argument (a plain
  function becomes part of the program's static signature: one compilation per function)."""
  if isinstance(logits_fn, jax.tree_util.Partial):
    return logits_fn
  return jax.tree_util.Partial(logits_fn)


def run_from_host(traced: Callable, host: Callable, total_steps: int, logits_fn: Callable,
                  *args: Any, one_program: bool = False, **kwargs: Any) -> Any:
  """How a host-driven attack called with arrays (`on_host` true) runs: `traced` (the attack
  itself, re-entered with tracers so that it takes its traced path) as one jitted host program
  when its loops total at most HOST_CHUNK steps (`host_driven`) or `one_program` is set; longer,
  `host(logits_fn, *args, **kwargs)`, which drives its loops in `host_loop` chunks. `logits_fn`
  is made a `jax.tree_util.Partial` either way, so that models of one architecture share the
  programs. The one dispatch behind PGD, BIM, MI-FGSM, APGD-CE, APGD-T and FAB-T."""
  logits_fn = as_partial(logits_fn)
  if one_program or not host_driven(total_steps):
    return call_on_host(traced, logits_fn, *args, **kwargs)
  return host(logits_fn, *args, **kwargs)


def host_loop(step: Callable, consts: Any, carry: Any, n: int, *, chunk: int | None = None,
              done: Callable | None = None, first: int | None = None, **params: Any) -> Any:
  """`carry = step(consts, i, carry, **params)` for i = 0 .. n - 1, driven from the host.

  Runs jitted programs of `chunk` (default HOST_CHUNK) unrolled steps (the first one of `first`
  steps when given, so that checks can follow the steps where `done` may change), i traced as
  start + j (Python ints when the whole loop is one program without `done`). With `done`
  (`done(consts, carry, **params)`, a scalar bool), the loop stops after the first program whose
  result is done; the result equals the full loop's when steps are no-ops once done. `step` and
  `done` must be module-level functions and `params` hashable (they are compile-time constants);
  `consts` is a pytree of arrays (weights as a `jax.tree_util.Partial`, images, labels, ...).
  Programs are cached per (step, done, size, params): a loop of any length compiles at most three
  (the first, the chunk, the remainder).
  """
  check_steps(n, 'n')
  chunk = HOST_CHUNK if chunk is None else chunk
  check_steps(chunk, 'chunk')
  static = tuple(sorted(params.items()))
  # A loop that is one program anyway is compiled with i as Python ints, as the unrolled form:
  # steps whose schedule depends on i (APGD's checkpoints) then fold it at compile time, which
  # compiled APGD-20 in 4.5 s instead of 7 s with i traced.
  whole = done is None and n <= chunk
  i = 0
  while i < n:
    size = min(first if (i == 0 and first) else chunk, n - i)
    prog = host_program(_chunk, (('done', done), ('params', static), ('size', size),
                                 ('step', step), ('whole', whole)))
    carry, finished = prog(consts, carry, jnp.asarray(i, jnp.int32))
    i += size
    if done is not None and i < n and bool(finished):
      break
  return carry


# ----------------------------------------------------------------------------------------------
# Restarts: keep, per example, the strongest of several runs.
# ----------------------------------------------------------------------------------------------
class Best(NamedTuple):
  """Per-example best iterate: success beats failure, then a higher loss wins."""
  x: Array
  success: Array
  loss: Array


def init_best(x: Array) -> Best:
  n = x.shape[0]
  return Best(x, jnp.zeros((n,), bool), jnp.full((n,), -jnp.inf, jnp.float32))


def update_best(best: Best, x_new: Array, success: Array, loss: Array) -> Best:
  better = (success & ~best.success) | ((success == best.success) & (loss > best.loss))
  return Best(jnp.where(_bcast(better, x_new), x_new, best.x),
              best.success | success,
              jnp.where(better, loss, best.loss))


def objective_and_grad(objective: Callable, x: Array, y: Array, key: Array) -> tuple[Array, Array]:
  """(per-example objective [N], its input gradient) of `objective(x, y, key) -> [N]`."""
  def total(xx):
    v = objective(xx, y, key)
    return jnp.sum(v), v
  (_, v), g = jax.value_and_grad(total, has_aux=True)(x)
  return v, g


def ascend_objective(objective: Callable, success: Callable | None, x: Array, y: Array, key,
                     *, norm: str, eps, steps: int, alpha, random_init: bool,
                     restarts: int) -> Array:
  """Projected steepest ascent of an arbitrary per-example objective (PGD's loop).

  x_{t+1} = Π_{B(x, eps) ∩ [0,1]}(x_t + alpha s(∇ objective(x_t, y, k_t))), s the steepest
  direction of the norm, k_t = fold_in(fold_in(key_r, 1), t) a fresh key per step (expectation
  over transformation for randomised objectives, spread over the steps).

  Without `success`, returns the last iterate (restart 0; more restarts need `success`). With it,
  every iterate x_0 .. x_T is checked and each example keeps its best (`update_best`: successful
  beats unsuccessful, then the higher objective), across restarts too, so more steps or restarts
  never lose a success.
  """
  check_steps(restarts, 'restarts')
  if success is None and restarts > 1:
    raise ValueError('restarts > 1 with an objective needs a success predicate to pick the best')
  key = jax.random.key(0) if key is None else key

  def run(k):
    step_key = jax.random.fold_in(k, 1)
    x0 = random_start(norm, k, x, eps) if random_init else x
    if success is None:
      def body(i, x_adv):
        _, g = objective_and_grad(objective, x_adv, y, jax.random.fold_in(step_key, i))
        return project(norm, x_adv + alpha * steepest_step(norm, g), x, eps)
      return iterate(body, x0, steps), None

    consts = (objective, success, x, y, eps, alpha, step_key)
    c = iterate(lambda i, c: _objective_step(consts, i, c, norm=norm), (x0, init_best(x)), steps)
    return c[0], _objective_last(consts, c, steps=steps)

  if success is None:
    return run(jax.random.fold_in(key, 0))[0]
  best = init_best(x)
  with _repeated(restarts):
    for r in range(restarts):
      best = _better_run(best, run(jax.random.fold_in(key, r))[1])
  return best.x


def _objective_consts(objective, success, x, y, eps, alpha, key, *, norm, random_init):
  """A run's start and constants for `_objective_step`: (x0, (objective, success, x, y, eps,
  alpha, step key)), as `ascend_objective`'s run(k) builds them."""
  x0 = random_start(norm, key, x, eps) if random_init else x
  return x0, (objective, success, x, y, eps, alpha, jax.random.fold_in(key, 1))


def _objective_step(consts, i, c, *, norm):
  """One step of `ascend_objective`'s loop (with a success predicate: c = (x_adv, best))."""
  objective, success, x, y, eps, alpha, step_key = consts
  x_adv, best = c
  k_i = jax.random.fold_in(step_key, i)
  v, g = objective_and_grad(objective, x_adv, y, k_i)
  best = update_best(best, x_adv, success(x_adv, y, k_i), v)
  return project(norm, x_adv + alpha * steepest_step(norm, g), x, eps), best


def _objective_last(consts, c, *, steps):
  """The last iterate checked too, as in `ascend_objective`."""
  objective, success, _, y, _, _, step_key = consts
  x_last, best = c
  k_last = jax.random.fold_in(step_key, steps)
  return update_best(best, x_last, success(x_last, y, k_last), objective(x_last, y, k_last))


def _better_run(best, b):
  better = (b.success & ~best.success) | ((b.success == best.success) & (b.loss > best.loss))
  return Best(jnp.where(_bcast(better, b.x), b.x, best.x), best.success | b.success,
              jnp.where(better, b.loss, best.loss))


def ascend_objective_on_host(objective: Callable, success: Callable, x: Array, y: Array, key,
                             *, norm: str, eps, steps: int, alpha, random_init: bool,
                             restarts: int) -> Array:
  """`ascend_objective` with a success predicate, its steps driven from the host in `host_loop`
  chunks: the same iterates, checks and best per example. `objective` and `success` must be
  pytrees (`is_program_argument`: arguments of the host programs); `alpha` and `eps` numbers or
  arrays.
  The defense-aware attacks (`attacks.adaptive`) run this way when called with arrays: their
  objective holds a defense, so a program of many unrolled steps is slow to compile (10-16 s for
  the main job's 20 steps as one program)."""
  check_steps(restarts, 'restarts')
  key = jax.random.key(0) if key is None else key
  best = start = call_on_host(init_best, x)   # every run starts from it, as the restarts do
  for r in range(restarts):
    x0, consts = call_on_host(_objective_consts, objective, success, x, y, eps, alpha,
                              jax.random.fold_in(key, r), norm=norm, random_init=random_init)
    c = host_loop(_objective_step, consts, (x0, start), steps, norm=norm)
    best = call_on_host(_better_run, best, call_on_host(_objective_last, consts, c, steps=steps))
  return best.x


def _keep_best(logits_fn, best, x_adv, y, *, loss, targeted):
  """`update_best` with x_adv's success and (signed) loss: one host program per restart."""
  logits = logits_fn(x_adv)
  sign = -1.0 if targeted else 1.0
  return update_best(best, x_adv, is_success(logits, y, targeted),
                     sign * get_loss(loss)(logits, y))


def best_of_restarts_on_host(run: Callable[[Array], Array], logits_fn: LogitsFn, x: Array,
                             y: Array, key: Array, restarts: int, loss: str,
                             targeted: bool) -> Array:
  """`best_of_restarts` for attacks called with arrays: `run(key_r)` calls host programs, and
  keeping the best is one more (`loss` is the loss's name, a compile-time constant)."""
  check_steps(restarts, 'restarts')
  best = None
  for r in range(restarts):
    x_adv = run(None if key is None else jax.random.fold_in(key, r))
    if restarts == 1:
      return x_adv
    best = call_on_host(_keep_best, logits_fn, init_best(x) if best is None else best, x_adv, y,
                        loss=loss, targeted=targeted)
  return best.x


def best_of_restarts(run: Callable[[Array], Array], logits_fn: LogitsFn, x: Array, y: Array,
                     key: Array, restarts: int, loss_fn: Callable, targeted: bool) -> Array:
  """Runs `run(key_r)` for r < restarts and keeps, per example, the strongest x_adv.

  Restart r uses `fold_in(key, r)`, so restart 0 is the single run of `restarts=1`: more restarts
  can only add successes, never lose one (checked by the tests).
  """
  check_steps(restarts, 'restarts')
  sign = -1.0 if targeted else 1.0
  best = init_best(x)
  with _repeated(restarts):
    for r in range(restarts):  # few restarts; each holds a whole attack loop
      # key may be None for deterministic attacks (no random start).
      x_adv = run(None if key is None else jax.random.fold_in(key, r))
      if restarts == 1:
        return x_adv
      logits = logits_fn(x_adv)
      best = update_best(best, x_adv, is_success(logits, y, targeted), sign * loss_fn(logits, y))
  return best.x
