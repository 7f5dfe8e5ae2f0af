"""Checkpoints: one small module around `orbax.checkpoint.CheckpointManager`.

A training workdir holds
  model.json        what the model is (registry name, kwargs, classes, input shape, data fingerprint)
  ckpt/latest/<step>  model + optimizer state + loop position, for auto-resume (newest only)
  ckpt/best/<step>    model state of the best validation epoch (what later stages load)
Orbax writes each step to a temporary folder and renames it when complete, so a run killed while
saving leaves no checkpoint that looks finished. A checkpoint that is present but unreadable is an
error, never a silent fresh start over it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

MODEL_SPEC = 'model.json'


class CheckpointError(RuntimeError):
  pass


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def check_model_spec(workdir: str, spec: dict) -> None:
  """Writes model.json on first use; afterwards errors if `spec` differs from the stored one."""
  path = os.path.join(workdir, MODEL_SPEC)
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(path, spec)
    return
  stored = read_json(path)
  diff = {k: (stored.get(k), spec.get(k)) for k in sorted(set(stored) | set(spec))
          if stored.get(k) != spec.get(k)}
  if diff:
    lines = '\n'.join(f'  {k}: checkpoint has {a!r}, config asks for {b!r}' for k, (a, b) in diff.items())
    raise CheckpointError(f'The workdir {workdir} holds a checkpoint of another model or data:\n{lines}\n'
                          'Use a new --workdir, or delete the old one to start over.')


def manager(workdir: str, which: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'ckpt', which)),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
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
    raise CheckpointError(
        f'The checkpoint {mgr.directory}/{step} exists but cannot be read ({type(e).__name__}: '
        f'{str(e)[:300]}). It may be corrupted or from an incompatible model. Delete it (or the '
        'workdir) to start over; it is never overwritten silently.') from e
  nnx.replace_by_pure_dict(state, out['state'])
  return state, dict(out['meta'])


def read_raw(workdir: str, which: str = 'latest') -> dict:
  """The newest checkpoint's saved tree as nested dicts of arrays, without a model to restore into
  (for inspection and tests: for 'latest' it holds the model under '0' and the optimizer under '1')."""
  mgr = manager(workdir, which)
  try:
    out = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                  meta=ocp.args.JsonRestore()))
  finally:
    mgr.close()
  return out['state']


def model_fingerprint(model) -> str:
  """A short hash of a model's weights (and BatchNorm statistics), to tie stage outputs to it."""
  import hashlib
  import numpy as np
  h = hashlib.sha1()
  for leaf in jax.tree.leaves(nnx.state(model)):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def load_model(workdir: str, which: str = 'best'):
  """Rebuilds a trained model from its workdir: returns (model in eval mode, spec dict)."""
  from unmask_jax import models
  path = os.path.join(workdir, MODEL_SPEC)
  if not os.path.exists(path):
    raise CheckpointError(f'No trained model in {workdir} ({MODEL_SPEC} missing): train it first '
                          '(train_m.py / train_k.py with --workdir pointing there).')
  spec = read_json(path)
  model = models.create(spec['model'], num_classes=spec['num_classes'],
                        in_channels=spec['in_channels'], rngs=nnx.Rngs(0), **spec['model_kwargs'])
  mgr = manager(workdir, which)
  if mgr.latest_step() is None:
    raise CheckpointError(f'{workdir} has no finished {which!r} checkpoint: run its training to the end.')
  state = nnx.state(model)
  restore(mgr, state)
  nnx.update(model, state)
  mgr.close()
  model.eval()
  return model, spec
