"""Logistic-regression combination of detector scores (Tuna et al. 2021 §5.3; Feinman et al. 2017).

Each member detector d_j gives a score s_j(x); the combined detector is

  f(x) = w . ((s(x) - mu) / sigma) + b,

with (mu, sigma) a StandardScaler fitted on the combiner's training pool and (w, b) a scikit-learn
LogisticRegression fitted on: negatives = clean images AND Gaussian-noisy copies of them (noise std
matched to the attack, so that "is perturbed" alone is not what the detector learns), positives =
adversarial images.

Two fits, on different data:
  1. `Defense.fit(ctx, data, key)`: fits every member on CLEAN training data (KDE densities, KL
     class means, ...), like any other defense.
  2. `fit_combiner(state, ctx, x_clean, x_adv, noise_std, key)`: the LR needs adversarial positives,
     which the clean-only protocol cannot give it, so it is a separate explicit step on a held-out
     split. The original code fitted and scored the LR on the same examples, which overstates its
     AUC; here `fit_combiner` records a fingerprint of every image it saw and `score` refuses
     (`LeakageError`) to score any of them (`assert_disjoint`).

Members that are `mc_dropout(...)` specs differing only in `metric` share one set of T stochastic
passes (the metrics are all functions of the same [T, N, K] probabilities), so the default four
uncertainty features cost one MC run instead of four.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from unmask_jax import defenses
from unmask_jax.defenses import base, uncertainty
from unmask_jax.registry import parse_spec

# The six features of Tuna et al. 2021 (Table 5).
DEFAULT_MEMBERS = ('mc_dropout(metric="variance")', 'mc_dropout(metric="entropy")',
                   'mc_dropout(metric="mutual_information")', 'mc_dropout(metric="confidence")',
                   'kde', 'kl')
OUTPUTS = ('decision', 'probability')


class LeakageError(ValueError):
  """Raised when images the combiner was fitted on are passed for evaluation."""


def image_fingerprints(x) -> np.ndarray:
  """One 64-bit BLAKE2b hash per image of its float32 pixels: uint64 [N].

  Exact: it identifies the same image array (also after a float32 round trip), not a perturbed or
  re-encoded version of it, so held-out splits must still be made by source image.
  """
  x = np.ascontiguousarray(np.asarray(x, np.float32))
  digests = [hashlib.blake2b(img.tobytes(), digest_size=8).digest() for img in x]
  return np.asarray([int.from_bytes(d, 'little') for d in digests], np.uint64)


def assert_disjoint(state: base.State, *x_eval) -> None:
  """Raises `LeakageError` if any image of `x_eval` was used by `fit_combiner`."""
  if 'fit_fingerprints' not in state:
    raise base.NotFittedError('The combiner has no fingerprints: call fit_combiner first.')
  seen = state['fit_fingerprints']
  for i, x in enumerate(x_eval):
    overlap = np.isin(image_fingerprints(x), seen)
    if overlap.any():
      raise LeakageError(f'{int(overlap.sum())} of {len(overlap)} evaluation images (argument {i}) '
                         'were used to fit the combiner; fit it on a held-out split of different '
                         'images (Tuna et al. 2021 fitted and scored on the same data; this repository '
                         'does not).')


def matched_noise_std(x_clean, x_adv) -> np.ndarray:
  """Per-image noise std with the same expected L2 norm as the attack: RMS_pixels(x_adv - x_clean).

  For paired clean/adversarial images; Gaussian noise of this std per pixel has E||n||^2 =
  ||x_adv - x_clean||^2 (Feinman et al. 2017 matched the noisy samples' L2 norm to the attack).
  """
  delta = np.asarray(x_adv, np.float32) - np.asarray(x_clean, np.float32)
  return np.sqrt(np.mean(np.square(delta), axis=tuple(range(1, delta.ndim))))


def _member_id(member: Union[str, base.Defense]) -> str:
  return member if isinstance(member, str) else member.name


def _mc_group(member: Union[str, base.Defense]):
  """(hashable settings without the metric, metric) for shareable mc_dropout specs, else None."""
  if not isinstance(member, str):
    return None
  name, kwargs = parse_spec(member)
  if name != 'mc_dropout':
    return None
  metric = kwargs.pop('metric', 'entropy')
  return tuple(sorted(kwargs.items())), metric


def _build_members(members) -> tuple[list[base.Defense], list[str]]:
  if isinstance(members, str) or not members:
    raise ValueError(f'members must be a non-empty sequence of detector specs, got {members!r}')
  ids = [_member_id(m) for m in members]
  return [_made(m) if isinstance(m, str) else m for m in members], ids


@functools.lru_cache(maxsize=None)
def _made(spec: str) -> base.Defense:
  """One Defense per member spec for the process. The members are static arguments of the
  jitted `_members_chunk`, hashed by their functions' identity: members rebuilt per call missed
  its compilation cache every time (the digits study compiled it 21 times, 32 of its 49 s)."""
  return defenses.make(spec)


def _member_state(state: base.State, i: int) -> base.State:
  prefix = f'member{i}.'
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _member_plan(members) -> list:
  """Static plan of how to compute member scores: one ('mc', settings, [(column, metric)], first)
  entry per group of mc_dropout specs that differ only in metric (one set of T passes), and one
  ('defense', column) per other member."""
  plan, groups = [], {}
  for i, m in enumerate(members):
    g = _mc_group(m)
    if g is None:
      plan.append(('defense', i))
      continue
    settings, metric = g
    if settings not in groups:
      groups[settings] = ('mc', settings, [], i)
      plan.append(groups[settings])
    groups[settings][2].append((i, metric))
  return plan


def _members_apply(built, plan, state, ctx, x, key, surrogate: bool):
  """Pure: [N, members] member scores (exact, or their attack surrogates)."""
  keys = jax.random.split(key, len(built))
  cols = [None] * len(built)
  for entry in plan:
    if entry[0] == 'mc':
      _, settings, metrics, first = entry
      s = dict(settings)
      passes = s.get('surrogate_T', 10) if surrogate else s.get('T', 50)
      out = uncertainty.mc_metrics_of(ctx.mc_logits_fn, x, keys[first], passes)
      for i, metric in metrics:
        cols[i] = out[metric]
    else:
      i = entry[1]
      fn = built[i].surrogate if surrogate else built[i].apply
      cols[i] = fn(_member_state(state, i), ctx, x, keys[i]).score
  return jnp.stack([c.astype(jnp.float32) for c in cols], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _members_chunk(built, plan_key, static, arrays, ctx, x, key):
  plan = [(e[0], e[1], list(e[2]), e[3]) if e[0] == 'mc' else e for e in plan_key]
  return {'s': _members_apply(built, plan, {**arrays, **dict(static)}, ctx, x, key, False)}


def _freeze(plan) -> tuple:
  return tuple((e[0], e[1], tuple(e[2]), e[3]) if e[0] == 'mc' else e for e in plan)


def member_scores(state: base.State, ctx: base.Context, x, key: jax.Array,
                  members: Sequence[Union[str, base.Defense]] | None = None) -> np.ndarray:
  """[N, num_members] member scores (each higher = more adversarial): the LR's features.

  Args:
    state: a combiner state (from `make(...).fit`).
    members: the member specs/Defenses; None = rebuild them from the specs stored in the state
      (pass them when the combiner was made from `Defense` objects rather than specs).
  """
  base.require_fitted(state, 'lr_combiner')
  stored = [str(m) for m in np.asarray(state['member_ids']).reshape(-1)]
  members = stored if members is None else list(members)
  built, ids = _build_members(members)
  if ids != stored:
    raise ValueError(f'lr_combiner: state was fitted with members {stored}, got {ids}')
  base.check_images(x, 'lr_combiner')
  arrays, static = base.split_state(state)
  plan = _freeze(_member_plan(members))
  chunk = min(m.chunk for m in built)
  s = base.map_chunks(lambda xb, i: _members_chunk(tuple(built), plan, static, arrays, ctx, xb,
                                                   jax.random.fold_in(key, i)), x, chunk)['s']
  s = s.astype(np.float64)
  if not np.all(np.isfinite(s)):
    bad = [ids[j] for j in np.flatnonzero(~np.all(np.isfinite(s), axis=0))]
    raise ValueError(f'lr_combiner: non-finite scores from member(s) {bad}')
  return s


# pylint: disable-next=invalid-name
def make(*, members: Sequence[Union[str, base.Defense]] = DEFAULT_MEMBERS, C: float = 1.0,
         output: str = 'decision', check_disjoint: bool = True,
         max_iter: int = 1000) -> base.Defense:
  """Logistic-regression detector on standardised member scores (Tuna et al. 2021 §5.3).

  score(x) = w . ((s(x) - mu) / sigma) + b (or its sigmoid), s = member scores; see the module
  docstring for how w, b, mu, sigma are fitted. The surrogate is the same LR over the members'
  surrogates (differentiable through every member; MC dropout with fewer passes, redrawn per
  attack step).

  Args:
    members: detector specs of the registry (e.g. 'kde(bandwidth=0.26)'), or `Defense` objects
      (then pass `members=` to `fit_combiner` too).
    C: inverse L2 regularisation strength of the LR. Tuna et al.'s code cross-validated C; here
      it is fixed (1.0), because the held-out split is small (150 images) and is already split
      between the LR fit and the thresholds.
    output: 'decision' (the log-odds) or 'probability' (its sigmoid); the same ROC.
    check_disjoint: `decide` raises `LeakageError` on images `fit_combiner` saw (keep True for
      evaluation).
    max_iter: LR solver iterations.

  Returns:
    A `Defense` whose fit fits the members on clean data; call `fit_combiner` before applying it.
  """
  if output not in OUTPUTS:
    raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
  if not C > 0 or max_iter < 1:
    raise ValueError(f'Need C > 0 and max_iter >= 1, got C={C}, max_iter={max_iter}')
  members = tuple(members) if not isinstance(members, str) else members
  built, ids = _build_members(members)
  plan = _member_plan(members)
  name = 'lr_combiner'

  def fit(ctx, data, key):
    keys = jax.random.split(key, len(built))
    state = {'member_ids': np.asarray(ids), 'lr_C': np.asarray(C, np.float64),
             'lr_max_iter': np.asarray(max_iter, np.int32)}
    for i, (member, k) in enumerate(zip(built, keys)):
      for field, value in base.require_fitted(member.fit(ctx, data, k), ids[i]).items():
        state[f'member{i}.{field}'] = np.asarray(value)
    return state

  def _lr(state, feats):
    if 'lr_coef' not in state:
      raise base.NotFittedError(f'{name}: the logistic regression is not fitted; call '
                                'combiner.fit_combiner(state, ctx, x_clean, x_adv, noise_std, key) '
                                'on a held-out split first.')
    logit = ((feats - state['scaler_mean']) / state['scaler_scale']) @ state['lr_coef'] \
        + state['lr_intercept']
    return jax.nn.sigmoid(logit) if output == 'probability' else logit

  def apply(state, ctx, x, key):
    return base.Decision(_lr(state, _members_apply(built, plan, state, ctx, x, key, False)))

  def surrogate(state, ctx, x, key):
    return base.Surrogate(_lr(state, _members_apply(built, plan, state, ctx, x, key, True)))

  def host_check(state, x):
    if 'lr_coef' not in state:
      _lr(state, None)
    if check_disjoint:
      assert_disjoint(state, x)

  def fit_adversarial(state, ctx, x_clean, x_adv, key):
    """`fit_combiner` with the noise matched to this attack's per-image perturbation."""
    return fit_combiner(state, ctx, x_clean, x_adv, matched_noise_std(x_clean, x_adv), key,
                        members=members)

  return base.Defense(name, fit, apply, surrogate, chunk=min(m.chunk for m in built),
                      host_check=host_check, fit_adversarial=fit_adversarial)


def lr_decision(state: base.State, feats, output: str = 'decision') -> np.ndarray:
  """The fitted LR on member scores [N, members]: w . ((s - mu) / sigma) + b (or its sigmoid).

  Lets a caller that already computed `member_scores` for several splits apply several fitted
  combiners (e.g. one per attack) without re-running the members; it does NOT check leakage, so
  such a caller must call `assert_disjoint` itself.
  """
  if 'lr_coef' not in state:
    raise base.NotFittedError('lr_combiner: call fit_combiner on a held-out split first.')
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or feats.shape[1] != len(state['lr_coef']):
    raise ValueError(f'lr_combiner: expected member scores [N, {len(state["lr_coef"])}], got '
                     f'shape {feats.shape}')
  logit = (feats - state['scaler_mean']) / state['scaler_scale'] @ state['lr_coef'] \
      + float(state['lr_intercept'])
  if output == 'probability':
    logit = 1.0 / (1.0 + np.exp(-logit))
  return logit.astype(np.float32)


def fit_combiner(state: base.State, ctx: base.Context, x_clean, x_adv, noise_std,
                 key: jax.Array, *, members=None) -> base.State:
  """Fits the combiner's LR on a HELD-OUT split; returns the state with it added.

  Pool: negatives = x_clean and x_noisy = clip(x_clean + noise_std * N(0, I), 0, 1); positives =
  x_adv. Features = member scores, standardised with the pool's mean and std (StandardScaler);
  LR = scikit-learn LogisticRegression(C) on them (Tuna et al. 2021 §5.3). Stores the scaler's mean/scale,
  the LR's coef/intercept and the fingerprints of every clean and adversarial image used, so that
  `score` refuses them later (`assert_disjoint`).

  Args:
    state: from the combiner's `fit` on clean training data.
    ctx: the protected system.
    x_clean: [N, H, W, C] clean held-out images; x_adv: [M, H, W, C] adversarial images (typically
      attacks of x_clean); both must come from images not in the evaluation split.
    noise_std: scalar or per-clean-image [N] std of the Gaussian noise, matched to the attack (e.g.
      `matched_noise_std(x_clean, x_adv)`, or the attack's eps).
    key: PRNG key (noise and member scoring).
    members: as in `member_scores` (None = the specs stored in the state).
  """
  base.require_fitted(state, 'lr_combiner')
  if 'member_ids' not in state:
    raise ValueError('fit_combiner needs the state of an lr_combiner fit.')
  for arr, what in ((x_clean, 'x_clean'), (x_adv, 'x_adv')):
    base.check_images(arr, f'lr_combiner {what}')
  x_clean = np.asarray(x_clean, np.float32)
  x_adv = np.asarray(x_adv, np.float32)
  noise_std = np.asarray(noise_std, np.float32)
  if noise_std.ndim == 1:
    if len(noise_std) != len(x_clean):
      raise ValueError(f'noise_std has {len(noise_std)} values for {len(x_clean)} clean images')
    noise_std = noise_std[:, None, None, None]
  elif noise_std.ndim != 0:
    raise ValueError(f'noise_std must be a scalar or [N], got shape {noise_std.shape}')
  if np.any(noise_std < 0) or not np.all(np.isfinite(noise_std)):
    raise ValueError('noise_std must be finite and >= 0')
  k_noise, k_score = jax.random.split(key)
  noise = np.asarray(jax.random.normal(k_noise, x_clean.shape), np.float32)
  # Clipping keeps valid images; it slightly shrinks the noise at saturated pixels, as projection
  # onto [0, 1] shrinks an attack.
  x_noisy = np.clip(x_clean + noise_std * noise, 0.0, 1.0)
  pool = np.concatenate([x_clean, x_noisy, x_adv])
  y = np.concatenate([np.zeros(2 * len(x_clean)), np.ones(len(x_adv))]).astype(np.int32)
  feats = member_scores(state, ctx, pool, k_score, members)
  scaler = StandardScaler().fit(feats)
  lr = LogisticRegression(C=float(state['lr_C']), max_iter=int(state['lr_max_iter']))
  lr.fit(scaler.transform(feats), y)
  out = dict(state)
  out.update(scaler_mean=scaler.mean_.astype(np.float64),
             scaler_scale=scaler.scale_.astype(np.float64),
             lr_coef=lr.coef_[0].astype(np.float64),
             lr_intercept=np.asarray(lr.intercept_[0], np.float64),
             fit_fingerprints=np.unique(np.concatenate([image_fingerprints(x_clean),
                                                        image_fingerprints(x_adv)])),
             fit_counts=np.asarray([len(x_clean), len(x_noisy), len(x_adv)], np.int32))
  return out


__all__ = ['DEFAULT_MEMBERS', 'LeakageError', 'assert_disjoint', 'fit_combiner',
           'image_fingerprints', 'lr_decision', 'make', 'matched_noise_std', 'member_scores']
