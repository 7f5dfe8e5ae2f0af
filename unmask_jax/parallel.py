"""Data parallelism over all local devices: a batch function's batch axis sharded on a 1-D mesh.

  from unmask_jax import parallel
  x_adv = parallel.run_sharded(attack, logits_fn, x, y, key, batch_argnums=(1, 2))

`run_sharded(fn, *args, batch_argnums=...)` calls a jitted `fn` with the arguments at
`batch_argnums` (arrays or pytrees of arrays whose leading axis is the batch) padded to a multiple
of the device count and placed with `NamedSharding(Mesh(devices, ('data',)), P('data'))`; XLA
partitions the program along the batch, and every output whose leading axis is the padded batch is
cut back to the real rows. With one device it is a plain call. On a CPU the devices are the host
devices the scripts create at start-up (`unmask_jax.cli`: one per core by default), so the shards
run on different cores.

Results do not depend on the device count:
* sharding is a layout, not a change of the program: the partitioned computation is the same
  function of the same inputs (the attacks' losses are sums of per-example terms, so no example's
  gradient depends on how the batch is split);
* padding (only when the batch is not a multiple of the device count) adds rows at the END of the
  batch axis (copies of row 0, as `data.pipeline.batches` pads). jax's default random number
  generator (`jax_threefry_partitionable`, the default since jax 0.5) draws element i of an array
  from a counter equal to i's flat index, so an array of draws whose LEADING axis is the batch
  (every random start and window of the attacks, every dropout mask) keeps its values for the real
  rows when rows are appended. A draw whose batch axis is not the leading one would change; keep
  the batch a multiple of the device count (the configs' batch sizes are powers of two) to avoid
  padding altogether.
tests/test_parallel.py checks that an attack gives bitwise the same images with 1 and 2 devices,
with and without padding.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def devices() -> list:
  """The devices a batch is sharded over: the local devices of the default backend."""
  return jax.local_devices()


@functools.lru_cache(maxsize=None)
def _mesh(devs: tuple) -> Mesh:
  return Mesh(np.array(devs), (AXIS,))


def batch_sharding(devs: Sequence | None = None) -> NamedSharding:
  """Leading axis split over `devs` (default: all local devices), other axes whole."""
  return NamedSharding(_mesh(tuple(devs or devices())), P(AXIS))


def replicated(devs: Sequence | None = None) -> NamedSharding:
  """A full copy on each of `devs` (default: all local devices)."""
  return NamedSharding(_mesh(tuple(devs or devices())), P())


def padded_size(n: int, num_devices: int) -> int:
  """n rounded up to a multiple of the device count (static: one shape per batch size)."""
  return int(math.ceil(n / num_devices) * num_devices) if n else num_devices


def pad_rows(a, size: int):
  """`a` with rows appended to reach `size` rows: copies of row 0 (any real row would do)."""
  n = a.shape[0]
  if n == size:
    return a
  if n == 0:
    raise ValueError('cannot shard an empty batch')
  xp = np if isinstance(a, np.ndarray) else jnp
  return xp.concatenate([a, xp.repeat(a[:1], size - n, axis=0)], axis=0)


def _batch_size(tree) -> int:
  sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(tree) if np.ndim(leaf)}
  if len(sizes) != 1:
    raise ValueError(f'the batch arguments must share one leading (batch) size, got {sorted(sizes)}')
  return sizes.pop()


def shard_batch(tree, devs: Sequence | None = None):
  """(the arrays of `tree` padded to a multiple of the device count and split along their
  leading axis over the devices, the unpadded batch size)."""
  devs = tuple(devs or devices())
  n = _batch_size(tree)
  size = padded_size(n, len(devs))
  sharding = batch_sharding(devs)
  return jax.tree_util.tree_map(lambda a: jax.device_put(pad_rows(a, size), sharding), tree), n


def _on_mesh(tree, devs: tuple):
  """Committed arrays that live elsewhere than on all of `devs` (e.g. weights restored onto one
  device) are copied onto every device; uncommitted ones (the usual case) jit places itself."""
  mesh_set = set(devs)
  rep = replicated(devs)

  def fix(a):
    if isinstance(a, jax.Array) and getattr(a, 'committed', False) and a.sharding.device_set != mesh_set:
      return jax.device_put(a, rep)
    return a
  return jax.tree_util.tree_map(fix, tree)


def run_sharded(fn: Callable, *args, batch_argnums: Sequence[int], devs: Sequence | None = None,
                **kwargs) -> Any:
  """`fn(*args, **kwargs)` with `args[i]` (i in `batch_argnums`) sharded along their batch axis.

  `fn` should be jitted (a Python function of jitted parts also works: XLA follows the inputs'
  sharding). Outputs are jax arrays; those whose leading axis is the padded batch are cut back
  to the real rows, the rest (e.g. scalars) are returned as they are.
  """
  devs = tuple(devs or devices())
  if len(devs) == 1:
    return fn(*args, **kwargs)
  batch_argnums = tuple(batch_argnums)
  n = _batch_size([args[i] for i in batch_argnums])
  size = padded_size(n, len(devs))
  args = [shard_batch(a, devs)[0] if i in batch_argnums else _on_mesh(a, devs) for i, a in enumerate(args)]
  kwargs = {k: _on_mesh(v, devs) for k, v in kwargs.items()}
  out = fn(*args, **kwargs)
  if size == n:
    return out
  return jax.tree_util.tree_map(
      lambda o: o[:n] if isinstance(o, (jax.Array, np.ndarray)) and o.ndim and o.shape[0] == size else o, out)


def sharded(fn: Callable, batch_argnums: Sequence[int]) -> Callable:
  """`fn` wrapped by `run_sharded` (same signature)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    return run_sharded(fn, *args, batch_argnums=batch_argnums, **kwargs)
  return wrapper
