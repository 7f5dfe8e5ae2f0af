"""Tests of the seed-paper detectors: MC dropout, KDE, KL, LR combiner, Deep Protection.

Models are tiny pure-jax fakes (a fixed random 2-layer MLP with key-driven dropout) wrapped in
`jax.tree_util.Partial`, so these tests do not depend on unmask_jax.models.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from unmask_jax import defenses
from unmask_jax.defenses import base, combiner, deep_protection, kde, kl, uncertainty

Partial = jax.tree_util.Partial


# ----------------------------------------------------------------------------------------------
# A fake victim: x -> relu(x W1 + b1) = features -> dropout -> W2 -> logits.


def _features(params, x):
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ params['w1'] + params['b1'])


def _logits(params, x):
  return _features(params, x) @ params['w2'] + params['b2']


def _mc_logits(params, x, key, rate=0.5):
  h = _features(params, x)
  keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), 0.0) @ params['w2'] + params['b2']


def fake_ctx(seed=0, image_shape=(4, 4, 3), hidden=128, num_classes=10):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  d_in = math.prod(image_shape)
  params = {'w1': jax.random.normal(k1, (d_in, hidden)) / math.sqrt(d_in) * 3.0,
            'b1': 0.1 * jax.random.normal(k3, (hidden,)),
            'w2': jax.random.normal(k2, (hidden, num_classes)) / math.sqrt(hidden) * 3.0,
            'b2': jnp.zeros((num_classes,))}
  return base.Context(logits_fn=Partial(_logits, params), features_fn=Partial(_features, params),
                      mc_logits_fn=Partial(_mc_logits, params), num_classes=num_classes), params


def fake_data(n, seed=0, image_shape=(4, 4, 3), num_classes=10):
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(0, 1, (n, *image_shape)).astype(np.float32),
          'label': (np.arange(n) % num_classes).astype(np.int32)}


# ----------------------------------------------------------------------------------------------
# MC dropout.


def test_mc_metrics_hand_computed():
  # Image 0: passes (0.8, 0.2) and (0.4, 0.6); image 1: two identical one-hot passes.
  probs = np.array([[[0.8, 0.2], [1.0, 0.0]],
                    [[0.4, 0.6], [1.0, 0.0]]], np.float32)
  m = {k: np.asarray(v) for k, v in uncertainty.mc_metrics(probs).items()}
  h = lambda p: -sum(q * math.log(q) for q in p if q > 0)
  entropy0 = h([0.6, 0.4])
  np.testing.assert_allclose(m['max_prob'], [0.6, 1.0], atol=1e-6)
  np.testing.assert_allclose(m['confidence'], [0.4, 0.0], atol=1e-6)
  np.testing.assert_allclose(m['entropy'], [entropy0, 0.0], atol=1e-6)
  # Per class: ((0.8 - 0.6)^2 + (0.4 - 0.6)^2) / 2 = 0.04; mean over the 2 classes = 0.04.
  np.testing.assert_allclose(m['variance'], [0.04, 0.0], atol=1e-6)
  mi0 = entropy0 - (h([0.8, 0.2]) + h([0.4, 0.6])) / 2
  np.testing.assert_allclose(m['mutual_information'], [mi0, 0.0], atol=1e-6)
  assert mi0 > 0.08  # 0.0863...
  with pytest.raises(ValueError):
    uncertainty.mc_metrics(probs[0])


def test_mc_vmap_equals_python_loop():
  ctx, _ = fake_ctx()
  x = fake_data(8)['image']
  key = jax.random.key(3)
  t = 6
  vmapped = np.asarray(uncertainty.mc_probabilities(ctx.mc_logits_fn, jnp.asarray(x), key, t))
  keys = jax.random.split(key, t)
  looped = np.stack([np.asarray(jax.nn.softmax(ctx.mc_logits_fn(x, k), -1)) for k in keys])
  np.testing.assert_allclose(vmapped, looped, rtol=1e-5, atol=1e-6)
  assert vmapped.std(axis=0).max() > 1e-3  # The passes really differ.

  # The defense: chunk i uses fold_in(key, i); with 2 chunks of 4 (last one padded from 3).
  det = uncertainty.make(metric='variance', T=t, chunk=4)
  state = det.fit(ctx, None, key)
  x7 = x[:7]
  got = det.score(state, ctx, x7, key)
  want = []
  for i, rows in enumerate((slice(0, 4), slice(4, 7))):
    kk = jax.random.split(jax.random.fold_in(key, i), t)
    xb = x7[rows]
    pb = np.stack([np.asarray(jax.nn.softmax(ctx.mc_logits_fn(xb, k), -1)) for k in kk])
    want.append(np.asarray(uncertainty.mc_metrics(pb)['variance']))
  np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-4, atol=1e-7)
  assert got.shape == (7,)
  assert det.predict(state, ctx, x7, key).shape == (7,)
  # Deterministic given the key.
  np.testing.assert_array_equal(got, det.score(state, ctx, x7, key))


def test_mc_bad_inputs():
  ctx, _ = fake_ctx()
  x = fake_data(4)['image']
  with pytest.raises(ValueError, match='T >= 2'):
    uncertainty.make(T=1)
  with pytest.raises(ValueError, match='metric'):
    uncertainty.make(metric='nope')
  det = defenses.make('mc_dropout(metric="entropy", T=4)')
  for state in (None, {}):
    with pytest.raises(base.NotFittedError):
      det.score(state, ctx, x, jax.random.key(0))
  with pytest.raises(ValueError, match='mc_logits_fn'):
    det.fit(base.Context(), None, jax.random.key(0))
  state = det.fit(ctx, None, jax.random.key(0))
  with pytest.raises(ValueError, match='0, 1'):
    det.score(state, ctx, x * 255, jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# KDE and KL.


def _bruteforce_log_density(z, classes, train_z, train_y, h):
  z, train_z = np.asarray(z, np.float64), np.asarray(train_z, np.float64)
  d = z.shape[1]
  out = []
  for zi, c in zip(z, classes):
    zc = train_z[train_y == c]
    d2 = np.sum((zi - zc) ** 2, axis=1)
    out.append(logsumexp(-d2 / (2 * h * h)) - math.log(len(zc))
               - d / 2 * math.log(2 * math.pi * h * h))
  return np.array(out)


def test_kde_matches_float64_bruteforce_128d():
  ctx, params = fake_ctx(hidden=128)
  train, test = fake_data(300, seed=1), fake_data(37, seed=2)
  h = 0.9
  det = kde.make(bandwidth=h, chunk=16, train_chunk=64)  # Both chunkings need padding.
  state = det.fit(ctx, train, jax.random.key(0))
  got = -det.score(state, ctx, test['image'], jax.random.key(0))
  train_z = np.asarray(_features(params, jnp.asarray(train['image'])), np.float64)
  z = np.asarray(_features(params, jnp.asarray(test['image'])), np.float64)
  assert z.shape[1] == 128
  pred = np.argmax(np.asarray(_logits(params, jnp.asarray(test['image']))), -1)
  ref = _bruteforce_log_density(z, pred, train_z, train['label'], h)
  np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)

  # Several bandwidths in one pass equal separate passes; classes without points give -inf.
  hs = np.array([0.5, 2.0])
  multi = kde.kde_log_density(z, pred, train_z, train['label'], hs, chunk=8, train_chunk=50)
  for j, hj in enumerate(hs):
    ref_j = _bruteforce_log_density(z, pred, train_z, train['label'], hj)
    np.testing.assert_allclose(multi[j], ref_j, atol=1e-3, rtol=0)
  missing = kde.kde_log_density(z[:2], np.array([0, 12]), train_z, train['label'], 1.0)
  assert np.isfinite(missing[0]) and missing[1] == -np.inf


def test_kde_log_density_slots_and_calls_match_float64(monkeypatch):
  # Unbalanced classes (several slots for one class), classes without training points or out of
  # range (-inf), far queries (|log p| in the thousands), several bandwidths, and a call budget so
  # small that the slots are spread over several padded jitted calls: all 1e-3 relative to float64.
  rng = np.random.default_rng(0)
  d, n_cls = 64, 4
  means = rng.normal(0.0, 3.0, (n_cls, d)) + 10.0  # far from the origin: centring matters
  ty = np.repeat(np.arange(n_cls - 1), [150, 40, 7])  # class 3 has no training points
  tz = (means[ty] + rng.normal(0.0, 1.0, (len(ty), d))).astype(np.float32)
  cls = np.concatenate([np.zeros(70, int), np.ones(5, int), np.full(9, 2), [3, -1, 7]])
  z = (means[np.clip(cls, 0, n_cls - 1)] + rng.normal(0.0, 2.0, (len(cls), d))).astype(np.float32)
  hs = np.array([0.4, 1.0, 3.0])
  want = np.stack([_bruteforce_log_density(z[:-3], cls[:-3], tz, ty, h) for h in hs])
  for call_elems in (kde._CALL_ELEMS, 3000):
    monkeypatch.setattr(kde, '_CALL_ELEMS', call_elems)
    for chunk, train_chunk in ((256, 2048), (32, 64), (5, 7)):
      got = kde.kde_log_density(z, cls, tz, ty, hs, chunk=chunk, train_chunk=train_chunk)
      assert got.shape == (3, len(cls)) and got.dtype == np.float32
      assert np.all(got[:, -3:] == -np.inf)
      np.testing.assert_allclose(got[:, :-3], want, rtol=1e-3, atol=1e-3)
  assert np.abs(want).max() > 1000
  one = kde.kde_log_density(z, cls, tz, ty, 1.0)
  assert one.shape == (len(cls),)
  np.testing.assert_allclose(one[:-3], want[1], rtol=1e-3, atol=1e-3)


def test_kde_bandwidth_selection():
  ctx, _ = fake_ctx(hidden=32)
  det = kde.make(bandwidth=None, chunk=32, train_chunk=64)
  state = det.fit(ctx, fake_data(200, seed=4), jax.random.key(1))
  best = int(np.argmax(state['heldout_loglik']))
  assert 0 < best < len(state['bandwidth_grid']) - 1  # An interior maximum.
  assert float(state['bandwidth']) == pytest.approx(float(state['bandwidth_grid'][best]), rel=1e-6)
  assert np.all(np.isfinite(det.score(state, ctx, fake_data(5, seed=5)['image'], None)))


def test_closeness_bad_inputs():
  ctx128, _ = fake_ctx(hidden=128)
  ctx64, _ = fake_ctx(hidden=64)
  train, x = fake_data(40), fake_data(3, seed=9)['image']
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match='> 0'):
      kde.make(bandwidth=bad)
  with pytest.raises(ValueError, match='> 0'):
    defenses.make('kde(bandwidth=0)')
  with pytest.raises(ValueError):
    kde.kde_log_density(np.zeros((1, 2)), [0], np.zeros((3, 2)), [0, 0, 0], -0.5)
  for det in (kde.make(bandwidth=1.0), kl.make()):
    with pytest.raises(base.NotFittedError):
      det.score(None, ctx128, x, None)
    state = det.fit(ctx128, train, jax.random.key(0))
    with pytest.raises(ValueError, match='dimensional'):
      det.score(state, ctx64, x, None)
  with pytest.raises(ValueError, match='no training examples'):
    # Only 5 of the 10 classes have training examples.
    kde.make(bandwidth=1.0).fit(ctx128, fake_data(5), jax.random.key(0))


def test_kl_known_pmfs():
  p = np.log([0.5, 0.5])
  q = np.log([0.25, 0.75])
  want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
  assert float(kl.kl_divergence(p, q)) == pytest.approx(want, abs=1e-6)
  assert float(kl.kl_divergence(q, q)) == pytest.approx(0.0, abs=1e-7)
  # Both conversions of the documented PMFs.
  np.testing.assert_allclose(np.exp(kl.activation_log_pmf([0.0, math.log(3.0)], 'softmax')),
                             [0.25, 0.75], atol=1e-6)
  np.testing.assert_allclose(np.exp(kl.activation_log_pmf([1.0, 3.0], 'normalize', eps=0.0)),
                             [0.25, 0.75], atol=1e-6)
  np.testing.assert_allclose(np.exp(kl.activation_log_pmf([0.0, 0.0], 'normalize')),
                             [0.5, 0.5], atol=1e-6)  # All-zero ReLU vector -> uniform, no NaN.

  # End to end: KL(PMF(z) || PMF(mean of the predicted class's training activations)).
  ctx, params = fake_ctx(hidden=16)
  train, test = fake_data(60, seed=3), fake_data(6, seed=8)
  for pmf in ('softmax', 'normalize'):
    det = defenses.make(f'kl(pmf="{pmf}")')
    state = det.fit(ctx, train, jax.random.key(0))
    tz = np.asarray(_features(params, jnp.asarray(train['image'])), np.float64)
    z = np.asarray(_features(params, jnp.asarray(test['image'])), np.float64)
    pred = np.argmax(np.asarray(_logits(params, jnp.asarray(test['image']))), -1)
    means = np.stack([tz[train['label'] == c].mean(0) for c in range(10)])
    if pmf == 'softmax':
      to_pmf = lambda a: np.exp(a - logsumexp(a, axis=-1, keepdims=True))
    else:
      to_pmf = lambda a: (a + 1e-6) / (a + 1e-6).sum(-1, keepdims=True)
    pz, qz = to_pmf(z), to_pmf(means)[pred]
    want = np.sum(pz * np.log(pz / qz), axis=-1)
    got = det.score(state, ctx, test['image'], None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  neg_ctx = ctx._replace(features_fn=Partial(lambda x: _features(params, x) - 1.0))
  with pytest.raises(ValueError, match='non-negative'):
    kl.make(pmf='normalize').fit(neg_ctx, train, jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# LR combiner.


def _channel_mean_detector(channel, seen):
  """A fake detector: score = mean of one channel; records every image it scores."""
  def fit(ctx, data, key):
    del ctx, data, key
    return {'channel': np.asarray(channel)}

  def apply(state, ctx, x, key):
    del state, ctx, key
    # A host callback sees the (chunked, padded) images the jitted member is applied to.
    jax.debug.callback(lambda xx: seen.append(combiner.image_fingerprints(xx)), x)
    return base.Decision(x[..., channel].mean(axis=(1, 2)))

  return base.Defense(f'channel_mean({channel})', fit, apply,
                      lambda *a: base.Surrogate(apply(*a).score))


def _shifted(x, rng, shift=0.05):
  adv = x.copy()
  adv[..., :2] += shift  # Both channels carry part of the signal.
  return np.clip(adv + rng.normal(0, 0.005, adv.shape), 0, 1).astype(np.float32)


def test_combiner_never_sees_eval_and_beats_members():
  rng = np.random.default_rng(0)
  seen = []
  members = [_channel_mean_detector(0, seen), _channel_mean_detector(1, seen)]
  det = combiner.make(members=members)
  ctx = base.Context()
  x_fit = rng.uniform(0.2, 0.75, (300, 4, 4, 3)).astype(np.float32)
  x_eval = rng.uniform(0.2, 0.75, (300, 4, 4, 3)).astype(np.float32)
  adv_fit, adv_eval = _shifted(x_fit, rng), _shifted(x_eval, rng)
  key = jax.random.key(0)
  state = det.fit(ctx, {'image': x_fit, 'label': np.zeros(300, np.int32)}, key)
  with pytest.raises(base.NotFittedError, match='fit_combiner'):
    det.score(state, ctx, x_eval, key)
  state = combiner.fit_combiner(state, ctx, x_fit, adv_fit,
                                combiner.matched_noise_std(x_fit, adv_fit), key, members=members)
  # Nothing of the evaluation split reached the detectors while the LR was fitted.
  fitted_on = np.concatenate(seen)
  eval_prints = np.concatenate([combiner.image_fingerprints(x_eval),
                                combiner.image_fingerprints(adv_eval)])
  assert not np.isin(eval_prints, fitted_on).any()
  assert len(np.unique(fitted_on)) == 900  # clean + noisy + adversarial (padding repeats row 0).
  combiner.assert_disjoint(state, x_eval, adv_eval)
  with pytest.raises(combiner.LeakageError):
    combiner.assert_disjoint(state, x_eval, adv_fit[:1])
  with pytest.raises(combiner.LeakageError):
    det.score(state, ctx, np.concatenate([x_eval[:5], x_fit[:1]]), key)

  y = np.r_[np.zeros(300), np.ones(300)]
  pool = np.concatenate([x_eval, adv_eval])
  combined = roc_auc_score(y, det.score(state, ctx, pool, key))
  singles = [roc_auc_score(y, m.score(m.fit(None, None, None), ctx, pool, None)) for m in members]
  assert combined >= max(singles), (combined, singles)
  assert np.all(state['lr_coef'] > 0)


def test_combiner_registry_members_and_state_roundtrip(tmp_path):
  ctx, _ = fake_ctx(hidden=32)
  train, held, ev = fake_data(60, seed=1), fake_data(20, seed=2), fake_data(10, seed=3)
  det = combiner.make(members=('mc_dropout(metric="variance", T=4, chunk=16)',
                               'mc_dropout(metric="entropy", T=4, chunk=16)', 'kde(bandwidth=1.0)',
                               'kl'))
  key = jax.random.key(0)
  state = det.fit(ctx, train, key)
  sign = np.sign(np.random.default_rng(0).normal(size=held['image'].shape))
  adv = np.clip(held['image'] + 0.1 * sign, 0, 1).astype(np.float32)
  state = combiner.fit_combiner(state, ctx, held['image'], adv, 0.1, key)
  feats = combiner.member_scores(state, ctx, ev['image'], key)
  assert feats.shape == (10, 4)
  # Scoring again (another image set of the same chunk shape) reuses the compiled program: the
  # members are static arguments and must hash equal across calls (each call used to recompile).
  compiled = combiner._members_chunk._cache_size()
  combiner.member_scores(state, ctx, held['image'], key)
  assert combiner._members_chunk._cache_size() == compiled
  # The two MC members share one run: their columns equal one mc_dropout call with that key.
  mc = uncertainty.mc_dropout_metrics(ctx, ev['image'], jax.random.split(key, 4)[0], T=4, chunk=16)
  np.testing.assert_allclose(feats[:, 0], mc['variance'], rtol=1e-6)
  np.testing.assert_allclose(feats[:, 1], mc['entropy'], rtol=1e-6)
  scores = det.score(state, ctx, ev['image'], key)
  base.save_state(str(tmp_path / 'c.npz'), state)
  loaded = base.load_state(str(tmp_path / 'c.npz'))
  np.testing.assert_allclose(det.score(loaded, ctx, ev['image'], key), scores, rtol=1e-6)
  with pytest.raises(combiner.LeakageError):
    det.score(loaded, ctx, held['image'], key)


# ----------------------------------------------------------------------------------------------
# Deep Protection. One tiny network config (and segment length 50) shared by all tests so the
# jitted DIP step compiles once per batch size.

DIP_KW = dict(widths=(8, 16), input_depth=4)
DIP_CFG = deep_protection.DIPConfig(**DIP_KW)


def _clean_and_noisy(seed=0):
  h = 16
  yy, xx = np.mgrid[0:h, 0:h] / (h - 1)
  img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * np.sin(3 * xx + 2 * yy)], -1)
  img[4:10, 5:12, 0] = 0.9
  clean = np.stack([img, img[::-1]]).astype(np.float32)
  noisy = clean + np.random.default_rng(seed).normal(0, 0.1, clean.shape)
  return clean, np.clip(noisy, 0, 1).astype(np.float32)


def _psnr(a, b):
  return 10 * np.log10(1.0 / np.mean((a - b) ** 2, axis=(1, 2, 3)))


def test_dip_denoises_batch_deterministically():
  clean, noisy = _clean_and_noisy()
  key = jax.random.key(0)
  out = deep_protection.dip_restore(noisy, key, iters=250, cfg=DIP_CFG, check_every=50, chunk=2)
  assert out['restored'].shape == noisy.shape and np.all(out['stop_iter'] == 250)
  gain = _psnr(out['restored'], clean) - _psnr(noisy, clean)
  assert np.all(gain > 1.5), gain  # ~20 dB noisy -> ~25 dB restored.
  again = deep_protection.dip_restore(noisy, key, iters=250, cfg=DIP_CFG, check_every=50, chunk=2)
  np.testing.assert_array_equal(out['restored'], again['restored'])
  other = deep_protection.dip_restore(noisy, jax.random.key(1), iters=250, cfg=DIP_CFG,
                                      check_every=50, chunk=2)
  assert np.abs(other['restored'] - out['restored']).max() > 1e-4


def test_dip_batch_equals_one_by_one():
  _, noisy = _clean_and_noisy(seed=1)
  key = jax.random.key(5)
  batch = deep_protection.dip_restore(noisy, key, iters=50, cfg=DIP_CFG, check_every=50, chunk=2)
  single = deep_protection.dip_restore(noisy, key, iters=50, cfg=DIP_CFG, check_every=50, chunk=1)
  np.testing.assert_allclose(batch['restored'], single['restored'], atol=2e-3)
  # im2col convolutions equal XLA's.
  params = deep_protection.init_generator(key, DIP_CFG, 3)
  z = jax.random.uniform(key, (16, 16, 4)) * 0.1
  apply = jax.jit(deep_protection.generator_apply, static_argnames='cfg')
  np.testing.assert_allclose(
      apply(params, z, cfg=DIP_CFG),
      apply(params, z, cfg=deep_protection.DIPConfig(conv='lax', **DIP_KW)), atol=1e-5)


def test_deep_protection_defense_stop_rules():
  ctx, _ = fake_ctx(image_shape=(16, 16, 3), hidden=32)
  clean, noisy = _clean_and_noisy(seed=2)
  labels = np.argmax(np.asarray(ctx.logits_fn(clean)), -1).astype(np.int32)
  key = jax.random.key(0)

  det = deep_protection.make(iters=100, chunk=2, **DIP_KW)
  with pytest.raises(base.NotFittedError):
    det.predict(None, ctx, noisy, key)
  state = det.fit(ctx, {'image': clean, 'label': labels}, key)
  assert int(state['iters']) == 100
  pred, score = det.predict(state, ctx, noisy, key), det.score(state, ctx, noisy, key)
  assert pred.shape == (2,) and pred.dtype == np.int32
  assert score.shape == (2,) and np.all(score > 0)

  chosen = deep_protection.make(max_iters=100, val_size=2, chunk=2, **DIP_KW)
  st = chosen.fit(ctx, {'image': clean, 'label': labels}, key)
  assert list(st['val_checkpoints']) == [50, 100] and int(st['iters']) in (50, 100)

  # The defense's jitted restoration is dip_restore's with the same per-image keys.
  ref = deep_protection.dip_restore(noisy, jax.random.fold_in(key, 0), iters=100, cfg=DIP_CFG,
                                    chunk=2)['restored']
  np.testing.assert_allclose(score, np.sum(np.square(noisy - ref), axis=(1, 2, 3)), rtol=1e-3)
  np.testing.assert_array_equal(pred, np.argmax(np.asarray(ctx.logits_fn(ref)), -1))
  with pytest.raises(ValueError, match='fixed'):
    deep_protection.make(stop='auto')  # host-driven: the study's, not a pure defense

  oracle = deep_protection.restore_with_oracle(ctx, noisy, labels, key, topk=10, max_iters=100,
                                               check_every=50, chunk=2, cfg=DIP_CFG)
  assert oracle['success'].all() and np.all(oracle['stop_iter'] == 50)  # top-10 of 10 classes.
  with pytest.raises(ValueError, match='stop'):
    deep_protection.make(stop='never')


def test_part_agreement_on_top_k_pixels_reaches_cap_only_on_the_class_row():
  """The dense hinge of the UnMask surrogate: cap iff all k pixel margins of the class's parts
  are >= cap and all of the other parts' <= -cap; every one of the k pixels gets a gradient."""
  import jax
  import jax.numpy as jnp
  from unmask_jax.defenses import unmask as unmask_lib
  v = jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 1]], jnp.float32)
  m = jnp.asarray([[[2.0, 1.5, 1.0], [3.0, 2.0, 1.2], [-1.0, -2.0, -3.0], [-1.5, -1.5, -2.0]]])
  agree = np.asarray(unmask_lib.part_agreement(m, v))
  sign = np.where(np.asarray(v) > 0, 1.0, -1.0)
  expected = np.minimum(sign[:, :, None] * np.asarray(m)[0][None], 1.0).mean(axis=(1, 2))
  np.testing.assert_allclose(agree, expected[None], rtol=1e-6)
  assert agree[0, 0] == 1.0
  weaker = m.at[0, 1, 2].set(0.2)       # one pixel of a class-0 part below cap: no longer cap
  assert float(unmask_lib.part_agreement(weaker, v)[0, 0]) < 1.0
  g = jax.grad(lambda mm: unmask_lib.part_agreement(mm, v)[0, 0])(jnp.zeros_like(m))
  assert np.all(np.asarray(g) != 0)      # all k pixels of every part, at margin 0
  # The k-th margin alone (the [N, P] form) reaches cap on the same input.
  assert float(unmask_lib.part_agreement(m[..., -1], v)[0, 0]) == 1.0
