"""MRR (Rouhani et al. 2018): center loss, the defender model and its training, thresholds and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from unmask_jax import defenses, models, pipeline
from unmask_jax.defenses import base, mrr
from unmask_jax.models import defender, functional
from unmask_jax.train import checkpoint as ckpt

Partial = jax.tree_util.Partial
NUM_CLASSES = 3


def _class_of(x):
  """The fake victim's class: the image's mean intensity in thirds (so labels = predictions)."""
  return jnp.clip(jnp.floor(jnp.mean(x, axis=(1, 2, 3)) * 3), 0, 2).astype(jnp.int32)


def _logits(x):
  return 5.0 * jax.nn.one_hot(_class_of(x), NUM_CLASSES)


def _feats(w, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w)


def fake(n=600, seed=0, n_defenders=3, dim=12):
  rng = np.random.default_rng(seed)
  level = rng.integers(0, 3, n)
  x = np.clip((level[:, None, None, None] + 0.5) / 3 + rng.normal(0, 0.04, (n, 4, 4, 3)), 0, 1)
  x = x.astype(np.float32)
  ws = [jax.random.normal(jax.random.key(i), (48, dim)) for i in range(n_defenders)]
  ctx = base.Context(logits_fn=Partial(_logits), num_classes=NUM_CLASSES,
                     defenders=tuple(Partial(_feats, w) for w in ws))
  return ctx, {'image': x, 'label': np.asarray(_class_of(x))}


def test_center_loss_hand_computed():
  z = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  centers = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
  y = jnp.asarray([0, 2])
  got = np.asarray(defender.center_loss(z, y, centers))
  # Centre norms^2 1, 4, 1 -> unit penalty mean((0, 9, 0)) = 3.
  # z0: own d2 0; others 5 and 4 -> nearest 4.  z1: own d2 2; others 1 (c0) and 1 (c1) -> 1.
  np.testing.assert_allclose(got, [0 - 4 + 3, 2 - 1 + 3], rtol=1e-6)


def test_defender_features_are_unit_norm_and_registered():
  m = models.create('mrr_defender', num_classes=3, in_channels=3, rngs=nnx.Rngs(0),
                    base='cnn_small', base_kwargs={'widths': (4, 8), 'feature_dim': 16})
  m.eval()
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (5, 8, 8, 3)), jnp.float32)
  z = functional.features_fn(m)(x)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=1), 1.0, rtol=1e-5)
  assert functional.logits_fn(m)(x).shape == (5, 3)
  with pytest.raises(ValueError, match='base'):
    models.create('mrr_defender', num_classes=3, rngs=nnx.Rngs(0), base='mrr_defender')


def test_defender_training_with_center_loss(tmp_path):
  c = tiny.get_config('m')
  c.model.name = 'mrr_defender'
  c.model.kwargs = {'base': 'cnn_small', 'base_kwargs': {'widths': (4, 8, 8), 'feature_dim': 16}}
  c.center_loss_weight = 0.01
  c.data.data_dir = str(tmp_path / 'data')
  final = pipeline.train(c, str(tmp_path / 'd0'), expect_task='classifier')
  assert 0.0 <= final['test']['accuracy'] <= 1.0
  model, spec = ckpt.load_model(str(tmp_path / 'd0'))
  assert spec['model'] == 'mrr_defender' and isinstance(model, defender.Defender)
  # The centres are trained parameters: they moved from their random unit-norm start.
  start = defender.mrr_defender(num_classes=spec['num_classes'], rngs=nnx.Rngs(c.seed),
                                **spec['model_kwargs'])
  assert not np.allclose(np.asarray(model.centers[...]), np.asarray(start.centers[...]))
  # A center loss needs class centres.
  bad = tiny.get_config('m')
  bad.center_loss_weight = 0.01
  bad.data.data_dir = str(tmp_path / 'data')
  with pytest.raises(ValueError, match='mrr_defender'):
    pipeline.train(bad, str(tmp_path / 'bad'), expect_task='classifier')


@pytest.mark.parametrize('sp', [1.0, 5.0, 20.0])
def test_thresholds_give_requested_fpr_on_training_data(sp):
  ctx, data = fake()
  det = defenses.make(f'mrr(n=1, sp={sp})')
  state = det.fit(ctx, data, None)
  y = data['label']
  z = np.asarray(ctx.defenders[0](jnp.asarray(data['image'])))
  d = mrr.distances(state, z, y, 0)
  for c in range(NUM_CLASSES):
    n_c = int(np.sum(y == c))
    rate = np.mean(d[y == c] > state['d0.thresholds'][c])
    assert abs(rate - sp / 100) <= 1.0 / n_c + 1e-9, (c, rate)
  # The fake victim predicts the true class on this data, so the score's flag rate is the same.
  flagged = det.score(state, ctx, data['image'], None) > float(state['threshold'])
  assert abs(flagged.mean() - sp / 100) <= NUM_CLASSES / len(y)


def test_more_defenders_flag_a_superset_and_pca_keeps_variance(tmp_path):
  ctx, data = fake(n_defenders=3)
  s = {n: defenses.make(f'mrr(n={n}, sp=5)') for n in (1, 3)}
  states = {n: d.fit(ctx, data, None) for n, d in s.items()}
  ctx2, probe = fake(n=200, seed=1)
  probe['image'] = np.clip(probe['image'] + np.random.default_rng(2).normal(0, 0.1, probe['image'].shape),
                           0, 1).astype(np.float32)
  one, three = (s[n].score(states[n], ctx, probe['image'], None) for n in (1, 3))
  assert np.all(three >= one - 1e-6)            # max over a superset of defenders
  assert (three > 1).mean() >= (one > 1).mean()
  explained = states[3]['d1.explained']
  assert explained.sum() >= 0.99 - 1e-9 and explained[:-1].sum() < 0.99
  # A defense state is saved and reloaded (evaluation resumes).
  path = str(tmp_path / 'mrr.npz')
  base.save_state(path, states[3])
  np.testing.assert_allclose(s[3].score(base.load_state(path), ctx, probe['image'], None), three)


def test_bad_input():
  ctx, data = fake(n_defenders=2)
  for spec in ('mrr(sp=0)', 'mrr(sp=100)', 'mrr(sp=-1)', 'mrr(n=0)', 'mrr(variance=0)'):
    with pytest.raises(ValueError):
      defenses.make(spec)
  with pytest.raises(ValueError, match='defender module'):
    defenses.make('mrr(n=3)').fit(ctx, data, None)
  det = defenses.make('mrr(n=2)')
  with pytest.raises(base.NotFittedError):
    det.score(None, ctx, data['image'], None)
  state = det.fit(ctx, data, None)
  other = ctx._replace(defenders=tuple(Partial(_feats, jax.random.normal(jax.random.key(i), (48, 7)))
                                       for i in range(2)))
  with pytest.raises(ValueError, match='dimensional'):
    det.score(state, other, data['image'], None)
  one_class = {'image': data['image'], 'label': np.zeros_like(data['label'])}
  with pytest.raises(ValueError, match='class'):
    det.fit(ctx, one_class, None)
