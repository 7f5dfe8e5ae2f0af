"""Checkpoints: one small module around `orbax.checkpoint.CheckpointManager`.

A training workdir holds
  model.json        what the model is (registry name, kwargs, classes, input shape, data fingerprint)
  ckpt/latest/<step>  model + optimizer state + loop position, for auto-resume (newest only)
  ckpt/best/<step>    model state of the best validation epoch (what later stages load)
Orbax writes each step to a temporary folder and renames it when complete, so a run killed while
saving leaves no checkpoint that looks finished. A checkpoint that is present but unreadable is an
error, never a silent fresh start over it.

Integrity: every save records the sha256 of each saved array (with its dtype and shape) in the
step's metadata, and every restore recomputes and compares them, so a checkpoint whose bytes were
changed after saving (a bad disk, a partial copy) is an error naming the array, not a model with
garbage weights. `save_npz_verified` / `load_npz_verified` do the same for plain .npz files (attack
results, fitted defense states): an atomic write plus a `<file>.sha256` sidecar checked at load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from unmask_jax import errors

MODEL_SPEC = 'model.json'
RUN_CONFIG = 'config.json'
HASH_KEY = 'sha256'          # in a checkpoint's meta: {array path: sha256}
SIDECAR = '.sha256'          # <file>.npz.sha256 beside a verified .npz
# What train_and_evaluate writes in a workdir; --overwrite removes exactly these.
TRAINING_OUTPUTS = ('ckpt', MODEL_SPEC, RUN_CONFIG, 'metrics.jsonl', 'final.json', 'extraction.json')


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint or stage output is missing, damaged, or belongs to another model or config."""


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file: a killed run leaves the old file or the new
  one, never half of it."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str) -> Any:
  """Reads a JSON file; a damaged (e.g. truncated) one is an error naming the file."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path} is damaged (not valid JSON: {e}); delete it (or its workdir) and '
                          're-run the stage that wrote it.') from None


def _differences(stored: dict, wanted: dict, prefix: str = '') -> list[tuple[str, Any, Any]]:
  """(dotted key, stored value, wanted value) for every leaf that differs, nested dicts flattened."""
  out = []
  for k in sorted(set(stored) | set(wanted), key=str):
    a, b = stored.get(k, '<absent>'), wanted.get(k, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append((f'{prefix}{k}', a, b))
  return out


def _format_differences(diff, limit: int = 8) -> str:
  shown = '; '.join(f'{k}: stored {a!r}, now {b!r}' for k, a, b in diff[:limit])
  return shown + (f'; and {len(diff) - limit} more' if len(diff) > limit else '')


def check_model_spec(workdir: str, spec: dict) -> None:
  """Errors if `workdir` holds a model.json that differs from `spec` (another model or data).

  Writes nothing: `write_model_spec` does, once the whole config has been checked, so that a
  failing run never leaves a model.json behind.
  """
  path = os.path.join(workdir, MODEL_SPEC)
  if not os.path.exists(path):
    return
  diff = _differences(read_json(path), spec)
  if diff:
    raise CheckpointError(f'The workdir {workdir} holds a checkpoint of another model or data '
                          f'({_format_differences(diff)}); use a new --workdir, or --overwrite to '
                          'discard it and train from scratch.')


def write_model_spec(workdir: str, spec: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(os.path.join(workdir, MODEL_SPEC)):
    write_json_atomic(os.path.join(workdir, MODEL_SPEC), spec)


def check_run_config(workdir: str, run_config: dict, what: str = 'training') -> None:
  """Errors if `workdir` was (or is being) produced with another effective config.

  A stage's outputs are a cache keyed by everything that changes them (seed, epochs, optimizer,
  ...). Reusing them under another config would return results that do not belong to it, so a
  difference is an error listing the differing fields. A workdir with checkpoints but no record of
  its config (made before configs were recorded) cannot be matched and is an error too.
  """
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    if os.path.isdir(os.path.join(workdir, 'ckpt')) and any(
        files for _, _, files in os.walk(os.path.join(workdir, 'ckpt'))):
      raise CheckpointError(f'{workdir} holds {what} outputs but no record of the config that made them '
                            f'({RUN_CONFIG} missing, an older version); rerun with --overwrite to redo '
                            'them, or use a new --workdir.')
    return
  diff = _differences(read_json(path), run_config)
  if diff:
    raise CheckpointError(f'{workdir} holds {what} outputs made with another config '
                          f'({_format_differences(diff)}); rerun with --overwrite to discard them and '
                          'start fresh, use a new --workdir, or restore the old values.')


def write_run_config(workdir: str, run_config: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(os.path.join(workdir, RUN_CONFIG)):
    write_json_atomic(os.path.join(workdir, RUN_CONFIG), run_config)


def clear_training_outputs(workdir: str) -> list[str]:
  """Removes what training wrote in `workdir` (for --overwrite); returns the removed names.

  Only the known outputs go: anything else a user keeps in the workdir stays.
  """
  removed = []
  for name in TRAINING_OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    else:
      continue
    removed.append(name)
  return removed


# ----------------------------------------------------------------------------- integrity

def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def sha256_of_array(x) -> str:
  """sha256 of an array's dtype, shape and bytes (PRNG key arrays by their key data)."""
  if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  a = np.ascontiguousarray(np.asarray(x))
  h = hashlib.sha256(f'{a.dtype.str}{a.shape}'.encode())
  h.update(a.tobytes())
  return h.hexdigest()


def tree_hashes(tree) -> dict[str, str]:
  """{'/'-joined key path: sha256} for every array leaf of a pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_key_name(k) for k in path): sha256_of_array(x) for path, x in leaves}


def verify_tree(tree, recorded: dict[str, str], where: str) -> None:
  """Errors unless every array of `tree` has the sha256 recorded when it was saved."""
  actual = tree_hashes(tree)
  missing = sorted(set(recorded) - set(actual))
  bad = [k for k in sorted(actual) if recorded.get(k) != actual[k]]
  if missing or bad:
    if missing:
      what = f'arrays {missing[:3]} are missing'
    else:
      what = f'array {bad[0]!r} does not match the sha256 recorded when it was saved'
      what += f' ({len(bad)} arrays differ)' if len(bad) > 1 else ''
    raise CheckpointError(f'{where} is corrupted: {what}. '
                          'Delete it (or the workdir) and train again (or rerun with --overwrite); a '
                          'damaged checkpoint is never loaded.')


def save_npz_verified(path: str, arrays: dict) -> None:
  """Writes `arrays` (name -> array) to `path` (.npz) atomically, with a sha256 per array.

  The checksums go to `<path>.sha256` (JSON), so readers that use plain `np.load` keep working;
  `load_npz_verified` checks them. The sidecar is replaced before the .npz: a run killed between
  the two leaves a pair that fails verification (an error), never a file that passes with the
  wrong content.
  """
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  tmp = f'{path}.tmp.npz'
  np.savez(tmp, **arrays)
  write_json_atomic(path + SIDECAR, {'file': os.path.basename(path),
                                     'arrays': {k: sha256_of_array(v) for k, v in arrays.items()}})
  os.replace(tmp, path)


def load_npz_verified(path: str) -> dict[str, np.ndarray]:
  """Reads a .npz written by `save_npz_verified`; a missing checksum or any changed byte is an error."""
  if not os.path.exists(path):
    raise errors.MissingInputError(f'{path} is missing; re-run the stage that writes it.')
  sidecar = path + SIDECAR
  if not os.path.exists(sidecar):
    raise CheckpointError(f'{path} has no checksum file ({os.path.basename(sidecar)} missing: written by '
                          'an older version, or copied without it), so its content cannot be verified; '
                          're-run the stage that wrote it (with --overwrite).')
  recorded = read_json(sidecar).get('arrays', {})
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile / numpy raise many types; all mean a damaged file
    raise CheckpointError(f'{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged: '
                          'delete it and re-run the stage that wrote it (with --overwrite).') from None
  if set(arrays) != set(recorded):
    raise CheckpointError(f'{path} holds arrays {sorted(arrays)} but {sorted(recorded)} were saved; '
                          'it is damaged or was replaced: re-run the stage that wrote it (with --overwrite).')
  for k in sorted(arrays):
    if sha256_of_array(arrays[k]) != recorded[k]:
      raise CheckpointError(f'{path} is corrupted: array {k!r} does not match the sha256 recorded when '
                            'it was saved; delete it and re-run the stage that wrote it (with --overwrite).')
  return arrays


def manager(workdir: str, which: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'ckpt', which)),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  meta = {**meta, HASH_KEY: tree_hashes(pure)}
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(pure),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, state: nnx.State, step: int | None = None):
  """Restores into the structure of `state` (updated in place); returns (state, meta)."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no checkpoint in {mgr.directory}')
  pure = nnx.to_pure_dict(state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)
  try:
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types; all mean the same thing to a user
    detail = (str(e).split('See full TensorStore')[0].strip().splitlines() or [''])[0][:200]
    raise CheckpointError(
        f'The checkpoint {mgr.directory}/{step} exists but cannot be read ({type(e).__name__}: '
        f'{detail}). It may be corrupted or from an incompatible model. Delete it (or the '
        'workdir) to start over, or rerun with --overwrite; it is never overwritten silently.') from e
  meta = dict(out['meta'])
  recorded = meta.pop(HASH_KEY, None)
  if recorded is not None:   # checkpoints saved before hashes were recorded load unverified
    verify_tree(out['state'], recorded, f'The checkpoint {mgr.directory}/{step}')
  nnx.replace_by_pure_dict(state, out['state'])
  return state, meta


def read_raw(workdir: str, which: str = 'latest') -> dict:
  """The newest checkpoint's saved tree as nested dicts of arrays, without a model to restore into
  (for inspection and tests: for 'latest' it holds the model under '0' and the optimizer under '1')."""
  mgr = manager(workdir, which)
  try:
    out = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                  meta=ocp.args.JsonRestore()))
  finally:
    mgr.close()
  recorded = dict(out['meta']).get(HASH_KEY)
  if recorded is not None:
    verify_tree(out['state'], recorded, f'The checkpoint {mgr.directory}')
  return out['state']


def model_fingerprint(model) -> str:
  """A short hash of a model's weights (and BatchNorm statistics), to tie stage outputs to it."""
  h = hashlib.sha1()
  for leaf in jax.tree.leaves(nnx.state(model)):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def load_model(workdir: str, which: str = 'best'):
  """Rebuilds a trained model from its workdir: returns (model in eval mode, spec dict)."""
  from unmask_jax import models
  if not workdir:
    raise errors.ConfigError('The model directory is empty (""); point it at a train_m.py / train_k.py workdir.')
  path = os.path.join(workdir, MODEL_SPEC)
  if not os.path.exists(path):
    raise CheckpointError(f'No trained model in {workdir} ({MODEL_SPEC} missing): train it first '
                          '(train_m.py / train_k.py with --workdir pointing there).')
  spec = read_json(path)
  model = models.create(spec['model'], num_classes=spec['num_classes'],
                        in_channels=spec['in_channels'], rngs=nnx.Rngs(0), **spec['model_kwargs'])
  # Checked before opening a manager, which would create the (empty) folder.
  if not os.path.isdir(os.path.join(workdir, 'ckpt', which)):
    raise CheckpointError(f'{workdir} has no finished {which!r} checkpoint: run its training to the end.')
  mgr = manager(workdir, which)
  if mgr.latest_step() is None:
    mgr.close()
    raise CheckpointError(f'{workdir} has no finished {which!r} checkpoint: run its training to the end.')
  state = nnx.state(model)
  restore(mgr, state)
  nnx.update(model, state)
  mgr.close()
  model.eval()
  return model, spec
