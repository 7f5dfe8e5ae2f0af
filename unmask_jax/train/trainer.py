"""`train_and_evaluate(config, workdir)`: one training loop for the victim M and the part extractor K.

* `config.task == 'classifier'`: M, cross-entropy on labels; best checkpoint by validation accuracy.
  With `config.adv_training.enabled`, every batch is replaced by PGD-L∞ examples made on the fly
  against the current weights (Madry et al. 2018) — the paper's adversarial-training baseline.
  With `config.center_loss_weight` > 0 (an `mrr_defender` model), cross-entropy + that weight x
  center loss: the MRR defenders of Rouhani et al. 2018.
* `config.task == 'segmenter'`: K, per-pixel cross-entropy over background + parts; best by
  validation mean IoU; then the part-extraction thresholds are chosen on validation and saved.

Training is data-parallel over all local devices: a 1-D `Mesh` over `jax.devices()`, the batch
sharded along it with `NamedSharding`, the state replicated (no pmap). Every epoch ends with a
checkpoint; a run killed and started again with the same command resumes from the last one and,
because data order and dropout keys are functions of (seed, epoch, step), ends with the same
parameters as an uninterrupted run.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unmask_jax import data as data_lib
from unmask_jax import errors
from unmask_jax import models
from unmask_jax.data import parts as parts_lib
from unmask_jax.data import pipeline
from unmask_jax.models import base as model_base
from unmask_jax.models import part_extraction
from unmask_jax.train import checkpoint as ckpt
from unmask_jax.utils import progress


class SimulatedKill(RuntimeError):
  """Raised by `config.debug_stop_after_steps` to test resumption."""


# ----------------------------------------------------------------------------- data

def load_splits(config) -> dict[str, data_lib.ArrayDataset]:
  """Loads train/validation/test of `config.data`, restricted to its class set if one is given."""
  return {split: data_lib.load_from_config(config.data.to_dict(), split, data_dir=config.data.data_dir)
          for split in ('train', 'validation', 'test')}


# ----------------------------------------------------------------------------- optimizer

def make_optimizer(cfg, steps_per_epoch: int, num_epochs: int) -> optax.GradientTransformation:
  total = max(steps_per_epoch * num_epochs, 1)
  warmup = int(cfg.get('warmup_epochs', 0) * steps_per_epoch)
  if cfg.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0 if warmup else cfg.learning_rate, cfg.learning_rate,
                                            max(warmup, 1), total, end_value=0.0)
  elif cfg.schedule == 'constant':
    lr = cfg.learning_rate
  else:
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
  wd = cfg.get('weight_decay', 0.0)
  if cfg.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=cfg.get('momentum', 0.9)))
  elif cfg.name == 'adam':
    tx = optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))
  elif cfg.name == 'adamw':
    tx = optax.adamw(lr, weight_decay=wd)
  elif cfg.name == 'rmsprop':
    tx = optax.chain(optax.add_decayed_weights(wd), optax.rmsprop(lr))
  else:
    raise ValueError(f"Unknown optimizer {cfg.name!r}; valid: sgd, adam, adamw, rmsprop")
  return tx


# ----------------------------------------------------------------------------- steps

def _masked_mean(x, valid):
  w = valid.astype(jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _loss(task, model, x, batch, key, center_weight: float = 0.0):
  if task == 'classifier':
    # Features and head separately, with the keys `Classifier.__call__` would derive, so that the
    # MRR defenders' center loss (CE + lambda * center loss) can see the features.
    k_features, k_head = model_base.split_key(key, 2)
    feats = model.features(x, dropout_key=k_features)
    logits = model.head(feats, dropout_key=k_head)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    if center_weight:
      ce = ce + center_weight * model.center_loss(feats, batch['label'])
    acc = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  else:  # the segmenter K has no dropout
    logits = model(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['mask'].astype(jnp.int32)).mean((1, 2))
    acc = (jnp.argmax(logits, -1) == batch['mask']).astype(jnp.float32).mean((1, 2))
  return _masked_mean(ce, batch['valid']), _masked_mean(acc, batch['valid'])


def make_steps(task: str, graphdef, adv_cfg=None, center_weight: float = 0.0):
  """Returns jitted (train_step, eval_step) over the pure state of (model, optimizer).

  `center_weight` > 0 adds that multiple of the model's `center_loss(features, labels)` to the
  cross-entropy (MRR defenders, `models.defender`).
  """

  def adversarial(model, x, y, key):
    from unmask_jax import attacks
    snapshot = nnx.state(model)
    model_graphdef = nnx.graphdef(model)

    def logits_fn(z):
      m = nnx.merge(model_graphdef, snapshot)
      m.eval()  # attack the running-average model; batch statistics are not touched
      return m(z)
    x_adv = attacks.ATTACKS.get('pgd_linf')(
        logits_fn, x, y, key, eps=adv_cfg.eps, steps=adv_cfg.steps,
        step_size=adv_cfg.step_size_factor * adv_cfg.eps / adv_cfg.steps)
    return jax.lax.stop_gradient(x_adv)

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch, key):
    model, opt = nnx.merge(graphdef, state)
    x = batch['image'].astype(jnp.float32) / 255.0
    drop_key, adv_key = jax.random.split(key)
    if adv_cfg is not None and adv_cfg.enabled:
      x = adversarial(model, x, batch['label'], adv_key)

    def loss_fn(m):
      return _loss(task, m, x, batch, drop_key, center_weight)
    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), {'loss': loss, 'accuracy': acc}

  @jax.jit
  def eval_logits(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model(batch['image'].astype(jnp.float32) / 255.0)

  return train_step, eval_logits


# ----------------------------------------------------------------------------- evaluation

def evaluate_split(task, eval_logits, state, ds, batch_size, sharding, num_outputs, extraction=None):
  """Metrics of a split; for K also per-part IoU and (given thresholds) presence P/R/F1."""
  loss_sum, correct, n = 0.0, 0.0, 0
  conf = np.zeros((num_outputs, num_outputs), np.float64)
  extracted = []
  for batch in pipeline.batches(ds.arrays, batch_size, remainder='pad'):
    valid = batch['valid']
    logits = eval_logits(state, jax.device_put(batch, sharding))
    if task == 'classifier':
      y = batch['label']
      lp = jax.nn.log_softmax(logits)
      loss_sum += float(-jnp.take_along_axis(lp, y[:, None], 1)[:, 0][valid].sum())
      correct += float((np.asarray(jnp.argmax(logits, -1)) == y)[valid].sum())
    else:
      conf += np.asarray(part_extraction.confusion(logits, batch['mask'], num_outputs, valid))
      if extraction is not None:
        e = part_extraction.extract_parts(logits, extraction['min_area'], extraction['min_conf'])
        extracted.append(np.asarray(e)[valid])
    n += int(valid.sum())
  if task == 'classifier':
    return {'loss': loss_sum / n, 'accuracy': correct / n}
  iou = part_extraction.iou_from_confusion(conf)
  present = ~np.isnan(iou[1:])
  out = {'pixel_accuracy': float(np.trace(conf) / conf.sum()),
         'mean_iou': float(np.nanmean(iou[1:])) if present.any() else float('nan'),
         'background_iou': float(iou[0]),
         'per_part_iou': {parts_lib.PART_NAMES[i]: float(iou[i + 1]) for i in np.flatnonzero(present)}}
  if extraction is not None:
    out['presence'] = part_extraction.presence_prf(np.concatenate(extracted), ds.arrays['parts'])
  return out


def choose_extraction(eval_logits, state, ds, batch_size, sharding, cfg) -> dict:
  conf_grid = tuple(cfg.conf_grid)
  stats = []
  for batch in pipeline.batches(ds.arrays, batch_size, remainder='pad'):
    logits = eval_logits(state, jax.device_put(batch, sharding))
    stats.append(np.asarray(part_extraction.area_conf_stats(logits, conf_grid))[batch['valid']])
  return part_extraction.choose_thresholds(np.concatenate(stats), ds.arrays['parts'], conf_grid,
                                           tuple(cfg.area_grid))


# ----------------------------------------------------------------------------- main loop

def model_spec(config, splits) -> dict:
  train = splits['train']
  task = config.task
  num_outputs = parts_lib.NUM_PARTS + 1 if task == 'segmenter' else train.num_classes
  spec = {
      'task': task,
      'model': config.model.name,
      'model_kwargs': dict(config.model.to_dict().get('kwargs', {})),
      'num_classes': num_outputs,
      'in_channels': int(train.image_shape[-1]),
      'image_shape': list(train.image_shape),
      'class_names': list(train.class_names),
      'dataset': config.data.name,
      # Everything but data_dir (machine-specific): later stages load exactly this data.
      'data_config': {k: v for k, v in config.data.to_dict().items() if k != 'data_dir'},
      'train_fingerprint': train.fingerprint(),
      'adv_training': bool(config.get('adv_training', {}).get('enabled', False)),
  }
  # JSON round trip: tuples become lists, exactly as the spec will read back from model.json.
  return json.loads(json.dumps(spec))


# Fields that do not change what training produces: where the data lives, and the test-only kill.
_NOT_IN_CACHE_KEY = ('debug_stop_after_steps',)


def run_config(config) -> dict:
  """The effective training config that keys the workdir's cache (stored as config.json).

  Everything that changes the result is in it (seed, epochs, optimizer, model, data selection,
  adversarial training, ...); `data.data_dir` (machine-specific) and `debug_stop_after_steps`
  (a simulated kill, after which the same command resumes) are not.
  """
  d = json.loads(config.to_json(sort_keys=True))
  for k in _NOT_IN_CACHE_KEY:
    d.pop(k, None)
  d.get('data', {}).pop('data_dir', None)
  if not d.get('init_from'):
    d.pop('init_from', None)   # training from scratch keys as before the option existed
  return d


def _init_from(model, spec: dict, init_dir: str) -> None:
  """Starts training from the weights in `init_dir` (e.g. torchvision weights converted by
  `python3 -m unmask_jax.models.torch_import`): fine-tuning instead of training from scratch.

  The model there must be the same architecture, class count and input normalization as this
  config's (`model.json`); a resumed run restores its own checkpoint over these weights.
  """
  init_model, init_spec = ckpt.load_model(init_dir)
  same = lambda v: json.dumps(v, sort_keys=True)   # JSON lists vs in-memory tuples
  diff = {k: (init_spec.get(k), spec.get(k)) for k in ('model', 'num_classes', 'in_channels', 'model_kwargs')
          if same(init_spec.get(k)) != same(spec.get(k))}
  if diff:
    raise errors.ConfigError(
        f'config.init_from={init_dir!r} holds another model than this config builds: '
        + '; '.join(f'{k} {a!r} there vs {b!r} here' for k, (a, b) in diff.items())
        + '. Set --config.model.* (and the data/class count) to match it.')
  nnx.update(model, nnx.state(init_model))


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False) -> dict:
  """Trains (resuming if possible), keeps the best checkpoint, evaluates it; returns final metrics.

  The workdir is a cache keyed by `run_config(config)` and the model spec: a rerun with the same
  config resumes (or returns the finished result), one with another config is a CheckpointError
  listing the differences, unless `overwrite` discards the old outputs first. Nothing is written
  before every check that can fail on the config has passed.
  """
  task = config.task
  if task not in ('classifier', 'segmenter'):
    raise ValueError(f"config.task must be 'classifier' or 'segmenter', got {task!r}")
  splits = load_splits(config)
  spec = model_spec(config, splits)
  key = run_config(config)
  if overwrite and os.path.isdir(workdir):
    removed = ckpt.clear_training_outputs(workdir)
    if removed:
      print(f'--overwrite: removed the previous training outputs in {workdir} ({", ".join(removed)})')
  ckpt.check_model_spec(workdir, spec)
  ckpt.check_run_config(workdir, key)
  final_path = os.path.join(workdir, 'final.json')

  devices = jax.devices()
  mesh = Mesh(np.array(devices), ('data',))
  data_sharding = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  bs = config.batch_size
  if bs % len(devices):
    raise ValueError(f'batch_size {bs} must be divisible by the {len(devices)} devices')

  model = models.create(spec['model'], num_classes=spec['num_classes'],
                        in_channels=spec['in_channels'], rngs=nnx.Rngs(config.seed),
                        **spec['model_kwargs'])
  if config.get('init_from', ''):
    _init_from(model, spec, config.init_from)
  model.train()
  train_arrays = {k: v for k, v in splits['train'].arrays.items()
                  if k in (('image', 'label') if task == 'classifier' else ('image', 'mask'))}
  steps_per_epoch = len(splits['train']) // bs
  if steps_per_epoch == 0:
    raise ValueError(f'train split ({len(splits["train"])}) is smaller than batch_size {bs}; '
                     'lower --config.batch_size or use more training data')
  center_weight = float(config.get('center_loss_weight', 0.0))
  if center_weight and not hasattr(model, 'center_loss'):
    raise ValueError(f'center_loss_weight={center_weight} needs a model with class centres '
                     f"(model.name='mrr_defender'), got {spec['model']!r}")
  tx = make_optimizer(config.optimizer, steps_per_epoch, config.num_epochs)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  # Every check passed: record what this workdir holds, then train.
  ckpt.write_model_spec(workdir, spec)
  ckpt.write_run_config(workdir, key)
  latest = ckpt.manager(workdir, 'latest')
  best = ckpt.manager(workdir, 'best')
  start_epoch, best_metric = 0, -np.inf
  if latest.latest_step() is not None:
    state, meta = ckpt.restore(latest, state)
    start_epoch, best_metric = meta['epoch'] + 1, meta['best_metric']
  state = jax.device_put(state, replicated)

  adv_cfg = config.get('adv_training', None)
  train_step, eval_logits = make_steps(task, graphdef, adv_cfg, center_weight)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  _truncate_metrics(metrics_path, start_epoch)
  best_key = 'accuracy' if task == 'classifier' else 'mean_iou'
  root_key = jax.random.key(config.seed)
  eval_bs = config.get('eval_batch_size', bs)
  t0 = time.time()
  steps_done = 0
  stop_after = config.get('debug_stop_after_steps', 0)

  for epoch in range(start_epoch, config.num_epochs):
    bar = progress(pipeline.batches(train_arrays, bs, seed=config.seed, epoch=epoch, remainder='drop'),
                   total=steps_per_epoch, desc=f'{task} epoch {epoch + 1}/{config.num_epochs}')
    run_loss = run_acc = 0.0
    for i, batch in enumerate(bar):
      step = epoch * steps_per_epoch + i
      key = jax.random.fold_in(root_key, step)
      state, m = train_step(state, jax.device_put(batch, data_sharding), key)
      steps_done += 1
      if stop_after and steps_done >= stop_after:
        raise SimulatedKill(f'stopped after {steps_done} steps (debug_stop_after_steps)')
      if i % 10 == 0 or i == steps_per_epoch - 1:
        run_loss, run_acc = float(m['loss']), float(m['accuracy'])
        bar.set_postfix(loss=f'{run_loss:.3f}', acc=f'{run_acc:.3f}', refresh=False)
    val = evaluate_split(task, eval_logits, state, splits['validation'], eval_bs, data_sharding,
                         spec['num_classes'])
    improved = val[best_key] > best_metric
    if improved:
      best_metric = val[best_key]
      model_state = state[0]
      ckpt.save(best, epoch, model_state, {'epoch': epoch, best_key: val[best_key]})
    ckpt.save(latest, epoch, state, {'epoch': epoch, 'best_metric': float(best_metric)})
    row = {'epoch': epoch + 1, 'train_loss': run_loss, 'train_accuracy': run_acc,
           **{f'val_{k}': v for k, v in val.items() if not isinstance(v, dict)},
           'best': bool(improved), 'elapsed_s': round(time.time() - t0, 2)}
    with open(metrics_path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    print(f'  epoch {epoch + 1}: ' + ', '.join(f'{k}={v:.4f}' for k, v in row.items()
                                                if isinstance(v, float) and k != 'elapsed_s'))

  if os.path.exists(final_path) and start_epoch >= config.num_epochs:
    latest.close(), best.close()
    return ckpt.read_json(final_path)

  # Evaluate the best checkpoint (not the last epoch) on test.
  model_state, _ = ckpt.restore(best, state[0])
  state = nnx.State({0: jax.device_put(model_state, replicated), 1: state[1]})
  final = {'train_seconds_this_run': round(time.time() - t0, 1), 'epochs': config.num_epochs}
  if task == 'segmenter':
    extraction = choose_extraction(eval_logits, state, splits['validation'], eval_bs, data_sharding,
                                   config.extraction)
    ckpt.write_json_atomic(os.path.join(workdir, 'extraction.json'), extraction)
    final['extraction'] = extraction
    final['test'] = evaluate_split(task, eval_logits, state, splits['test'], eval_bs, data_sharding,
                                   spec['num_classes'], extraction=extraction)
  else:
    final['test'] = evaluate_split(task, eval_logits, state, splits['test'], eval_bs, data_sharding,
                                   spec['num_classes'])
  final['validation_best'] = float(best_metric)
  ckpt.write_json_atomic(final_path, final)
  latest.close(), best.close()
  return final


def _truncate_metrics(path: str, start_epoch: int) -> None:
  """On resume, drop rows of epochs that will be re-run, so the log has each epoch once."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  keep = [r for r in rows if r['epoch'] <= start_epoch]
  if len(keep) == len(rows):   # a finished (or cleanly stopped) run: leave the log untouched
    return
  with open(path, 'w') as f:
    for r in keep:
      f.write(json.dumps(r) + '\n')
