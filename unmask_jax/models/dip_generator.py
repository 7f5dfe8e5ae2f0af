"""The Deep Image Prior generator (Ulyanov et al. 2018, "Deep image prior"): the 'skip'
encoder-decoder that Deep Protection (`defenses.deep_protection`) fits to one image, as pure
functions of a params pytree for ONE image [H, W, C] (callers vmap over images).

`DIPConfig` holds the network and its optimiser settings (hashable: a static argument of the
jitted restoration). Convolutions are im2col matmuls by default because vmapped per-image kernels
become grouped convolutions, which XLA:CPU runs slowly (BENCHMARKS.md, "Deep Protection").
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

CONVS = ('im2col', 'lax')


@dataclasses.dataclass(frozen=True)
class DIPConfig:
  """Generator and optimiser settings (hashable: a static argument of the jitted functions).

  Attributes:
    widths: channels of each scale of the encoder-decoder (one downsampling per scale).
    skip_channels: channels of each skip connection (DIP reference: 4).
    input_depth: channels of the fixed noise input z (DIP reference: 32).
    input_scale: z ~ U(0, 1) * input_scale (DIP reference: 0.1).
    reg_noise_std: std of the per-step jitter added to z (DIP reference: 1/30).
    lr: Adam learning rate (0.01).
    ema: output averaging weight (0.99).
    conv: 'im2col' (batched matmuls) or 'lax' (XLA convolutions).
  """
  widths: tuple = (32, 64, 64)
  skip_channels: int = 4
  input_depth: int = 8
  input_scale: float = 0.1
  reg_noise_std: float = 1.0 / 30.0
  lr: float = 0.01
  ema: float = 0.99
  conv: str = 'im2col'

  def __post_init__(self):
    if not self.widths or min(self.widths) < 1 or self.skip_channels < 0 or self.input_depth < 1:
      raise ValueError(f'Invalid DIP network sizes: {self}')
    if self.conv not in CONVS:
      raise ValueError(f'conv must be one of {CONVS}, got {self.conv!r}')
    if not 0.0 <= self.ema < 1.0 or not self.lr > 0:
      raise ValueError(f'Need 0 <= ema < 1 and lr > 0, got ema={self.ema}, lr={self.lr}')


# ----------------------------------------------------------------------------------------------
# The generator: pure functions of a params pytree, for ONE image [H, W, C] (vmapped by callers).


def _conv_params(draw, k, c_in, c_out):
  # PyTorch's default init, as in the DIP reference code: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / math.sqrt(c_in * k * k)
  return {'w': bound * draw((k, k, c_in, c_out)), 'b': bound * draw((c_out,))}


def _norm_params(c):
  return {'scale': jnp.ones((c,)), 'bias': jnp.zeros((c,))}


def _build_generator(draw, cfg: DIPConfig, out_channels: int) -> dict:
  levels, c_in = [], cfg.input_depth
  for w in cfg.widths:
    level = {'d1': _conv_params(draw, 3, c_in, w), 'd1_n': _norm_params(w),
             'd2': _conv_params(draw, 3, w, w), 'd2_n': _norm_params(w)}
    if cfg.skip_channels:
      level['s'] = _conv_params(draw, 1, c_in, cfg.skip_channels)
      level['s_n'] = _norm_params(cfg.skip_channels)
    levels.append(level)
    c_in = w
  deeper = cfg.widths[-1]
  for i in reversed(range(len(cfg.widths))):
    w, cat = cfg.widths[i], cfg.skip_channels + deeper
    levels[i].update({'cat_n': _norm_params(cat),
                      'u1': _conv_params(draw, 3, cat, w), 'u1_n': _norm_params(w),
                      'u2': _conv_params(draw, 1, w, w), 'u2_n': _norm_params(w)})
    deeper = w
  return {'levels': levels, 'out': _conv_params(draw, 1, cfg.widths[0], out_channels)}


def init_generator(key: jax.Array, cfg: DIPConfig, out_channels: int) -> dict:
  """Random DIP 'skip' encoder-decoder parameters for one image.

  Per scale i (widths[i] channels): skip = act(norm(conv1x1(x))); down = act(norm(conv3x3(
  act(norm(conv3x3/2(x)))))); decoder: act(norm(conv1x1(act(norm(conv3x3(norm([skip, up2(deeper)
  ]))))))); output = sigmoid(conv1x1(.)) so pixels stay in (0, 1). Weights and biases are
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scales 1, biases 0.
  """
  # All weights are slices of ONE uniform draw: one threefry call per image instead of one per
  # tensor, which cut the compile time of the vmapped initialiser from ~10 s to well under 1 s.
  sizes = []
  _build_generator(lambda shape: sizes.append(math.prod(shape)) or 0.0, cfg, out_channels)
  flat = jax.random.uniform(key, (sum(sizes),), minval=-1.0, maxval=1.0)
  offset = 0

  def draw(shape):
    nonlocal offset
    size = math.prod(shape)
    out = flat[offset:offset + size].reshape(shape)
    offset += size
    return out

  return _build_generator(draw, cfg, out_channels)


def _conv(x, p, cfg: DIPConfig, stride: int = 1):
  """k x k convolution of one image [H, W, C] with reflection padding (as the DIP reference)."""
  w = p['w']
  k = w.shape[0]
  if k > 1:
    x = jnp.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode='reflect')
  if cfg.conv == 'lax':
    y = jax.lax.conv_general_dilated(x[None], w, (stride, stride), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))[0]
  else:
    h_out = (x.shape[0] - k) // stride + 1
    w_out = (x.shape[1] - k) // stride + 1
    # im2col: the k^2 shifted (strided) views side by side, then one matmul; under vmap this is a
    # batched matmul instead of XLA:CPU's slow grouped convolution.
    end = lambda d, n: d + (n - 1) * stride + 1
    cols = [jax.lax.slice(x, (dy, dx, 0), (end(dy, h_out), end(dx, w_out), x.shape[2]),
                          (stride, stride, 1))
            for dy in range(k) for dx in range(k)]
    y = jnp.concatenate(cols, axis=-1) @ w.reshape(-1, w.shape[-1])
  return y + p['b']


def _norm(x, p, eps: float = 1e-5):
  # DIP trains with BatchNorm on a batch of one image, i.e. statistics over the spatial axes of
  # that image; vmapped per image, this is exactly that.
  mean = jnp.mean(x, axis=(0, 1))
  var = jnp.var(x, axis=(0, 1))
  return (x - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']


def generator_apply(params: dict, z: jax.Array, cfg: DIPConfig) -> jax.Array:
  """G_theta(z): noise [H, W, input_depth] -> image [H, W, C] in (0, 1).

  H and W must be multiples of 2^len(widths) (`dip_restore` pads z and crops the output).
  """
  act = jax.nn.swish  # Kulkarni & Ambati chose swish over DIP's LeakyReLU.
  x, skips = z, []
  for lv in params['levels']:
    skips.append(act(_norm(_conv(x, lv['s'], cfg), lv['s_n'])) if 's' in lv else None)
    x = act(_norm(_conv(x, lv['d1'], cfg, stride=2), lv['d1_n']))
    x = act(_norm(_conv(x, lv['d2'], cfg), lv['d2_n']))
  for lv, skip in zip(reversed(params['levels']), reversed(skips)):
    x = jax.image.resize(x, (2 * x.shape[0], 2 * x.shape[1], x.shape[2]), 'bilinear')
    if skip is not None:
      x = jnp.concatenate([skip, x], axis=-1)
    x = _norm(x, lv['cat_n'])
    x = act(_norm(_conv(x, lv['u1'], cfg), lv['u1_n']))
    x = act(_norm(_conv(x, lv['u2'], cfg), lv['u2_n']))
  return jax.nn.sigmoid(_conv(x, params['out'], cfg))
