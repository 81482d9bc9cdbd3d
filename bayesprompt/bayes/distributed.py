"""KFAC factor accumulation and EPIG scoring sharded over a device mesh's "data" axis.

KFAC: the factor sums are sums over samples, so each device streams its own rows through
`laplace.kfac_update` (from a zero state) and the partial sums are added across devices by one
`jax.lax.psum` that the compiler lowers to an all-reduce. EPIG: scores of different pool points are
independent, so the pool is split over devices and every device scores its part against all targets.
Both equal the single-device result up to the order of floating-point sums.

Inputs may be host arrays (identical on every process) or global `jax.Array`s of any sharding, e.g. tower
outputs sharded over "data" whose rows were read by different processes (`bayesvlm.hessian`). Results are
replicated over the mesh, so every process can read them with `np.asarray`.

Meshes come from `bayesprompt.train.distributed.make_mesh` (axes "data", "model"; "model" is unused here).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bayesprompt.bayes import acquisition, laplace

DATA_AXIS = "data"

Array = jax.Array


def _data_size(mesh: Mesh) -> int:
  if DATA_AXIS not in mesh.shape:
    raise ValueError(f"mesh has axes {tuple(mesh.shape)}; expected a {DATA_AXIS!r} axis")
  return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def place(value: Any, sharding: NamedSharding) -> Array:
  """`value` as a global array on `sharding`.

  A global array (spanning other processes' devices) is resharded by the compiler; a host value or a
  single-process array must be identical on every process: each process fills its own devices' shards
  from its copy (`jax.device_put` cannot address other hosts' devices).
  """
  if isinstance(value, jax.Array):
    if value.sharding == sharding:
      return value
    if not value.is_fully_addressable:
      return jax.jit(lambda x: x, out_shardings=sharding)(value)
  if sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _as_global(value: Any, mesh: Mesh) -> Array:
  """Global arrays on `mesh` are kept as they are; anything else is replicated over it."""
  if isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh:
    return value
  return place(value, replicated(mesh))


def kfac_update_sharded(
  state: laplace.KFACState,
  features: Array,
  embeddings: Array,
  targets: Array,
  logit_scale: Array | float,
  mesh: Mesh,
  *,
  num_valid: int | None = None,
  num_targets: int | None = None,
  likelihood: str = "infonce",
  logit_bias: Array | float = 0.0,
  add_bias: bool = False,
  chunk_size: int | None = 512,
  precision: Any = None,
) -> laplace.KFACState:
  """`laplace.kfac_update` with the samples split over the mesh's "data" axis.

  Args:
    state: running sums (host, one device, or replicated over `mesh`).
    features: [N, d_in]; embeddings: [N, D]; targets: [C, D] (gathered to every device). Host arrays or
      global arrays of any sharding. See `laplace.kfac_update` for the rest.
    mesh: a mesh with a "data" axis of size P.
    num_valid: only the first `num_valid` rows of features / embeddings count (the rest is padding, e.g. of
      a batch padded to a multiple of the device count); None: all N.
    num_targets: only the first `num_targets` rows of targets are the class batch; None: all C.
  Returns:
    The updated state, replicated over `mesh`.

  The first M − M mod P valid rows (M = num_valid) are split evenly over the P devices; each device sums
  its rows from a zero state and the partial sums are reduced with `psum`. The M mod P leftover rows are
  added by a plain `kfac_update` in the same compiled step (padding them instead would need a mask: a zero
  embedding has no GGN). One compilation per (shapes, num_valid, num_targets).
  """
  devices = _data_size(mesh)
  if np.ndim(features) != 2 or np.ndim(embeddings) != 2 or np.shape(embeddings)[0] != np.shape(features)[0]:
    raise ValueError(f"expected features [N, d_in] and embeddings [N, D] with the same N; got "
                     f"{np.shape(features)}, {np.shape(embeddings)}")
  num = np.shape(features)[0]
  num_valid = num if num_valid is None else int(num_valid)
  if not 0 <= num_valid <= num:
    raise ValueError(f"num_valid={num_valid}; expected 0 <= num_valid <= {num} (the number of rows)")
  if np.ndim(targets) == 2:
    num_targets = np.shape(targets)[0] if num_targets is None else int(num_targets)
    if not 0 < num_targets <= np.shape(targets)[0]:
      raise ValueError(f"num_targets={num_targets}; expected 1 <= num_targets <= {np.shape(targets)[0]}")
  # Shapes and likelihood checked on the host by kfac_update itself (clear errors) before any tracing.
  dtype = np.dtype(state.b_sum.dtype)
  laplace.kfac_update(laplace.KFACState(*(np.zeros(np.shape(x), np.dtype(x.dtype)) for x in state)),
                      np.zeros((0, np.shape(features)[1]), dtype), np.zeros((0, np.shape(embeddings)[1]), dtype),
                      np.zeros((1, *np.shape(targets)[1:]), dtype), logit_scale, likelihood=likelihood,
                      logit_bias=logit_bias, add_bias=add_bias, chunk_size=chunk_size, precision=precision)
  state = jax.tree.map(lambda x: place(x, replicated(mesh)), state)
  if num_valid == 0:
    return state
  scale, bias = (place(np.asarray(v, dtype) if not isinstance(v, jax.Array) else v.astype(dtype), replicated(mesh))
                 for v in (logit_scale, logit_bias))
  features, embeddings, targets = (_as_global(x, mesh) for x in (features, embeddings, targets))
  return _sharded_update(mesh, state, features, embeddings, targets, scale, bias, num_valid=num_valid,
                         num_targets=num_targets, even=num_valid - num_valid % devices, likelihood=likelihood,
                         add_bias=add_bias, chunk_size=chunk_size, precision=precision)


@functools.partial(jax.jit, static_argnames=("mesh", "num_valid", "num_targets", "even", "likelihood", "add_bias",
                                             "chunk_size", "precision"))
def _sharded_update(mesh, state, features, embeddings, targets, logit_scale, logit_bias, *, num_valid, num_targets,
                    even, likelihood, add_bias, chunk_size, precision):
  rep, rows = replicated(mesh), NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  # The class batch's targets on every device (an all-gather when they arrive sharded).
  targets = jax.lax.with_sharding_constraint(targets[:num_targets], rep)
  zero = jax.tree.map(jnp.zeros_like, state)
  kwargs = dict(likelihood=likelihood, add_bias=add_bias, chunk_size=chunk_size, precision=precision)
  if even:

    def local(zero, phi, emb, targets, logit_scale, logit_bias):
      partial = laplace.kfac_update(zero, phi, emb, targets, logit_scale, logit_bias=logit_bias, **kwargs)
      return jax.tree.map(lambda x: jax.lax.psum(x, DATA_AXIS), partial)

    # Rows [0, even) split evenly over "data": the compiler moves them there from wherever they are.
    phi, emb = (jax.lax.with_sharding_constraint(x[:even], rows) for x in (features, embeddings))
    partial = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS),
                                                        PartitionSpec(DATA_AXIS), PartitionSpec(), PartitionSpec(),
                                                        PartitionSpec()),
                            out_specs=PartitionSpec())(zero, phi, emb, targets, logit_scale, logit_bias)
    state = laplace.kfac_combine(state, partial)
  if even < num_valid:
    state = laplace.kfac_update(state, features[even:num_valid], embeddings[even:num_valid], targets, logit_scale,
                                logit_bias=logit_bias, **kwargs)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), state)


def epig_sharded(
  pool_probs: Array,
  target_probs: Array,
  mesh: Mesh,
  *,
  pool_chunk: int | None = None,
  target_chunk: int | None = None,
  max_working_bytes: int = 2**28,
  gather: bool = False,
) -> Array:
  """`acquisition.epig` with the pool split over the mesh's "data" axis; targets replicated.

  Args:
    pool_probs: [N, K, C]; target_probs: [N*, K, C*]; chunks and budget as in `acquisition.epig`
      (per device: each device's working set obeys `max_working_bytes`). Host arrays (identical on every
      process) or global arrays.
    mesh: a mesh with a "data" axis of size P.
    gather: return the scores replicated over the mesh (readable on every process) instead of sharded.
  Returns:
    [N] EPIG scores, sharded over "data" (replicated with `gather`).

  The pool is padded to a multiple of P with uniform probabilities (valid inputs; their scores are dropped).
  """
  devices = _data_size(mesh)
  if np.ndim(pool_probs) != 3 or np.ndim(target_probs) != 3:
    raise ValueError(f"expected pool_probs [N, K, C] and target_probs [N*, K, C*]; got shapes "
                     f"{np.shape(pool_probs)}, {np.shape(target_probs)}")
  num_pool, num_samples, num_classes = np.shape(pool_probs)
  padded = -(-num_pool // devices) * devices
  dtype = jnp.result_type(pool_probs.dtype, target_probs.dtype, jnp.float32)
  local_pool_chunk, target_chunk = acquisition.epig_chunks(
    padded // devices, np.shape(target_probs)[0], num_classes, np.shape(target_probs)[2], pool_chunk=pool_chunk,
    target_chunk=target_chunk, max_working_bytes=max_working_bytes, itemsize=np.dtype(dtype).itemsize)
  pool_probs, target_probs = (_as_global(x, mesh) for x in (pool_probs, target_probs))
  scores = _epig_shard_map(mesh, pool_probs, target_probs, padded=padded, pool_chunk=local_pool_chunk,
                           target_chunk=target_chunk)
  scores = scores[:num_pool]
  return place(scores, replicated(mesh)) if gather else scores


@functools.partial(jax.jit, static_argnames=("mesh", "padded", "pool_chunk", "target_chunk"))
def _epig_shard_map(mesh, pool_probs, target_probs, *, padded, pool_chunk, target_chunk):
  num_pool, num_samples, num_classes = pool_probs.shape
  if padded > num_pool:
    fill = jnp.full((padded - num_pool, num_samples, num_classes), 1.0 / num_classes, pool_probs.dtype)
    pool_probs = jnp.concatenate([pool_probs, fill])
  pool_probs = jax.lax.with_sharding_constraint(pool_probs, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
  target_probs = jax.lax.with_sharding_constraint(target_probs, replicated(mesh))
  local = functools.partial(acquisition.epig, pool_chunk=pool_chunk, target_chunk=target_chunk)
  # check_vma=False: epig's scans start from unsharded zeros and add per-device values; the per-device
  # function is the plain one, nothing crosses devices, so the varying-axis bookkeeping has nothing to check.
  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(DATA_AXIS), PartitionSpec()),
                       out_specs=PartitionSpec(DATA_AXIS), check_vma=False)(pool_probs, target_probs)
