"""KL-divergence closeness detector (Tuna et al. 2021 §3.5.2, eqs. 11-12): KL(P_z || Q_pred), where
P_z is the PMF of M's last hidden activation z and Q_c the PMF of class c's mean training activation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unmask_jax.defenses import base
from unmask_jax.defenses.closeness import check_data, features_and_predictions

PMFS = ('softmax', 'normalize')


def activation_log_pmf(a, pmf: str, eps: float = 1e-6) -> jax.Array:
  """log of the PMF made from activation vectors a [..., D] (Tuna et al. 2021 §3.5.2 leaves it open).

  'softmax':   P = softmax(a), P_i = exp(a_i) / sum_j exp(a_j); works for any real activations.
  'normalize': P = (a + eps) / sum_j (a_j + eps) for non-negative (ReLU) activations; eps keeps
               zero activations (and all-zero vectors, which become uniform) from giving log 0.
  """
  a = jnp.asarray(a, jnp.float32)
  if pmf == 'softmax':
    return jax.nn.log_softmax(a, axis=-1)
  if pmf == 'normalize':
    a = a + eps
    return jnp.log(a) - jnp.log(jnp.sum(a, axis=-1, keepdims=True))
  raise ValueError(f'Unknown pmf {pmf!r}; valid: {", ".join(PMFS)}')


def kl_divergence(log_p, log_q) -> jax.Array:
  """KL(P || Q) = sum_i P_i (log P_i - log Q_i) over the last axis (Tuna et al. 2021, eq. 11)."""
  log_p, log_q = jnp.asarray(log_p), jnp.asarray(log_q)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _check_non_negative(z: np.ndarray, pmf: str, name: str) -> None:
  if pmf == 'normalize' and z.min() < 0:
    raise ValueError(f"{name}: pmf='normalize' needs non-negative (e.g. ReLU) activations, got a "
                     f"minimum of {z.min():.4g}; use pmf='softmax'.")


def make(*, pmf: str = 'softmax', eps: float = 1e-6, chunk: int = 256) -> base.Defense:
  """KL-divergence closeness detector (Tuna et al. 2021 §3.5.2, eqs. 11-12).

  fit: Q_c = PMF(mean_{i: y_i = c} z_i), the PMF of class c's mean clean training activation
  (eq. 12; TRUE labels). score(x) = KL(P_x || Q_pred) = sum_i P_x,i log(P_x,i / Q_pred,i) with
  P_x = PMF(z(x)) and pred = M's predicted class; higher = more adversarial. The PMF conversion is
  `activation_log_pmf(pmf, eps)`.
  """
  if pmf not in PMFS:
    raise ValueError(f'Unknown pmf {pmf!r}; valid: {", ".join(PMFS)}')
  if not eps > 0:
    raise ValueError(f'eps must be > 0, got {eps}')
  name = f'kl({pmf})'

  def fit(ctx, data, key):
    del key
    x, y = check_data(data, name)
    num_classes = base.num_classes_of(ctx, y)
    counts = base.check_all_classes_present(y, num_classes, name)
    z, _ = features_and_predictions(ctx, x, chunk)
    _check_non_negative(z, pmf, name)
    sums = np.zeros((num_classes, z.shape[1]), np.float64)
    np.add.at(sums, y, z)
    means = (sums / counts[:, None]).astype(np.float32)
    return {'class_mean': means, 'class_log_pmf': np.asarray(activation_log_pmf(means, pmf, eps)),
            'pmf': np.asarray(PMFS.index(pmf), np.int32)}

  def apply(state, ctx, x, key):
    del key
    z = ctx.features_fn(x)
    z = z.reshape(z.shape[0], -1)
    base.check_feature_dim(state['class_log_pmf'].shape[1], z.shape[1], name)
    pred = jnp.argmax(ctx.logits_fn(x), axis=-1)
    # pmf='normalize' needs non-negative activations (checked on the training features at fit);
    # clipping keeps log finite for the rare negative value an attack could reach.
    if pmf == 'normalize':
      z = jnp.maximum(z, 0.0)
    return base.Decision(kl_divergence(activation_log_pmf(z, pmf, eps), state['class_log_pmf'][pred]))

  def surrogate(state, ctx, x, key):
    return base.Surrogate(apply(state, ctx, x, key).score)

  return base.Defense(name, fit, apply, surrogate, chunk=chunk)


__all__ = ['PMFS', 'activation_log_pmf', 'kl_divergence', 'make']
