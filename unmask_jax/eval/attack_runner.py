"""Runs a list of attacks against a trained victim M and stores the results.

For each attack `label=spec` the runner writes `<workdir>/<label>.npz` atomically (adversarial
images, labels, clean and adversarial predictions, per-example success, perturbation norms) with
a sha256 per array (`<label>.npz.sha256`, see `checkpoint.save_npz_verified`; read results back
with `load_result`) and records it in `<workdir>/attacks.json`, with fingerprints of the model and
the data and the attack's cache key (spec, seed, batch size, position in the list: everything
its result depends on). A rerun skips the attacks recorded under the same key; one with another
key is an error listing the differences unless `overwrite`; a run killed mid-attack leaves no
file that looks complete.

Success counts only inputs that M classifies correctly when clean: success rate =
#(clean correct and adversarial wrong) / #(clean correct). Robust accuracy is over all inputs.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax import attacks as attacks_lib
from unmask_jax import data as data_lib
from unmask_jax import errors
from unmask_jax import parallel
from unmask_jax.data import pipeline
from unmask_jax.eval import report
from unmask_jax.models import functional
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.utils import progress

INDEX = 'attacks.json'
PAPER_REFERENCE_PIXELS = 150 * 150 * 3   # the paper's L2 eps are for 150x150 RGB images


def paper_attacks(image_shape, steps: int = 20, with_fgsm: bool = True) -> list[str]:
  """The paper's 8 attack vectors as "label=spec" strings for images of `image_shape`.

  PGD-L∞ and MI-FGSM-L∞ at eps 8/255 and 16/255; PGD-L2 and MI-FGSM-L2 at 300/255 and 600/255
  for 150x150x3 images, rescaled by sqrt(pixels / (150*150*3)) so that the per-pixel RMS
  perturbation is the paper's (e.g. x0.213 at 32x32x3). FGSM at the L∞ eps is added as the
  single-step reference of the sanity checks.
  """
  scale = math.sqrt(float(np.prod(image_shape)) / PAPER_REFERENCE_PIXELS)
  out = []
  for e in (8, 16):
    if with_fgsm:
      out.append(f'FGSM-Linf-{e}=fgsm(eps={e}/255)')
    out.append(f'PGD-Linf-{e}=pgd_linf(eps={e}/255, steps={steps})')
    out.append(f'MIFGSM-Linf-{e}=mifgsm_linf(eps={e}/255, steps={steps}, decay=1.0)')
  for e in (300, 600):
    out.append(f'PGD-L2-{e}=pgd_l2(eps={e / 255 * scale!r}, steps={steps})')
    out.append(f'MIFGSM-L2-{e}=mifgsm_l2(eps={e / 255 * scale!r}, steps={steps}, decay=1.0)')
  return out


def split_label(entry: str) -> tuple[str, str]:
  label, sep, spec = entry.partition('=')
  if not sep or not label.strip() or '(' in label:
    spec = entry
    label = entry.split('(')[0]
  return label.strip(), spec.strip()


_COMPILED: dict = {}


def compiled(aspec):
  """One jitted program per (attack, non-eps parameters), shared across eps values and models.

  eps (and step_size) are passed as traced scalars, so e.g. PGD-L∞ at 8/255 and 16/255, and the
  same attack on M and on AT-M (same architecture), reuse one compilation; compiling is most of
  an attack's cost on a CPU. The spec was range-checked by `parse_attack` already.
  """
  static = {k: v for k, v in aspec.params.items() if k not in ('eps', 'step_size')}
  key = (aspec.name, tuple(sorted(static.items())))
  if key not in _COMPILED:
    import functools
    fn = functools.partial(aspec.fn, **static)
    # AutoAttack jits its members itself (and skips them on the host once all is fooled).
    _COMPILED[key] = fn if attacks_lib.compiles_itself(aspec.fn) else jax.jit(fn)
  fn = _COMPILED[key]
  dynamic = {k: jnp.float32(v) for k, v in aspec.params.items() if k in ('eps', 'step_size') and v is not None}
  return lambda logits_fn, x, y, key: fn(logits_fn, x, y, key, **dynamic)


def result_path(workdir: str, label: str) -> str:
  return os.path.join(workdir, f'{label}.npz')


def load_result(workdir: str, label: str) -> dict[str, np.ndarray]:
  """One attack's stored arrays, verified against the sha256 recorded when they were written."""
  return ckpt.load_npz_verified(result_path(workdir, label))


def _check_label(label: str) -> None:
  # Labels become file names; a path separator would write outside the workdir.
  if not label or label.startswith('.') or any(c in label for c in '/\\:*?"<>|') or label != label.strip():
    raise errors.ConfigError(f'attack label {label!r} cannot be a file name; use letters, digits, "-" and "_" '
                             '(e.g. "PGD8=pgd_linf(eps=8/255)")')


def parse_entries(entries) -> list[tuple[str, attacks_lib.AttackSpec]]:
  """Parses "label=spec" entries (all first, so a typo fails before any work); labels unique."""
  parsed = []
  for entry in entries:
    label, s = split_label(entry)
    _check_label(label)
    parsed.append((label, attacks_lib.parse_attack(s)))
  if len({l for l, _ in parsed}) != len(parsed):
    raise errors.ConfigError(f'attack labels must be unique: {[l for l, _ in parsed]}')
  return parsed


def load_victim(model_dir: str):
  model, spec = ckpt.load_model(model_dir)
  return model, spec, ckpt.model_fingerprint(model)


def run_attacks(config, workdir: str, *, overwrite: bool = False) -> list[dict]:
  """Attacks the model in `config.model_dir` on `config.split` of its own data; returns summary rows.

  Everything that can fail on the inputs (the model, the attack specs, an existing workdir of
  another model or config) is checked before the workdir is created or anything is computed.
  `overwrite` redoes every listed attack (and drops the index of another model or data).
  """
  model, spec, model_fp = load_victim(config.model_dir)
  if spec['task'] != 'classifier':
    raise errors.ConfigError(f'{config.model_dir} holds a {spec["task"]}, not a classifier M; point '
                             '--config.model_dir at a train_m.py workdir')
  ds = data_lib.load_from_config(spec['data_config'], config.split, data_dir=config.data_dir)
  if config.get('max_examples', 0):
    ds = ds.take(slice(0, config.max_examples))
  data_fp = ds.fingerprint()
  entries = (list(config.attacks) or paper_attacks(ds.image_shape, steps=config.get('steps', 20))) \
      + list(config.get('extra_attacks', ()))
  parsed = parse_entries(entries)
  bs = config.batch_size
  keys = {label: {'spec': str(aspec), 'seed': int(config.seed), 'batch_size': int(bs), 'position': a_i}
          for a_i, (label, aspec) in enumerate(parsed)}

  index_path = os.path.join(workdir, INDEX)
  index = ckpt.read_json(index_path) if os.path.exists(index_path) else {}
  before = json.dumps(index, sort_keys=True)
  if index and (index.get('model_fingerprint') != model_fp or index.get('data_fingerprint') != data_fp):
    if not overwrite:
      raise errors.ConfigError(
          f'{workdir} holds attack results for another model or dataset (model '
          f'{index.get("model_fingerprint")} vs {model_fp}, data {index.get("data_fingerprint")} vs '
          f'{data_fp}); use another --workdir, or --overwrite to discard them.')
    index = {}
  stale = []
  for label, key in keys.items():
    row = index.get('attacks', {}).get(label)
    if row is None:
      continue
    old = row.get('cache_key', {'spec': row.get('spec')})
    diff = [f'{k}: stored {old.get(k, "<not recorded>")!r}, now {v!r}' for k, v in key.items() if old.get(k) != v]
    if diff:
      stale.append(f'{label} ({", ".join(diff)})')
  if stale and not overwrite:
    raise errors.ConfigError(f'{workdir} holds results of these attacks made with other parameters: '
                             f'{"; ".join(stale)}. Rerun with --overwrite to redo them, use another '
                             '--workdir, or restore the old values.')
  os.makedirs(workdir, exist_ok=True)
  index.update({'model_dir': os.path.abspath(config.model_dir), 'model_fingerprint': model_fp,
                'data_fingerprint': data_fp, 'split': config.split, 'class_names': list(ds.class_names),
                'image_shape': list(ds.image_shape), 'n': len(ds)})
  index.setdefault('attacks', {})

  # Every batch is sharded over all local devices (on a CPU, the host devices the scripts create,
  # one per core by default; see `unmask_jax.parallel`); the results do not depend on how many.
  logits_fn = functional.logits_fn(model)
  predict = parallel.sharded(jax.jit(lambda f, x: jnp.argmax(f(x), -1)), batch_argnums=(1,))
  x_all = pipeline.to_float(ds.arrays['image'])
  y_all = ds.arrays['label']
  pipeline.validate_images(x_all, channels=spec['in_channels'])
  pipeline.validate_labels(y_all, spec['num_classes'])
  clean_pred = np.concatenate([
      np.asarray(predict(logits_fn, pipeline.to_float(b['image'])))[b['valid']]
      for b in pipeline.batches(ds.arrays, bs)])
  root = jax.random.key(config.seed)

  for a_i, (label, aspec) in enumerate(parsed):
    done = index['attacks'].get(label)
    path = result_path(workdir, label)
    if done and not overwrite and done.get('cache_key') == keys[label] and os.path.exists(path):
      ckpt.load_npz_verified(path)   # a damaged result is an error, never reused
      print(f'  {label}: already done with the same parameters, skipped')
      continue
    fn = parallel.sharded(compiled(aspec), batch_argnums=(1, 2))
    key = jax.random.fold_in(root, a_i)
    x_adv = []
    t0 = time.time()
    for b_i, b in enumerate(progress(pipeline.batches(ds.arrays, bs), total=pipeline.num_batches(len(ds), bs),
                                     desc=label)):
      xa = fn(logits_fn, pipeline.to_float(b['image']), b['label'], jax.random.fold_in(key, b_i))
      x_adv.append(np.asarray(xa)[b['valid']])
    x_adv = np.concatenate(x_adv)
    seconds = time.time() - t0
    adv_pred = np.concatenate([
        np.asarray(predict(logits_fn, pipeline.to_float(b['image'])))[b['valid']]
        for b in pipeline.batches({'image': x_adv}, bs)])
    delta = (x_adv - x_all).reshape(len(x_all), -1)
    linf = np.abs(delta).max(1)
    l2 = np.linalg.norm(delta, axis=1)
    correct = clean_pred == y_all
    success = correct & (adv_pred != y_all)
    eps = aspec.eps
    norm = aspec.norm
    tol = 1e-5
    in_ball = bool(eps is None or (linf if norm == 'linf' else l2).max() <= eps * (1 + tol) + tol)
    in_box = bool(x_adv.min() >= 0.0 and x_adv.max() <= 1.0)
    ckpt.save_npz_verified(path, {'x_adv': x_adv.astype(np.float32), 'label': y_all,
                                  'clean_pred': clean_pred, 'adv_pred': adv_pred, 'success': success,
                                  'linf': linf, 'l2': l2})
    row = {'attack': label, 'spec': str(aspec), 'cache_key': keys[label], 'norm': norm, 'eps': eps,
           'clean_accuracy': float(correct.mean()), 'robust_accuracy': float((adv_pred == y_all).mean()),
           'success_rate': float(success.sum() / max(correct.sum(), 1)),
           'mean_norm': float((linf if norm == 'linf' else l2).mean()),
           'max_norm': float((linf if norm == 'linf' else l2).max()),
           'in_eps_ball': in_ball, 'in_0_1': in_box, 'seconds': round(seconds, 2)}
    index['attacks'][label] = row
    ckpt.write_json_atomic(index_path, index)  # recorded only after the npz is complete

  rows = [index['attacks'][l] for l, _ in parsed]
  index['order'] = [l for l, _ in parsed]   # the JSON is key-sorted; keep the run order
  index['sanity'] = sanity_checks(rows)
  if json.dumps(index, sort_keys=True) != before:  # untouched when nothing ran: later stages stay cached
    ckpt.write_json_atomic(index_path, index)
  return rows


def sanity_checks(rows: list[dict], broken_threshold: float = 0.05) -> list[dict]:
  """Checks every attack report should pass (Carlini et al. 2019); each a dict name/ok/detail."""
  checks = []
  for r in rows:
    ok = r['in_eps_ball'] and r['in_0_1']
    checks.append({'check': f'{r["attack"]}: x_adv in eps-ball and [0,1]', 'ok': ok,
                   'detail': f'max {r["norm"]} norm {r["max_norm"]:.4g} vs eps {r["eps"]}'})
  families: dict[tuple, list] = {}
  for r in rows:
    families.setdefault((r['spec'].split('(')[0], r['norm']), []).append(r)
  for (name, _), rs in families.items():
    rs = sorted([r for r in rs if r['eps'] is not None], key=lambda r: r['eps'])
    for lo, hi in zip(rs, rs[1:]):
      ok = hi['success_rate'] >= lo['success_rate'] - 1e-9
      checks.append({'check': f'{name}: success non-decreasing in eps', 'ok': ok,
                     'detail': f'{lo["attack"]} {lo["success_rate"]:.3f} -> {hi["attack"]} {hi["success_rate"]:.3f}'})
  fgsm = {r['eps']: r for r in rows if r['spec'].startswith('fgsm(')}
  for r in rows:
    if r['norm'] == 'linf' and not r['spec'].startswith('fgsm(') and r['eps'] in fgsm:
      f = fgsm[r['eps']]
      ok = r['success_rate'] >= f['success_rate'] - 1e-9
      checks.append({'check': f'{r["attack"]} at least as strong as FGSM at the same eps', 'ok': ok,
                     'detail': f'{r["success_rate"]:.3f} vs {f["success_rate"]:.3f}'})
  iterative = [r for r in rows if not r['spec'].startswith('fgsm(') and r['eps'] is not None]
  if iterative:
    for norm in sorted({r['norm'] for r in iterative}):
      top = max((r for r in iterative if r['norm'] == norm), key=lambda r: r['eps'])
      strongest = min(r['robust_accuracy'] for r in iterative if r['norm'] == norm and r['eps'] == top['eps'])
      checks.append({'check': f'undefended M broken at the largest {norm} eps', 'ok': strongest <= broken_threshold,
                     'detail': f'robust accuracy {strongest:.3f} (want <= {broken_threshold})'})
  return checks


def print_results(rows: list[dict], checks: list[dict]) -> str:
  cols = ['attack', 'norm', 'eps', 'clean_accuracy', 'robust_accuracy', 'success_rate',
          'mean_norm', 'max_norm', 'seconds']
  text = report.table(rows, cols)
  text += '\n(success rate counts only inputs M classifies correctly when clean)\n\nSanity checks:\n'
  for c in checks:
    text += f'  [{"ok" if c["ok"] else "WARNING"}] {c["check"]}: {c["detail"]}\n'
  print(text)
  return text
