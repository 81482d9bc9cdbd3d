"""Data-parallel prompt learning on JAX's SPMD runtime: one mesh, `NamedSharding`s, and the compiler's collectives.

Layout (every binary, any number of devices or hosts, no code change for the user):

  * mesh: axes ("data", "model") over all devices of all processes (`make_mesh`); after
    `initialize_distributed` the devices of every host. "model" has size 1 unless the frozen CLIP is too
    large to replicate (ViT-L/14 towers on small accelerators).
  * the batch (images [B, S, S, 3], labels [B]) is sharded over "data" along its leading axis; B is the
    *global* batch and must be a multiple of the "data" size.
  * learner params, optimizer state, PRNG key and class state are replicated; the frozen CLIP is replicated,
    or its large leaves split over "model" (`clip_shardings`), which the compiler all-gathers per use.
  * the train step is `prompt_trainer.train_step_fn` jitted with these in/out shardings: the loss is a mean
    over the global batch, so its gradient w.r.t. the replicated params is the full-batch gradient; XLA
    inserts the all-reduce. There is no hand-written reduction, and the math equals one device's up to the
    order of floating-point sums (Monte Carlo draws are identical: `jax_threefry_partitionable` makes
    random bits independent of the sharding).

Multi-host: each process reads a disjoint, equal-sized shard of the data (`process_shard`) and contributes
its rows of every global batch (`shard_batch`: `jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bayesprompt.data.sources import LabeledSplit
from bayesprompt.train import prompt_trainer

DATA_AXIS = "data"
MODEL_AXIS = "model"
# Frozen-CLIP leaves smaller than this stay replicated under a "model" axis: splitting them saves little
# memory and costs one all-gather each.
MIN_SHARDED_LEAF_SIZE = 2**18


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """How to lay the devices out.

  Attributes:
    data: size of the "data" axis; -1 = all devices not used by "model".
    model: size of the "model" axis (frozen-CLIP parameter sharding); 1 = CLIP replicated.
    coordinator_address / num_processes / process_id: `jax.distributed.initialize` arguments for a
      multi-host run (None: single process, or auto-detected on TPU pods / SLURM / Open MPI when
      `multi_host` is set).
    multi_host: call `jax.distributed.initialize` even without a coordinator address (cluster autodetection).
  """

  data: int = -1
  model: int = 1
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  multi_host: bool = False


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, multi_host: bool = False,
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """Starts JAX's distributed runtime when asked to; returns whether it did (or already had).

  Must run before any other JAX call touches devices. With a coordinator address all three of
  (address, num_processes, process_id) are usually given (GPU clusters); with `multi_host` alone JAX detects
  them (TPU pods, SLURM, Open MPI). Nothing given: a single-process run, nothing to do.
  """
  if coordinator_address is None and not multi_host:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(f"num_processes={num_processes}, process_id={process_id} given without a "
                       "coordinator address: pass coordinator_address='host:port' (or multi_host=True)")
    return False
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes={num_processes}; expected >= 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id}; expected 0 <= process_id < num_processes={num_processes}")
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  return True


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over `devices` (default: all devices of all processes).

  Args:
    data: "data" axis size; -1 = len(devices) // model.
    model: "model" axis size (frozen-CLIP sharding).
    devices: the devices to use (a prefix of `jax.devices()` for fewer devices than available).
  Raises:
    ValueError: sizes that do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model < 1:
    raise ValueError(f"mesh model axis size {model}; expected >= 1")
  if data == -1:
    if len(devices) % model:
      raise ValueError(f"{len(devices)} devices cannot be split into model axis size {model}")
    data = len(devices) // model
  if data < 1:
    raise ValueError(f"mesh data axis size {data}; expected >= 1 or -1 (all devices)")
  if data * model > len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; {len(devices)} available")
  devices = devices[:data * model]
  if len(devices) == len(jax.devices()):
    # Topology-aware order (neighbouring devices on one "data" ring), as jax.make_mesh does.
    grid = mesh_utils.create_device_mesh((data, model), devices)
  else:
    grid = np.asarray(devices).reshape(data, model)
  # Plain Mesh: "auto" axes, the compiler propagates shardings from the jit in/out annotations.
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def mesh_from_config(config: MeshConfig) -> Mesh:
  """`initialize_distributed` (if configured) then `make_mesh`."""
  initialize_distributed(config.coordinator_address, config.num_processes, config.process_id,
                         multi_host=config.multi_host)
  return make_mesh(config.data, config.model)


def data_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def clip_shardings(clip_params: Any, mesh: Mesh, *, min_size: int = MIN_SHARDED_LEAF_SIZE) -> Any:
  """Per-leaf shardings of the frozen CLIP: replicated, or (with a "model" axis > 1) each leaf of at least
  `min_size` elements split over "model" along its largest axis that the axis size divides.

  The split is pure memory placement: the compiler all-gathers a leaf where it is used, so results equal
  the replicated model's. Returns a pytree of `NamedSharding` with the structure of `clip_params`.
  """
  model = mesh.shape[MODEL_AXIS]

  def leaf_sharding(leaf) -> NamedSharding:
    shape = np.shape(leaf)
    if model == 1 or math.prod(shape) < min_size:
      return replicated(mesh)
    candidates = [axis for axis in np.argsort(shape)[::-1] if shape[axis] % model == 0]
    if not candidates:
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[int(candidates[0])] = MODEL_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree.map(leaf_sharding, clip_params)


def _put(tree: Any, shardings: Any) -> Any:
  """Places host values (identical on every process) onto global shardings; works across hosts."""

  def put(value, sharding):
    if isinstance(value, jax.Array) and value.sharding == sharding:
      return value
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      return jax.jit(lambda x: x, out_shardings=sharding)(value)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda v: put(v, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies a pytree (params, optimizer state, class state) to every device of the mesh."""
  return _put(tree, replicated(mesh))


def place_clip(clip_params: Any, mesh: Mesh, *, min_size: int = MIN_SHARDED_LEAF_SIZE) -> Any:
  """The frozen CLIP on the mesh with `clip_shardings`."""
  return _put(clip_params, clip_shardings(clip_params, mesh, min_size=min_size))


def check_global_batch(batch_size: int, mesh: Mesh) -> int:
  """The per-process batch of a global batch; raises unless the batch divides evenly over devices."""
  devices = data_size(mesh)
  if batch_size % devices:
    raise ValueError(f"global batch size {batch_size} is not a multiple of the mesh's data axis size {devices} "
                     f"(pick a batch size divisible by {devices}, or set --mesh_data)")
  if batch_size % jax.process_count():
    raise ValueError(f"global batch size {batch_size} is not a multiple of the {jax.process_count()} processes")
  return batch_size // jax.process_count()


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host rows -> global arrays sharded over "data" along axis 0.

  `local_batch` holds this process's rows ([B / num_processes, ...]); with one process that is the whole
  batch. The global batch is the concatenation of the processes' rows in process order.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    if global_shape[0] % data_size(mesh):
      raise ValueError(f"batch {name!r} has {global_shape[0]} rows in all; not a multiple of the data axis size "
                       f"{data_size(mesh)}")
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def process_shard(split: LabeledSplit, process_index: int | None = None,
                  process_count: int | None = None) -> LabeledSplit:
  """This process's disjoint, equal-sized share of `split`: positions process_index, +process_count, ...,
  truncated to len(split) // process_count so every process runs the same number of steps (a process with
  one more batch would wait forever in the collective). One process: the split itself.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}; expected 0 <= process_index < {process_count}")
  if process_count == 1:
    return split
  per_process = len(split) // process_count
  if per_process == 0:
    raise ValueError(f"{split!r} has fewer examples than the {process_count} processes")
  return split.select(np.arange(process_index, per_process * process_count, process_count))


def make_train_step(learner, objective, optimizer: optax.GradientTransformation, mesh: Mesh,
                    clip_params: Any, *, min_size: int = MIN_SHARDED_LEAF_SIZE) -> Callable:
  """`prompt_trainer.train_step_fn` jitted over `mesh`: `step(state, clip_params, class_state, images,
  labels, teacher_text) -> (state, metrics)` with images [B, S, S, 3] / labels [B] sharded over "data"
  (global B), everything else replicated (CLIP: `clip_shardings`). State is donated.

  `clip_params` is only read for its tree structure and shapes (to build its shardings; `min_size` as in
  `clip_shardings`).
  """
  rep, batch = replicated(mesh), batch_sharding(mesh)
  return jax.jit(prompt_trainer.train_step_fn(learner, objective, optimizer),
                 in_shardings=(rep, clip_shardings(clip_params, mesh, min_size=min_size), rep, batch, batch, rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def make_predict_step(learner, mesh: Mesh, clip_params: Any, *, min_size: int = MIN_SHARDED_LEAF_SIZE) -> Callable:
  """Sharded `predict(params, clip_params, class_state, images, key) -> probs [B, C]`: images split over
  "data", the probabilities gathered (replicated) so every process can read all of them."""
  rep = replicated(mesh)
  return jax.jit(prompt_trainer.predict_fn(learner),
                 in_shardings=(rep, clip_shardings(clip_params, mesh, min_size=min_size), rep, batch_sharding(mesh), rep),
                 out_shardings=rep)


def gather_rows(array: jax.Array) -> np.ndarray:
  """All rows of a global array as NumPy on every process (a no-op copy on one process)."""
  if array.is_fully_addressable or array.is_fully_replicated:
    return np.asarray(array)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def evaluate(learner, params, clip_params, split: LabeledSplit, mesh: Mesh, *, batch_size: int, seed: int,
             max_examples: int | None = None, progress: bool = False, predict: Callable | None = None,
             class_state: Any = None, train_classnames: Sequence[str] | None = None) -> dict[str, float]:
  """`prompt_run.evaluate` over a mesh: accuracy / nll / ece / brier of the predictive probabilities.

  Each process reads its `process_shard` of the split (padded to whole global batches with label -1), the
  batch is split over "data", and the padded rows are dropped by label. Metrics are permutation-invariant,
  so they equal one device's up to float rounding. Monte Carlo learners draw per-batch keys
  fold_in(seed, i), as on one device; with several processes the batches hold other examples, so their
  draws differ.
  """
  import tqdm

  from bayesprompt.data import pipeline, protocols
  from bayesprompt.eval import metrics as metrics_lib

  per_process = check_global_batch(batch_size, mesh)
  if class_state is None:
    class_state = learner.prepare_classes(clip_params, split.classnames, templates=[split.template],
                                          train_classnames=train_classnames)
  class_state = replicate(class_state, mesh)
  split = protocols.evaluation_subset(split, max_examples)
  # Every process must run the same number of batches: pad the shards to the largest one's batch count.
  process_count = jax.process_count()
  largest = -(-len(split) // process_count)
  num_batches = -(-largest // per_process)
  local = _padded_process_shard(split, jax.process_index(), process_count)
  predict = predict or make_predict_step(learner, mesh, clip_params)
  batches = pipeline.make_pipeline(local, image_size=learner.clip_config.vision.image_size,
                                   batch_size=per_process, train=False) if len(local) else []
  key = jax.random.key(seed)
  stream = pipeline.iterate_padded(batches, per_process)
  probs, labels = [], []
  for i in tqdm.tqdm(range(num_batches), desc=f"eval {split.dataset}/{split.split}", disable=not progress,
                     leave=False):
    batch, _ = next(stream, (None, 0))
    if batch is None:  # this process's shard is used up: contribute padding rows
      size = learner.clip_config.vision.image_size
      batch = {"image": np.zeros((per_process, size, size, 3), np.float32),
               "label": np.full((per_process,), -1, np.int32)}
    sharded = shard_batch({"image": batch["image"], "label": batch["label"].astype(np.int32)}, mesh)
    p = predict(params, clip_params, class_state, sharded["image"], jax.random.fold_in(key, i))
    probs.append(gather_rows(p))
    labels.append(gather_rows(sharded["label"]))
  probs_all, labels_all = np.concatenate(probs), np.concatenate(labels)
  valid = labels_all >= 0
  probs_all, labels_all = jnp.asarray(probs_all[valid]), jnp.asarray(labels_all[valid])
  return metrics_lib.probability_metrics(probs_all, labels_all)


def _padded_process_shard(split: LabeledSplit, process_index: int, process_count: int) -> LabeledSplit:
  """Positions process_index, +process_count, ... of all of `split` (no truncation: evaluation sees every
  example; shards differ in length by at most one, the shortfall is padded by the caller)."""
  if process_count == 1:
    return split
  return split.select(np.arange(process_index, len(split), process_count))
