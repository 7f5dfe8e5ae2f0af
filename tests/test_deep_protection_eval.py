"""unmask_jax.eval.deep_protection_eval: one DIP trajectory per image gives the fixed, auto and
oracle stops.

lr 0.02 and EMA 0.9 (instead of 0.01 and 0.99) make the outputs move within 60 iterations, so the
chosen fixed stop and the auto and oracle stops land on different, non-final checkpoints.

A tiny generator on 8x8 images (one compile: batch bucket 8, segments of 10 iterations) and a
fake linear 3-class victim keep this file to a few seconds of restoration.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from unmask_jax.defenses import base
from unmask_jax.defenses import deep_protection as dp
from unmask_jax.eval import deep_protection_eval as dpe

SHAPE = (8, 8, 3)
CFG = dict(n_images=4, val_size=4, max_iters=60, check_every=10, chunk=8, widths=(8, 16),
           input_depth=4, min_iters=20, auto_tol=0.3, lr=0.02, ema=0.9)


def _logits(w, x):
  return jnp.reshape(x - 0.5, (x.shape[0], -1)) @ w


def _fake_ctx(seed=0, num_classes=3):
  w = jax.random.normal(jax.random.key(seed), (math.prod(SHAPE), num_classes)) * 0.5
  return base.Context(logits_fn=Partial(_logits, w), num_classes=num_classes)


def _images(n, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:8, 0:8] / 7.0
  out = []
  for _ in range(n):
    a, b, c = rng.uniform(0.2, 0.8, 3)
    img = np.stack([a + 0.2 * xx, b - 0.2 * yy, c + 0.1 * np.sin(3 * xx + 2 * yy)], -1)
    out.append(img + rng.normal(0, 0.02, SHAPE))
  return np.clip(np.stack(out), 0, 1).astype(np.float32)


def _setup():
  ctx = _fake_ctx()
  x_val, x_test = _images(4, seed=1), _images(4, seed=2)
  predict = lambda x: np.argmax(np.asarray(ctx.logits_fn(x)), -1).astype(np.int32)
  y_val, y_test = predict(x_val), predict(x_test)
  rng = np.random.default_rng(3)
  adv = {'sign': np.clip(x_test + 0.08 * np.sign(rng.normal(size=x_test.shape)), 0, 1),
         'noise': np.clip(x_test + rng.normal(0, 0.1, x_test.shape), 0, 1)}
  adv = {k: v.astype(np.float32) for k, v in adv.items()}
  return ctx, x_val, y_val, x_test, y_test, adv


@pytest.fixture(scope='module')
def study():
  ctx, x_val, y_val, x_test, y_test, adv = _setup()
  key = jax.random.key(7)
  result = dpe.evaluate_stop_rules(ctx, x_val, y_val, x_test, y_test, adv, key, CFG)
  return result, (ctx, x_val, y_val, x_test, y_test, adv, key)


def test_one_trajectory_equals_separate_stop_rule_runs(study):
  result, (ctx, x_val, y_val, x_test, y_test, adv, key) = study
  x_all, slices = dpe.restoration_rows(x_val, x_test, adv, CFG)
  assert len(x_all) == 16 and slices['clean'] == slice(4, 8)
  y_all = np.concatenate([y_val, y_test, y_test, y_test])
  cfg = dpe.dip_config(CFG)
  run = dict(key=key, cfg=cfg, check_every=10, chunk=8)
  sets = ['clean', 'sign', 'noise']
  got = lambda field: np.concatenate([result['per_image'][s][field] for s in sets])
  test_rows = slice(4, 16)

  # Fixed: val accuracy per checkpoint as the defense's fit measured it (classify at every
  # checkpoint), then a separate restoration that stops at the chosen iteration.
  per_ckpt = {}

  def record(it, restored, mse, rows):
    del mse
    ok = rows >= 0
    pred = np.argmax(dp.classifier(ctx)(restored), -1)
    per_ckpt.setdefault(it, np.zeros(len(x_all), bool))[rows[ok]] = pred[ok] == y_all[rows[ok]]
    return np.zeros(len(rows), bool)

  dp.dip_restore(x_all, iters=60, on_checkpoint=record, **run)
  val_curve = [per_ckpt[it][:4].mean() for it in sorted(per_ckpt)]
  np.testing.assert_allclose(result['val_accuracy'], val_curve)
  chosen = result['checkpoints'][dp.choose_fixed_iters(val_curve, 0.01)]
  assert result['fixed_iters'] == chosen and result['fixed_iters_source'] == 'validation'
  assert result['fixed_iters'] < 60  # a non-final checkpoint
  fixed = dp.dip_restore(x_all, iters=result['fixed_iters'], **run)
  np.testing.assert_array_equal(got('pred_fixed'),
                                dp.predict_classes(ctx, fixed['restored'], 8)[test_rows])
  residual = np.sum(np.square(x_all - fixed['restored']), axis=(1, 2, 3))
  np.testing.assert_allclose(got('residual_fixed'), residual[test_rows], rtol=1e-4)

  # Auto: the defense's on-line rule.
  rule = dp._auto_stop_rule(x_all, noise_level=None, auto_tol=0.3, min_iters=20)
  auto = dp.dip_restore(x_all, iters=60, on_checkpoint=rule, **run)
  np.testing.assert_array_equal(got('stop_auto'), auto['stop_iter'][test_rows])
  np.testing.assert_array_equal(got('pred_auto'),
                                dp.predict_classes(ctx, auto['restored'], 8)[test_rows])

  # Oracle (top-1 with 3 classes).
  assert result['oracle_topk'] == 1
  oracle = dp.restore_with_oracle(ctx, x_all, y_all, key, topk=1, max_iters=60, check_every=10,
                                  chunk=8, cfg=cfg)
  np.testing.assert_array_equal(got('stop_oracle'), oracle['stop_iter'][test_rows])
  np.testing.assert_array_equal(got('pred_oracle'),
                                dp.predict_classes(ctx, oracle['restored'], 8)[test_rows])

  # The rules really stop at different, non-final checkpoints (else the test proves little).
  stops = np.concatenate([got('stop_auto'), got('stop_oracle')])
  assert len(np.unique(stops)) >= 3 and (stops < 60).any(), stops
  assert len(np.unique(np.argmax(np.asarray(ctx.logits_fn(x_all)), -1))) >= 2


def test_oracle_bounds_fixed_and_structure(study):
  result, (_, _, _, _, y_test, adv, _) = study
  sets = ['clean', *adv]
  assert result['attacks'] == list(adv) and result['n_images'] == 4 and result['val_size'] == 4
  assert result['checkpoints'] == [10, 20, 30, 40, 50, 60]
  assert result['image_iterations'] == 16 * 60 and result['seconds'] > 0
  for s in sets:
    acc = result['accuracy'][s]
    assert set(acc) == {'none', 'fixed', 'auto', 'oracle'}
    # Top-1 oracle: an image right at the fixed stop is right at some checkpoint.
    assert acc['oracle'] >= acc['fixed'] and acc['oracle'] >= acc['auto']
    assert acc['oracle'] == pytest.approx(result['oracle_hit'][s])
    assert len(result['accuracy_curve'][s]) == 6
    assert len(result['per_image'][s]['pred_fixed']) == 4
    assert result['mean_stop_iter'][s]['fixed'] == result['fixed_iters']
  assert result['accuracy']['clean']['none'] == 1.0  # labels are M's clean predictions
  assert result['accuracy']['worst_case']['oracle'] <= min(
      result['accuracy'][a]['oracle'] for a in adv)
  for a in adv:
    none = result['accuracy'][a]['none']
    for r in dpe.RULES:
      want = (result['accuracy'][a][r] - none) / (1.0 - none) if none < 1 else float('nan')
      np.testing.assert_allclose(result['recovered'][a][r], want)
    assert 0.0 <= result['detection'][a]['auc_all'] <= 1.0
  json.dumps(result, allow_nan=True)  # JSON-serialisable as is.
  text = dpe.report_section(result)
  assert text.startswith('## Deep Protection') and 'first 4 test images' in text
  assert 'upper bound' in text and f'{result["fixed_iters"]} iterations' in text


def test_config_and_topk():
  assert dpe.oracle_k(5, 3) == 1 and dpe.oracle_k(5, 10) == 1
  assert dpe.oracle_k(5, 1000) == 5 and dpe.oracle_k(5, 30) == 3
  with pytest.raises(ValueError, match='Unknown'):
    dpe.dip_config({'widht': (8,)})
  assert dpe.dip_config(None).widths == tuple(dpe.default_config().widths)
  ctx, x_val, y_val, x_test, y_test, adv = _setup()
  with pytest.raises(ValueError, match='3 images'):
    dpe.restoration_rows(x_val, x_test, {'a': adv['sign'][:3]}, CFG)
  # No attacks, a fixed iteration count from the config (same compiled step: 8 images).
  result = dpe.evaluate_stop_rules(ctx, x_val, y_val, x_test, y_test, {}, jax.random.key(0),
                                   dict(CFG, iters=30))
  assert result['fixed_iters'] == 30 and result['fixed_iters_source'] == 'config'
  assert result['attacks'] == [] and 'worst_case' not in result['accuracy']
  assert dpe.report_section(result).startswith('## Deep Protection')
  with pytest.raises(ValueError, match='not a checkpoint'):
    dpe.evaluate_stop_rules(ctx, x_val, y_val, x_test, y_test, {}, jax.random.key(0),
                            dict(CFG, iters=35))
  # The off-line auto rule on a hand-made MSE curve: stops at the flat step after min_iters or at
  # the noise floor, else at the cap.
  mse = np.array([[1.0, 0.5, 0.45, 0.2], [1.0, 0.5, 0.25, 0.1], [1.0, 0.5, 0.01, 0.005]])
  idx = dp.auto_stop_index([10, 20, 30, 40], mse, np.array([0.0, 0.0, 0.2]), auto_tol=0.2,
                           min_iters=20)
  np.testing.assert_array_equal(idx, [2, 3, 2])
