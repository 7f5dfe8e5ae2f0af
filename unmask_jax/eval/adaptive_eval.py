"""The adaptive (white-box, defense-aware) evaluation of every defense, beside the gray-box one.

Threat model: the attacker knows M, the defense, its fitted state and its threshold, and attacks
them together (`attacks.adaptive`: misclassify M, stay under the defense's threshold, keep a
corrector's class wrong). For each defense and each paired gray-box attack (same norm and eps),
on the first `n_images` test images:

  attack success (per image) = M(x') != y AND not flagged AND (corrector: defended class != y),
  judged by the defense's EXACT decision on the 8-bit-rounded adversarial image (what an attacker
  could actually submit), with flagged = score > the threshold set on clean validation images;

  worst case (per image) = success under the gray-box attack OR under the adaptive one:
  the headline number (Carlini et al. 2019: the per-example worst case over attacks, never the
  minimum of per-attack averages).

Also reported: the detection ROC AUC of the defense's score, clean test images against the
adaptive images that fool M; a corrector's accuracy; eps-ball and [0, 1] checks of every image
before and after 8-bit rounding; and sanity checks (adaptive >= gray-box success; more steps
never lower success, on a subset).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax import attacks
from unmask_jax.attacks import adaptive as adaptive_lib
from unmask_jax.attacks import common
from unmask_jax.eval import metrics

# The registry attack that ascends an objective, per norm.
_BASE = {'linf': 'pgd_linf', 'l2': 'pgd_l2'}


def round_to_8bit(x_adv, x, norm: str, eps: float) -> np.ndarray:
  """The adversarial image as 8-bit pixels (k/255), still inside the eps-ball and [0, 1].

  Rounding to the nearest level can leave the ball (by up to 0.5/255 per pixel); where it would,
  the perturbation is rounded towards the clean image instead (x is on the 8-bit grid), which can
  only shrink it.
  """
  x_adv, x = np.asarray(x_adv, np.float64), np.asarray(x, np.float64)
  q = np.clip(np.round(x_adv * 255.0) / 255.0, 0.0, 1.0)
  toward = x + np.trunc(np.round((x_adv - x) * 255.0, 6)) / 255.0
  if norm == 'linf':
    out = np.where(np.abs(q - x) <= eps + 1e-7, q, toward)
  else:
    over = _norms(q - x, 'l2') > eps + 1e-6
    out = np.where(over[:, None, None, None], toward, q)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def _norms(delta, norm: str) -> np.ndarray:
  d = np.asarray(delta, np.float64).reshape(len(delta), -1)
  return np.abs(d).max(axis=1) if norm == 'linf' else np.sqrt(np.sum(d * d, axis=1))


def ball_violations(x_adv, x, norm: str, eps: float) -> int:
  """How many images leave [0, 1] or the eps-ball (tolerance 1e-5, float32 rounding)."""
  x_adv = np.asarray(x_adv)
  out = (x_adv.min(axis=(1, 2, 3)) < 0) | (x_adv.max(axis=(1, 2, 3)) > 1)
  return int(np.sum(out | (_norms(x_adv - np.asarray(x), norm) > eps * (1 + 1e-5) + 1e-6)))


def attack_success(dec: dict, m_pred, y, corrects: bool) -> np.ndarray:
  """Per image: M fooled, not flagged, and (corrector) the defended class wrong."""
  ok = (np.asarray(m_pred) != y) & ~np.asarray(dec['flagged'], bool)
  if corrects:
    ok &= np.asarray(dec['pred']) != y
  return ok


def adaptive_spec(cfg, norm: str, eps: float, steps: int, restarts: int) -> str:
  """The registry spec of the adaptive attack that the `adaptive` config describes."""
  base = f'{_BASE[norm]}(eps={eps!r}, steps={steps}, restarts={restarts})'
  step_fraction = cfg.get('step_fraction', None)
  return (f'adaptive(base={base!r}, targets={cfg.targets!r}, kappa={float(cfg.kappa)!r}, '
          f'objective={cfg.get("objective", "selective")!r}, '
          f'corrector={cfg.get("corrector", "target")!r}, '
          f'step_fraction={None if step_fraction is None else float(step_fraction)!r})')


def evaluate_adaptive(cfg, det_states, ctx, x_test, y_test, adv, clean_dec, key, *, make_defense,
                      fit) -> dict:
  """The adaptive section of one class set: {defense: {gray-box label: row}}; see the module doc.

  Args:
    cfg: the `adaptive` config (n_images, attacks, steps, restarts, targets, kappa, defenses,
      extra_defenses, small).
    det_states: {name: (Defense, {state key: calibrated state})} of the gray-box evaluation.
    adv: gray-box attack results {label: {'x_adv', ...}} on the test images.
    clean_dec: {(name, state key): decide() on the clean test images}.
    make_defense / fit: build and fit (cached) a defense that only the adaptive section evaluates.
  """
  from unmask_jax.utils import named_key
  n = min(int(cfg.n_images), len(x_test))
  names = list(cfg.get('defenses', ()) or det_states)
  unknown = [nm for nm in names if nm not in det_states]
  if unknown:
    raise ValueError(f'adaptive.defenses names {unknown}, which the evaluation did not fit; use '
                     f'entries of config.defenses ({list(det_states)}) or adaptive.extra_defenses.')
  entries = {nm: det_states[nm] for nm in names}
  for spec in cfg.get('extra_defenses', ()):
    d = make_defense(spec)
    # A costly defense (DIP restores every image) may set its threshold on fewer clean validation
    # images: small.<name>.n_calibration (the report states the threshold it got).
    n_cal = cfg.get('small', {}).get(spec.split('(')[0], {}).get('n_calibration', 0)
    entries[spec] = (d, fit(d, spec, int(n_cal) or None))
  logits_fn = ctx.logits_fn
  predict = jax.jit(lambda f, xx: jnp.argmax(f(xx), -1))
  out = {}
  compiled = {}
  for name, (d, states) in entries.items():
    small = dict(cfg.get('small', {}).get(name.split('(')[0], {}))
    n_d = min(n, int(small.get('n_images', n)))
    steps = int(small.get('steps', cfg.steps))
    x, y = x_test[:n_d], np.asarray(y_test[:n_d])
    rows = {}
    for label in cfg.attacks:
      if label not in adv:
        continue
      sk = label if label in states else ('' if '' in states else None)
      if sk is None:
        continue
      state = states[sk]
      a = adv[label]
      norm, eps = str(a['norm']), float(a['eps'])
      spec = adaptive_spec(cfg, norm, eps, steps, int(cfg.restarts))
      t0 = time.perf_counter()
      # One compilation per (defense, norm, steps): eps is passed as a traced scalar.
      ck = (name, norm, steps)
      if ck not in compiled:
        compiled[ck] = attacks.compile_attack(spec)
      target = adaptive_lib.target_of(d, state, ctx)
      k = named_key(key, name, label)
      x_adv = np.asarray(compiled[ck](logits_fn, jnp.asarray(x), jnp.asarray(y, jnp.int32), k,
                                      target=target, eps=jnp.float32(eps)))
      seconds = time.perf_counter() - t0
      x_q = round_to_8bit(x_adv, x, norm, eps)
      k_eval = named_key(key, name, label, 'eval')
      dec = d.decide(state, ctx, x_q, k_eval)
      m_pred = np.asarray(predict(logits_fn, jnp.asarray(x_q)))
      succ = attack_success(dec, m_pred, y, d.corrects)
      dec_raw = d.decide(state, ctx, x_adv, k_eval)
      succ_raw = attack_success(dec_raw, np.asarray(predict(logits_fn, jnp.asarray(x_adv))), y,
                                d.corrects)
      # Gray-box: the stored attack on M alone, judged by the same exact decision.
      xg = a['x_adv'][:n_d]
      dec_g = d.decide(state, ctx, xg, named_key(key, name, label, 'gray'))
      succ_g = attack_success(dec_g, np.asarray(a['adv_pred'][:n_d]), y, d.corrects)
      worst = succ | succ_g
      fooled = m_pred != y
      s_clean = clean_dec[name, sk]['score'][:n_d] if (name, sk) in clean_dec else \
          d.decide(state, ctx, x, named_key(key, name, 'clean'))['score']
      row = {
          'spec': spec, 'norm': norm, 'eps': eps, 'n_images': n_d, 'steps': steps,
          'restarts': int(cfg.restarts), 'seconds': round(seconds, 1),
          'threshold': float(state['threshold']),
          'graybox_success': float(succ_g.mean()), 'adaptive_success': float(succ.mean()),
          'adaptive_success_float': float(succ_raw.mean()),
          'worst_case_success': float(worst.mean()),
          'm_fooled': float(fooled.mean()), 'flagged_of_fooled': float(
              np.mean(dec['flagged'][fooled])) if fooled.any() else float('nan'),
          'ball_violations': ball_violations(x_adv, x, norm, eps),
          'ball_violations_8bit': ball_violations(x_q, x, norm, eps),
          'auc': metrics.roc_auc(s_clean, dec['score'][fooled]) if fooled.sum() >= 2 else float('nan'),
          'graybox_auc': metrics.roc_auc(s_clean, dec_g['score'][a['success'][:n_d].astype(bool)])
          if a['success'][:n_d].sum() >= 2 else float('nan'),
          'mean_score_clean': float(np.mean(s_clean)), 'mean_score_adaptive': float(np.mean(dec['score'])),
      }
      if d.corrects:
        row['defense_accuracy'] = float(np.mean(dec['pred'] == y))
        row['graybox_defense_accuracy'] = float(np.mean(dec_g['pred'] == y))
        row['worst_case_defense_accuracy'] = float(np.mean((dec['pred'] == y) & (dec_g['pred'] == y)))
      rows[label] = row
      print(f'  adaptive {name} {label}: success {row["adaptive_success"]:.3f} (gray-box '
            f'{row["graybox_success"]:.3f}, worst case {row["worst_case_success"]:.3f}), '
            f'AUC {row["auc"]:.3f}, {seconds:.0f}s')
    out[name] = rows
  check = cfg.get('budget_check', None)
  if check is not None and check.get('n_images', 0) and check.defense in entries and out.get(check.defense):
    out_check = _budget_check(cfg, check, entries[check.defense], ctx, x_test, y_test, adv, key)
    if out_check:
      out[check.defense][out_check['attack']]['budget_check'] = out_check
  return out


def _budget_check(cfg, check, entry, ctx, x_test, y_test, adv, key) -> dict | None:
  """Attack success with `restarts` and `restarts + 1` restarts on the same images: more budget
  must never lower it (each example keeps its best iterate over restarts)."""
  from unmask_jax.utils import named_key
  d, states = entry
  label = check.get('attack', '') or cfg.attacks[0]
  sk = label if label in states else ''
  if label not in adv or sk not in states:
    return None
  state, a = states[sk], adv[label]
  norm, eps = str(a['norm']), float(a['eps'])
  n = min(int(check.n_images), len(x_test))
  x, y = x_test[:n], np.asarray(y_test[:n])
  target = adaptive_lib.target_of(d, state, ctx)
  rates = {}
  for restarts in (int(cfg.restarts), int(cfg.restarts) + 1):
    spec = adaptive_spec(cfg, norm, eps, int(cfg.steps), restarts)
    x_adv = np.asarray(attacks.compile_attack(spec)(ctx.logits_fn, jnp.asarray(x), jnp.asarray(y, jnp.int32),
                                                     named_key(key, 'budget'), target=target))
    x_q = round_to_8bit(x_adv, x, norm, eps)
    dec = d.decide(state, ctx, x_q, named_key(key, 'budget', 'eval'))
    m_pred = np.asarray(jnp.argmax(ctx.logits_fn(jnp.asarray(x_q)), -1))
    rates[restarts] = float(attack_success(dec, m_pred, y, d.corrects).mean())
  (r0, s0), (r1, s1) = rates.items()
  return {'attack': label, 'n_images': n, 'restarts': [r0, r1], 'success': [s0, s1]}


def sanity_checks(adaptive: dict) -> list[str]:
  """Lines for the report: every row's checks, 'OK'/'WARNING' first."""
  lines = []
  for name, rows in adaptive.items():
    for label, r in rows.items():
      ok = r['adaptive_success'] + 1e-9 >= r['graybox_success']
      lines.append(f'{"OK" if ok else "WARNING"}: {name} {label}: adaptive success '
                   f'{r["adaptive_success"]:.3f} >= gray-box {r["graybox_success"]:.3f}'
                   + ('' if ok else ' (the adaptive attack is weaker than the gray-box one here: '
                      'its surrogate or budget is at fault, not a sign of robustness)'))
      v = r['ball_violations'] + r['ball_violations_8bit']
      lines.append(f'{"OK" if v == 0 else "WARNING"}: {name} {label}: {v} images outside the '
                   f'eps-ball or [0, 1] (float and 8-bit)')
      b = r.get('budget_check')
      if b:
        ok = b['success'][1] + 1e-9 >= b['success'][0]
        lines.append(f'{"OK" if ok else "WARNING"}: {name} {label}: more restarts never lower '
                     f'success: {b["restarts"][0]} -> {b["restarts"][1]} restarts, success '
                     f'{b["success"][0]:.3f} -> {b["success"][1]:.3f} on {b["n_images"]} images')
  return lines


__all__ = ['attack_success', 'ball_violations', 'evaluate_adaptive', 'round_to_8bit',
           'sanity_checks']
