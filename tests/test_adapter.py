"""The adapter: models defined outside the library (Flax Linen, NNX, plain functions) attacked
through the library's pure functions, with the same result as attacking their own closures."""
from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unmask_jax import attacks
from unmask_jax.models import adapter, functional

EPS = 8 / 255


def _toy(n, seed):
  """8x8 RGB noise; the label says whether the top half is brighter than the bottom half.

  The two half-means differ by ~0.04 on average, so an L-inf change of 8/255 (~0.031 per pixel,
  ~0.063 on the difference) flips most labels of a model that has learned the rule.
  """
  x = jax.random.uniform(jax.random.key(seed), (n, 8, 8, 3))
  y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(jnp.int32)
  return x, y


class LinenCNN(linen.Module):
  def setup(self):
    self.conv = linen.Conv(8, (3, 3))
    self.fc = linen.Dense(2)

  def __call__(self, x):
    return self.fc(self.embed(x))

  def embed(self, x):
    x = linen.relu(self.conv(x))
    return x.reshape(x.shape[0], -1)


class NNXCNN(nnx.Module):
  """Library-shaped (features/head), so functional.logits_fn applies to it too."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.0, rngs=rngs)  # running stats = the last batch's
    self.fc = nnx.Linear(8 * 8 * 8, 2, rngs=rngs)

  def features(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return x.reshape(x.shape[0], -1)

  def head(self, f):
    return self.fc(f)

  def __call__(self, x):
    return self.head(self.features(x))


def _train(loss_of_params, params, steps=150):
  tx = optax.adam(0.01)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(loss_of_params)(params)
    upd, opt = tx.update(g, opt)
    return optax.apply_updates(params, upd), opt, loss

  for _ in range(steps):
    params, opt, _ = step(params, opt)
  return params


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.fixture(scope='module')
def data():
  return _toy(2048, 0), _toy(128, 1)


@pytest.fixture(scope='module')
def linen_model(data):
  (x, y), _ = data
  module = LinenCNN()
  variables = module.init(jax.random.key(0), x[:1])
  variables = _train(lambda v: _ce(module.apply(v, x), y), variables)
  return module, variables


def _check_attack(logits_fn, x, y):
  attack = attacks.compile_attack('pgd_linf(eps=8/255, steps=5)')
  x_adv = attack(logits_fn, x, y, jax.random.key(1))
  assert float(jnp.abs(x_adv - x).max()) <= EPS + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  clean = float((logits_fn(x).argmax(-1) == y).mean())
  robust = float((logits_fn(x_adv).argmax(-1) == y).mean())
  assert _ce(logits_fn(x_adv), y) > _ce(logits_fn(x), y)
  return x_adv, clean, robust


def test_linen_adapted_attack_equals_own_closure(data, linen_model):
  module, variables = linen_model
  _, (x, y) = data
  adapted = adapter.from_linen(module, variables, features_method=LinenCNN.embed)
  x_adv, clean, robust = _check_attack(adapted.logits_fn, x, y)
  print(f"linen toy: clean {clean:.3f}, robust {robust:.3f}")
  assert clean >= 0.8 and robust <= clean - 0.3, (clean, robust)
  own = attacks.compile_attack('pgd_linf(eps=8/255, steps=5)')(
      jax.tree_util.Partial(module.apply, variables), x, y, jax.random.key(1))
  np.testing.assert_allclose(np.asarray(x_adv), np.asarray(own), atol=1e-6)
  assert adapted.features_fn(x).shape == (128, 8 * 8 * 8)
  # adapt() on the bound apply is the same function.
  np.testing.assert_array_equal(np.asarray(adapter.adapt(module.apply, variables).logits_fn(x)),
                                np.asarray(adapted.logits_fn(x)))


def test_nnx_adapted_attack_equals_library_closure(data):
  (x, y), (xt, yt) = data
  model = NNXCNN(nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(state):  # train mode: batch statistics, the running averages updated and discarded
    return _ce(nnx.merge(graphdef, state)(x), y)

  state = _train(loss, state)
  nnx.update(model, state)
  model(x)  # one train-mode pass sets the BatchNorm running averages to the data's
  adapted = adapter.from_nnx(model, features_method='features')
  assert model.bn.use_running_average is False  # the caller's module is left in train mode
  x_adv, clean, robust = _check_attack(adapted.logits_fn, xt, yt)
  print(f"nnx toy: clean {clean:.3f}, robust {robust:.3f}")
  assert clean >= 0.8 and robust <= clean - 0.3, (clean, robust)
  own = attacks.compile_attack('pgd_linf(eps=8/255, steps=5)')(
      functional.logits_fn(model), xt, yt, jax.random.key(1))
  np.testing.assert_allclose(np.asarray(x_adv), np.asarray(own), atol=1e-6)
  np.testing.assert_allclose(np.asarray(adapted.features_fn(xt)),
                             np.asarray(functional.features_fn(model)(xt)), atol=1e-6)


def test_plain_function_normalization_and_pixel_range(data, linen_model):
  """mean/std and pixel_range are applied inside the function, so gradients see them."""
  module, variables = linen_model
  _, (x, y) = data
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  ref = jax.tree_util.Partial(
      lambda v, x: module.apply(v, (255.0 * x - jnp.asarray(mean)) / jnp.asarray(std)), variables)
  ad = adapter.adapt(module.apply, variables, mean=mean, std=std, pixel_range=(0, 255)).logits_fn
  # (The model was trained on [0, 1] inputs, so its logits here are ~1e3: float32 rounding of
  # differently fused but equal formulas is compared relative to that scale.)
  out, want = np.asarray(ad(x)), np.asarray(ref(x))
  np.testing.assert_allclose(out, want, atol=1e-5 * np.abs(want).max())
  g = np.asarray(jax.grad(lambda xx: ad(xx)[:, 0].sum())(x))
  g_ref = np.asarray(jax.grad(lambda xx: ref(xx)[:, 0].sum())(x))
  np.testing.assert_allclose(g, g_ref, atol=1e-5 * np.abs(g_ref).max())
  # A plain function of a weight dict (the path an Equinox model takes, via eqx.partition).
  w = {'W': jnp.ones((8 * 8 * 3, 2)) * jnp.array([1.0, -1.0]), 'b': jnp.zeros(2)}
  plain = adapter.adapt(lambda w, x: x.reshape(len(x), -1) @ w['W'] + w['b'], w)
  _check_attack(plain.logits_fn, x, (x.mean((1, 2, 3)) < 0.5).astype(jnp.int32))


def test_range_and_dtype_checks(linen_model):
  module, variables = linen_model
  f = adapter.from_linen(module, variables).logits_fn
  x = jnp.full((2, 8, 8, 3), 0.5)
  with pytest.raises(ValueError, match=r'\[0, 1\], got values in \[127.5, 127.5\]'):
    f(x * 255)
  with pytest.raises(ValueError, match='float pixels'):
    f(jnp.zeros((2, 8, 8, 3), jnp.uint8))
  unchecked = adapter.from_linen(module, variables, check_range=False).logits_fn
  assert unchecked(x * 255).shape == (2, 2)
  with pytest.raises(ValueError, match='std must be positive'):
    adapter.adapt(module.apply, variables, std=0.0)
  with pytest.raises(TypeError, match='no method'):
    adapter.from_nnx(NNXCNN(nnx.Rngs(0)), features_method='embed')
