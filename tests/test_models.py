"""Tests of the models: shapes, parameter counts, the dropout rule and the pure functions."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unmask_jax import models
from unmask_jax.models import functional

# Tiny variants, so a forward pass is cheap on a CPU.
TINY = {
    'resnet10': dict(width=4, stem='cifar'),
    'resnet18': dict(width=4, stem='cifar'),
    'resnet34': dict(width=4, stem='cifar'),
    'resnet50': dict(width=4, stem='cifar'),
    'densenet121': dict(growth_rate=4, stem='cifar'),
    'cnn_mnist': dict(image_size=32),
    'cnn_small': dict(widths=(4, 8, 16), feature_dim=16),
}


def _images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape)


def _tiny(name, num_classes=5, **kwargs):
  return models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0),
                       **{**TINY.get(name, {}), **kwargs})


def test_registry_lists_every_model():
  assert models.MODELS.names() == sorted(
      ['resnet10', 'resnet18', 'resnet34', 'resnet50', 'densenet121', 'cnn_mnist', 'cnn_small',
       'unet', 'mrr_defender'])


def test_unknown_name_lists_valid_names():
  with pytest.raises(KeyError, match=r'resnet18.*Valid models: .*cnn_small'):
    models.create('resnet81', num_classes=10, rngs=nnx.Rngs(0))


def test_unknown_kwarg_lists_valid_kwargs():
  with pytest.raises(TypeError, match=r"\['widht'\].*Valid parameters: width, stem, dropout"):
    models.create('resnet18', num_classes=10, rngs=nnx.Rngs(0), widht=8)


def _abstract(name, **kwargs):
  """A tiny model with ShapeDtypeStruct leaves: no initialization cost, for shape checks."""
  return nnx.eval_shape(lambda: _tiny(name, **kwargs))


def _out_shape(fn, *shapes):
  return jax.eval_shape(lambda f, *a: f(*a), fn,
                        *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).shape


@pytest.mark.parametrize('name', sorted(TINY))
def test_classifier_shapes(name):
  model = _abstract(name)
  fns = (functional.features_fn(model), functional.logits_fn(model), functional.head_fn(model))
  feats, logits, head = jax.eval_shape(
      lambda fns, x: (fns[0](x), fns[1](x), fns[2](fns[0](x))), fns,
      jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert feats.shape == (2, model.feature_dim)
  assert logits.shape == head.shape == (2, 5)
  assert (model.num_classes, model.in_channels) == (5, 3)


# The published ImageNet configurations, abstract (shapes only; nnx.eval_shape): each is built
# once and used both for its parameter count and for a 150 px forward shape.
FULL = {'resnet18': 11_689_512, 'resnet50': 25_557_032, 'densenet121': 7_978_856}


@functools.cache
def _full(name):
  return nnx.eval_shape(lambda: models.create(name, num_classes=1000, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize('name', sorted(FULL))
def test_parameter_counts_of_imagenet_configs(name):
  assert functional.param_count(_full(name)) == FULL[name]


@pytest.mark.parametrize('name', sorted(FULL))
def test_imagenet_stem_shapes(name):
  model = _full(name)
  assert _out_shape(functional.logits_fn(model), (1, 150, 150, 3)) == (1, 1000)


def test_parameter_count_of_feinman_mnist_cnn():
  model = nnx.eval_shape(lambda: models.create('cnn_mnist', num_classes=10, in_channels=1,
                                               image_size=28, rngs=nnx.Rngs(0)))
  assert functional.param_count(model) == 1_199_882


# Real (initialized) tiny models, built once per module: eager initialization compiles one small
# program per parameter shape, which dominates the run time of these tests on a CPU. Tests get a
# clone (`nnx.clone`), so they may change its mode or weights freely.


@pytest.fixture(scope='module')
def _built():
  return {
      'cnn_small': _tiny('cnn_small', dropout=0.5),
      'cnn_mnist': _tiny('cnn_mnist', dropout=(0.5, 0.5)),
      'resnet10': _tiny('resnet10', dropout=0.5),
      'unet': models.create('unet', num_classes=4, width=4, rngs=nnx.Rngs(0)),
  }


@pytest.fixture
def built(_built):
  return lambda name: nnx.clone(_built[name])


def test_param_count_excludes_batch_stats(built):
  model = built('cnn_small')
  n_stats = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  n_all = sum(v.size for v in jax.tree.leaves(nnx.state(model)))
  assert n_stats > 0
  assert functional.param_count(model) == n_all - n_stats


def test_real_forward_and_head_of_features(built):
  model = built('resnet10')
  model.eval()
  x = _images((3, 32, 32, 3))
  logits = model(x)
  chex.assert_shape(logits, (3, 5))
  chex.assert_tree_all_finite(logits)
  np.testing.assert_allclose(model.head(model.features(x)), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape, kwargs', [
    ((2, 28, 28, 1), dict(in_channels=1, image_size=28)),
    ((2, 8, 8, 1), dict(in_channels=1, image_size=8)),
    ((2, 8, 8, 1), dict(in_channels=1, image_size=8, padding='same')),
    ((2, 32, 32, 3), dict(image_size=32)),
])
def test_cnn_mnist_sizes(shape, kwargs):
  model = nnx.eval_shape(
      lambda: models.create('cnn_mnist', num_classes=10, rngs=nnx.Rngs(0), **kwargs))
  assert _out_shape(functional.logits_fn(model), shape) == (2, 10)
  assert _out_shape(functional.features_fn(model), shape) == (2, 128)


def test_cnn_mnist_rejects_too_small_and_mismatched_sizes():
  with pytest.raises(ValueError, match='too small'):
    models.create('cnn_mnist', num_classes=10, in_channels=1, image_size=5, rngs=nnx.Rngs(0))
  model = nnx.eval_shape(lambda: models.create('cnn_mnist', num_classes=10, in_channels=1,
                                               image_size=8, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'built for \(8, 8\).*\(1, 10, 10, 1\)'):
    _out_shape(functional.logits_fn(model), (1, 10, 10, 1))


@pytest.mark.parametrize('name', ['cnn_small', 'unet'])
def test_input_checks(built, name):
  model = built(name)
  with pytest.raises(ValueError, match=r'rank 4.*\(32, 32, 3\)'):
    model(_images((32, 32, 3)))
  with pytest.raises(ValueError, match=r'3 channel.*\(2, 32, 32, 1\)'):
    model(_images((2, 32, 32, 1)))
  with pytest.raises(ValueError, match='float'):
    model(jnp.zeros((2, 32, 32, 3), jnp.uint8))


def test_per_channel_normalization():
  model = nnx.eval_shape(lambda: models.create(
      'cnn_small', num_classes=3, rngs=nnx.Rngs(0), mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0)))
  assert model.mean == (0.1, 0.2, 0.3) and model.std == (1.0, 2.0, 3.0)
  with pytest.raises(ValueError, match='3 entries'):
    models.create('cnn_small', num_classes=3, rngs=nnx.Rngs(0), mean=(0.1, 0.2))


def test_dropout_only_with_key(built):
  model = built('cnn_mnist')
  x = _images((4, 32, 32, 3))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  for mode in ('train', 'eval'):
    getattr(model, mode)()
    np.testing.assert_array_equal(model(x), model(x))
    np.testing.assert_array_equal(model(x, dropout_key=k1), model(x, dropout_key=k1))
    assert not np.allclose(model(x, dropout_key=k1), model(x, dropout_key=k2))
    assert not np.allclose(model(x, dropout_key=k1), model(x))
  # Legacy uint32 keys work as well.
  model(x, dropout_key=jax.random.PRNGKey(0))


def test_logits_fn_is_pure_and_jittable(built):
  model = built('cnn_small')
  x = _images((4, 32, 32, 3))
  f = functional.logits_fn(model)
  assert isinstance(f, jax.tree_util.Partial)
  assert jax.tree.leaves(f), 'the weights must be pytree leaves, i.e. jit arguments'
  assert model.bns[0].use_running_average is False, "the caller's model stays in train mode"

  @jax.jit
  @chex.assert_max_traces(n=1)
  def predict(fn, x):
    return fn(x)

  out = predict(f, x)
  np.testing.assert_array_equal(out, predict(f, x))
  np.testing.assert_allclose(f(x), out, rtol=1e-5, atol=1e-5)
  model.eval()
  np.testing.assert_allclose(model(x), out, rtol=1e-5, atol=1e-5)
  # Another model of the same architecture reuses the compiled function.
  other = built('cnn_small')
  other.fc2.bias[...] = other.fc2.bias[...] + 1.0
  np.testing.assert_allclose(predict(functional.logits_fn(other), x), out + 1.0, rtol=1e-5,
                             atol=1e-5)
  chex.clear_trace_counter()


def test_functions_are_snapshots(built):
  model = built('cnn_small')
  model.eval()
  x = _images((2, 32, 32, 3))
  f = functional.logits_fn(model)
  before = f(x)
  model.fc2.bias[...] = model.fc2.bias[...] + 1.0
  np.testing.assert_array_equal(f(x), before)
  np.testing.assert_allclose(model(x), before + 1.0, rtol=1e-5, atol=1e-5)


def test_features_and_head_fns(built):
  model = built('cnn_mnist')
  x = _images((3, 32, 32, 3))
  feats = functional.features_fn(model)(x)
  chex.assert_shape(feats, (3, model.feature_dim))
  logits = jax.jit(lambda h, z: h(z))(functional.head_fn(model), feats)
  np.testing.assert_allclose(logits, functional.logits_fn(model)(x), rtol=1e-5, atol=1e-5)


def test_mc_logits_fn_under_vmap_and_jit(built):
  model = built('cnn_mnist')
  x = _images((3, 32, 32, 3))
  mc = functional.mc_logits_fn(model)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(mc(x, k1), mc(x, k1))
  assert not np.allclose(mc(x, k1), mc(x, k2))

  @jax.jit
  def samples(fn, x, key):
    return jax.vmap(lambda k: fn(x, k))(jax.random.split(key, 6))

  out = samples(mc, x, k1)
  chex.assert_shape(out, (6, 3, 5))
  assert not np.allclose(out[0], out[1])
  np.testing.assert_allclose(out[0], mc(x, jax.random.split(k1, 6)[0]), rtol=1e-5, atol=1e-5)


def test_input_gradients_through_logits_fn(built):
  f = functional.logits_fn(built('resnet10'))
  x = _images((2, 32, 32, 3))
  g = jax.jit(jax.grad(lambda fn, x: fn(x)[:, 0].sum(), argnums=1))(f, x)
  chex.assert_shape(g, x.shape)
  chex.assert_tree_all_finite(g)
  assert float(jnp.abs(g).sum()) > 0


def test_train_step_updates_params_and_batch_stats(built):
  model = built('cnn_small')
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x, y = _images((8, 32, 32, 3)), jnp.arange(8) % 5

  @nnx.jit
  def step(model, opt, x, y, key):
    def loss_fn(model):
      logits = model(x, dropout_key=key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  kernel, mean = model.fc2.kernel[...], model.bns[0].mean[...]
  chex.assert_tree_all_finite(step(model, opt, x, y, jax.random.key(0)))
  assert not np.allclose(model.fc2.kernel[...], kernel)
  assert not np.allclose(model.bns[0].mean[...], mean)


@pytest.mark.parametrize('size', [32, 64, 150])
def test_unet_shapes(built, size):
  seg = functional.segment_fn(built('unet'))
  out = jax.jit(lambda f, x: f(x))(seg, _images((2, size, size, 3)))
  chex.assert_shape(out, (2, size, size, 4))
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize('upsample', ['bilinear', 'transpose'])
def test_unet_upsampling_variants(upsample):
  model = nnx.eval_shape(lambda: models.create('unet', num_classes=3, width=4, levels=2,
                                               upsample=upsample, rngs=nnx.Rngs(0)))
  assert _out_shape(functional.segment_fn(model), (1, 30, 21, 3)) == (1, 30, 21, 3)


def test_segment_fn_matches_eval_mode_model(built):
  model = built('unet')
  x = _images((2, 36, 36, 3))
  out = functional.segment_fn(model)(x)
  model.eval()
  np.testing.assert_allclose(out, model(x), rtol=1e-4, atol=1e-4)


def test_classifier_functions_reject_segmenter():
  model = nnx.eval_shape(lambda: models.create('unet', num_classes=4, width=4,
                                               rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match='not a classifier'):
    functional.logits_fn(model)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 4), (1, 2, 2, 1)])
def test_max_pool_2x2_equals_reduce_window_pool_and_its_gradient(shape):
  from unmask_jax.models import base
  # Distinct positive values (no ties), as after a ReLU: forward and gradient must equal nnx's.
  x = jax.random.permutation(jax.random.key(0), np.prod(shape)).reshape(shape).astype(jnp.float32)
  ref = lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(base.max_pool_2x2(x), ref(x))
  w = jax.random.normal(jax.random.key(1), ref(x).shape)
  g = jax.grad(lambda v: jnp.sum(base.max_pool_2x2(v) * w))(x)
  g_ref = jax.grad(lambda v: jnp.sum(ref(v) * w))(x)
  np.testing.assert_array_equal(g, g_ref)
  # Each pooled cell routes its cotangent to exactly one input (the maximum).
  assert int(jnp.sum(g != 0)) == int(jnp.sum(w != 0))
