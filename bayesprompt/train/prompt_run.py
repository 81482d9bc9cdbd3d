"""One prompt-learning run: config -> learner, objective, data, train loop, evaluation, results.

Binaries (experiments/prompt_learning.py, experiments/ove_pg.py) only turn flags into a `PromptRunConfig`
and call `run`; all the wiring lives here so every binary trains and evaluates the same way.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

import bayesprompt.clip as clip
from bayesprompt.data import get_dataset, pipeline, protocols
from bayesprompt.data.sources import LabeledSplit
from bayesprompt.errors import UserError
from bayesprompt.eval import metrics as metrics_lib
from bayesprompt.eval.zeroshot import evaluate_split
from bayesprompt.objectives import make_objective
from bayesprompt.prompts import make_learner
from bayesprompt.prompts.engine import zeroshot_text_features
from bayesprompt.train import checkpoint as checkpoint_lib
from bayesprompt.train import distributed, optim, prompt_trainer
from bayesprompt.train import run_dir as run_dir_lib
from bayesprompt.train.checkpoint import CheckpointManager
from bayesprompt.train.run_dir import RunDir

# The protocols a prompt run trains under: the data layer's, less zero-shot "all".
PROTOCOLS = tuple(p for p in protocols.PROTOCOLS if p != "all")
RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class PromptRunConfig:
  """Everything that defines a run (stored in the run directory; a resume must match it)."""

  method: str = "coop"
  objective: str = "ce"
  protocol: str = "base2new"
  dataset: str = "sandbox_shapes"
  # Protocol: one of PROTOCOLS; an old name ("fewshot", "xd", "dg") is translated, with a FutureWarning.
  # targets: cross_dataset / domain_generalization target datasets (default: the protocol's own list).
  targets: tuple[str, ...] = ()
  # Further test sets evaluated with the same protocol (base2new: their base and new classes), e.g. the
  # sandbox's shifted variants next to base-to-new.
  extra_eval_datasets: tuple[str, ...] = ()
  checkpoint: str = "sandbox"
  data_dir: str | None = None
  # "tfds" or "folder" (Dassl split files) for every dataset the run reads; None: each dataset's default
  # (bayesprompt/data/README.md). data_dir is the TFDS data_dir or the Dassl data root accordingly.
  source: str | None = None
  # Few-shot draw: "dassl" (CoOp's images) or "nested"; None: the dataset's default. on_short: a class with
  # fewer than num_shots examples gives all it has ("all", Dassl's behaviour) or an error ("error").
  few_shot_sampler: str | None = None
  on_short: str = "all"
  num_shots: int = 16
  seed: int = 1
  epochs: int = 10
  batch_size: int = 32
  optimizer: str = "sgd"
  lr: float = 2e-3
  weight_decay: float = 5e-4
  momentum: float = 0.9
  warmup_epochs: int = 1
  warmup_lr: float = 1e-5
  learner_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  objective_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_batch_size: int = 128
  max_eval_examples: int | None = None
  compute_dtype: str = "float32"

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      object.__setattr__(self, "protocol", protocols.canonical_protocol(self.protocol))
    if self.protocol == "all":
      raise UserError(f"protocol 'all' is zero-shot evaluation, not a training protocol; expected one of "
                       f"{PROTOCOLS}")

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def protocol_data(cfg: PromptRunConfig) -> protocols.ProtocolData:
  sampling = dict(sampler=cfg.few_shot_sampler, on_short=cfg.on_short)
  if cfg.protocol == "base2new":
    return protocols.base_to_new(cfg.dataset, seed=cfg.seed, num_shots=cfg.num_shots, data_dir=cfg.data_dir,
                                 source=cfg.source, **sampling)
  if cfg.protocol == "few_shot":
    return protocols.few_shot(cfg.dataset, seed=cfg.seed, num_shots=cfg.num_shots, data_dir=cfg.data_dir,
                              source=cfg.source, **sampling)
  kwargs = dict(seed=cfg.seed, num_shots=cfg.num_shots, source_dataset=cfg.dataset, data_dir=cfg.data_dir,
                **sampling)
  if cfg.targets:
    kwargs["targets"] = list(cfg.targets)
  elif cfg.dataset.startswith("sandbox"):
    from bayesprompt.data import sandbox

    cross_dataset = cfg.protocol == "cross_dataset"
    kwargs["targets"] = list(sandbox.CROSS_DATASET_TARGETS if cross_dataset else sandbox.SHIFT_TARGETS)
  if cfg.source is not None:
    targets = kwargs.get("targets", _default_targets(cfg))
    kwargs["sources"] = {name: cfg.source for name in (cfg.dataset, *targets)}
  if cfg.protocol == "cross_dataset":
    return protocols.cross_dataset(**kwargs)
  if cfg.protocol == "domain_generalization":
    return protocols.domain_generalization(**kwargs)
  raise UserError(f"unknown protocol {cfg.protocol!r}; expected one of {PROTOCOLS}")


def _default_targets(cfg: PromptRunConfig) -> tuple[str, ...]:
  from bayesprompt.data.datasets import IMAGENET_CROSS_DATASET_TARGETS, IMAGENET_SHIFT_TARGETS

  return IMAGENET_CROSS_DATASET_TARGETS if cfg.protocol == "cross_dataset" else IMAGENET_SHIFT_TARGETS


def evaluation_splits(cfg: PromptRunConfig, data: protocols.ProtocolData | None = None,
                      extra_eval_datasets: Sequence[str] | None = None) -> dict[str, LabeledSplit]:
  """{name: split} of the protocol's test splits plus those of the extra datasets ("<dataset>/<split>";
  base2new: their base and new classes; opened, so checked, before any training). `extra_eval_datasets` None:
  the config's."""
  data = data or protocol_data(cfg)
  evals = dict(data.evals)
  extras = cfg.extra_eval_datasets if extra_eval_datasets is None else extra_eval_datasets
  for extra in extras:
    if cfg.protocol == "base2new":
      extra_data = protocols.base_to_new(extra, seed=cfg.seed, num_shots=cfg.num_shots, train=False,
                                         data_dir=cfg.data_dir, source=cfg.source)
    else:
      extra_data = protocols.zero_shot(extra, protocol="all", data_dir=cfg.data_dir, source=cfg.source)
    evals.update({f"{extra}/{name}": split for name, split in extra_data.evals.items()})
  return evals


def class_prototypes(clip_params, clip_config: clip.CLIPConfig, split: LabeledSplit, batch_size: int) -> jax.Array:
  """Mean normalised frozen-CLIP image feature of each class over `split` [C, D] (VaMP's class-aware prior)."""
  batches = pipeline.make_pipeline(split, image_size=clip_config.vision.image_size, batch_size=batch_size,
                                   train=False)
  sums = np.zeros((split.num_classes, clip_config.embed_dim), np.float64)
  counts = np.zeros(split.num_classes)
  for batch, n in pipeline.iterate_padded(batches, batch_size):
    features = np.asarray(clip.normalize(clip.encode_image(clip_params, batch["image"], config=clip_config)))[:n]
    np.add.at(sums, batch["label"][:n], features)
    np.add.at(counts, batch["label"][:n], 1)
  if np.any(counts == 0):
    missing = [split.classnames[i] for i in np.flatnonzero(counts == 0)]
    raise ValueError(f"no training images for classes {missing}: cannot build class prototypes")
  return jnp.asarray(sums / counts[:, None], jnp.float32)


def evaluate(learner, params, clip_params, split: LabeledSplit, *, batch_size: int, seed: int,
             max_examples: int | None = None, progress: bool = True, predict=None,
             train_classnames: Sequence[str] | None = None) -> dict[str, float]:
  """accuracy / nll / ece / brier of the learner's predictive probabilities over `split` (its own classes).

  `train_classnames`: the classes the learner was trained on (APEX's and MMRL's test-time rules need them;
  default: the split's own classes)."""
  class_state = learner.prepare_classes(clip_params, split.classnames, templates=[split.template],
                                        train_classnames=train_classnames)
  split = protocols.evaluation_subset(split, max_examples)
  predict = predict or prompt_trainer.make_predict_step(learner)
  batches = pipeline.make_pipeline(split, image_size=learner.clip_config.vision.image_size, batch_size=batch_size,
                                   train=False)
  key = jax.random.key(seed)
  probs, labels = [], []
  bar = tqdm.tqdm(pipeline.iterate_padded(batches, batch_size), total=-(-len(split) // batch_size),
                  desc=f"eval {split.dataset}/{split.split}", unit="batch", disable=not progress, leave=False)
  for i, (batch, n) in enumerate(bar):
    p = predict(params, clip_params, class_state, jnp.asarray(batch["image"]), jax.random.fold_in(key, i))
    probs.append(np.asarray(p)[:n])
    labels.append(batch["label"][:n])
  probs_all = jnp.asarray(np.concatenate(probs))
  labels_all = jnp.asarray(np.concatenate(labels).astype(np.int32))
  return metrics_lib.probability_metrics(probs_all, labels_all)


def zero_shot(cfg: PromptRunConfig, *, progress: bool = True,
              clip_model: tuple[clip.CLIPConfig, Any] | None = None) -> dict[str, dict[str, float]]:
  """The reference row of a prompt-learning table: the frozen CLIP with each split's hand-crafted template on
  the splits `run` evaluates (same subsets under `max_eval_examples`). Returns {split: accuracy / nll / ece /
  brier}."""
  clip_config, clip_params = clip_model or clip.load_checkpoint(cfg.checkpoint)
  out = {}
  for name, split in evaluation_splits(cfg).items():
    text = zeroshot_text_features(clip_params, clip_config, split.classnames, split.template)
    out[name] = evaluate_split(clip_params, clip_config, text, split, batch_size=cfg.eval_batch_size,
                               max_examples=cfg.max_eval_examples, progress=progress,
                               description=f"zero-shot {name}")["metrics"]
  return out


def finished_results(cfg: PromptRunConfig, run_dir: str | pathlib.Path) -> dict[str, dict[str, float]] | None:
  """The results of a finished run of `cfg` in `run_dir` (its results.json), or None if it has not finished.
  A finished run of another configuration raises UserError listing the differences."""
  path = pathlib.Path(run_dir) / RESULTS_FILE
  if not path.exists():
    return None
  stored = json.loads(path.read_text())
  diffs = checkpoint_lib.config_differences(stored["config"], cfg.to_json())
  if diffs:
    raise UserError(f"cannot resume {run_dir}: it holds a finished run of another config ({len(diffs)} "
                    f"difference(s): {'; '.join(diffs)}); use the same flags, --overwrite, or a fresh directory")
  return stored["results"]


def run(cfg: PromptRunConfig, run_dir: str | pathlib.Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, clip_model: tuple[clip.CLIPConfig, Any] | None = None,
        mesh: jax.sharding.Mesh | None = None, verify_images: bool = False,
        tensorboard: bool = True) -> dict[str, dict[str, float]]:
  """Trains `cfg.method` with `cfg.objective` and evaluates on the protocol's test splits.

  With a `mesh` (`bayesprompt.train.distributed.make_mesh`) training and evaluation run data-parallel over
  it: `cfg.batch_size` is the global batch, each process reads its own shard of the data. None: one device.

  Checkpoints (orbax) are written at the end of every epoch into run_dir/checkpoints. `resume`: a finished
  run (results.json) is read back, not retrained; a started one continues from its newest intact checkpoint
  (same RNG stream and data order, so the result equals an uninterrupted run); one never started starts.
  Without `resume` a directory that already holds a run is refused (UserError naming --resume and
  --overwrite); `overwrite` deletes that run first. Every split (train, val, every test set) is opened before
  training, so a bad split file or a missing image fails first; `verify_images` also decodes every image of
  every split once (with progress). Returns {eval split name: metrics}; also writes run_dir/results.json
  (atomically: it marks the run finished).
  """
  run_dir = pathlib.Path(run_dir)
  run_dir_lib.check_fresh(run_dir, resume=resume, overwrite=overwrite)
  if resume:
    finished = finished_results(cfg, run_dir)
    if finished is not None:
      logging.info("%s is finished: results read back from %s", run_dir, RESULTS_FILE)
      return finished
  data = protocol_data(cfg)  # first: bad data fails before the model is even loaded
  evals = evaluation_splits(cfg, data)
  if verify_images:
    for split in (data.train, data.val, *evals.values()):
      pipeline.verify_images(split, progress=progress)
  clip_config, clip_params = clip_model or clip.load_checkpoint(cfg.checkpoint)
  clip_config = clip_config.replace(dtype=cfg.compute_dtype)
  learner = make_learner(cfg.method, clip_config, **dict(cfg.learner_kwargs))
  objective = make_objective(cfg.objective, **dict(cfg.objective_kwargs))
  train_split = data.train
  prototypes = None
  if getattr(learner, "needs_class_prototypes", False):
    prototypes = class_prototypes(clip_params, clip_config, train_split, cfg.eval_batch_size)
  class_state = learner.prepare_classes(clip_params, train_split.classnames, templates=[train_split.template],
                                        class_prototypes=prototypes, train_classnames=train_split.classnames)
  teacher_text = zeroshot_text_features(clip_params, clip_config, train_split.classnames,
                                        train_split.template)
  crop_scale = get_dataset(cfg.dataset).train_crop_scale
  # Data-parallel: this process's share of the data and of every global batch (one process: all of both).
  local_split = train_split if mesh is None else distributed.process_shard(train_split)
  local_batch = cfg.batch_size if mesh is None else distributed.check_global_batch(cfg.batch_size, mesh)
  steps_per_epoch = len(local_split) // local_batch
  if steps_per_epoch < 1:
    raise UserError(f"batch_size {cfg.batch_size} exceeds the {len(train_split)} training examples")
  schedule = optim.dassl_cosine_schedule(cfg.lr, cfg.epochs, steps_per_epoch, warmup_epochs=cfg.warmup_epochs,
                                         warmup_lr=cfg.warmup_lr)
  optimizer = optim.make_optimizer(cfg.optimizer, schedule, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
  state = prompt_trainer.create_train_state(learner, optimizer, cfg.seed, clip_params, class_state)
  train_step = prompt_trainer.make_train_step(learner, objective, optimizer)
  if mesh is not None:
    train_step = distributed.make_train_step(learner, objective, optimizer, mesh, clip_params)
    clip_params = distributed.place_clip(clip_params, mesh)
    state, class_state, teacher_text = distributed.replicate((state, class_state, teacher_text), mesh)

  manager = CheckpointManager(run_dir / "checkpoints", max_to_keep=2, config=cfg.to_json(), async_save=False)
  first_epoch = 0
  restored = manager.restore_latest(state) if resume else None
  if restored is not None:
    step, state = restored
    first_epoch = int(state.step) // steps_per_epoch
    logging.info("resumed %s at step %d (epoch %d)", run_dir, step, first_epoch)
  writer = RunDir(run_dir, cfg.to_json(), tensorboard=tensorboard)
  writer.write_json("train_classes.json", {"classnames": list(train_split.classnames),
                                           "template": train_split.template})
  total_steps = cfg.epochs * steps_per_epoch
  bar = tqdm.tqdm(total=total_steps, initial=first_epoch * steps_per_epoch, disable=not progress, unit="step",
                  desc=f"{cfg.method}+{cfg.objective} seed {cfg.seed}", dynamic_ncols=True)
  start = time.time()
  for epoch in range(first_epoch, cfg.epochs):
    # One pipeline per epoch, seeded by (seed, epoch): the data order of epoch e is the same whether or not
    # the run was interrupted before it.
    batches = pipeline.make_pipeline(local_split, image_size=clip_config.vision.image_size,
                                     batch_size=local_batch, train=True, seed=cfg.seed * 100_003 + epoch,
                                     crop_scale=crop_scale)
    epoch_metrics = []
    for batch in batches:
      if mesh is None:
        images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"], jnp.int32)
      else:
        sharded = distributed.shard_batch({"image": batch["image"], "label": batch["label"].astype(np.int32)}, mesh)
        images, labels = sharded["image"], sharded["label"]
      state, metrics = train_step(state, clip_params, class_state, images, labels, teacher_text)
      epoch_metrics.append(metrics)
      bar.update(1)
    means = {k: float(np.mean([float(m[k]) for m in epoch_metrics])) for k in epoch_metrics[0]}
    means["lr"] = float(schedule(int(state.step) - 1))
    bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['train_accuracy']:.2f}")
    if not np.isfinite(means["loss"]):
      raise FloatingPointError(f"training diverged at epoch {epoch}: loss {means['loss']} (lr {means['lr']:.2e})")
    writer.write_scalars(int(state.step), {f"train/{k}": v for k, v in means.items()} | {"epoch": epoch + 1})
    manager.save(int(state.step), state, force=True)
  bar.close()
  manager.close()
  train_seconds = time.time() - start

  predict = (prompt_trainer.make_predict_step(learner) if mesh is None
             else distributed.make_predict_step(learner, mesh, clip_params))
  results = {}
  for name, split in evals.items():
    if mesh is not None:
      results[name] = distributed.evaluate(learner, state.params, clip_params, split, mesh,
                                           batch_size=cfg.eval_batch_size, seed=cfg.seed,
                                           max_examples=cfg.max_eval_examples, progress=progress, predict=predict,
                                           train_classnames=train_split.classnames)
      continue
    results[name] = evaluate(learner, state.params, clip_params, split, batch_size=cfg.eval_batch_size,
                             seed=cfg.seed, max_examples=cfg.max_eval_examples, progress=progress, predict=predict,
                             train_classnames=train_split.classnames)
  writer.write_scalars(int(state.step), {f"eval/{name}/{k}": v for name, m in results.items() for k, v in m.items()})
  data_read = {"train": repr(train_split), **{name: repr(split) for name, split in evals.items()}}
  # Key order kept: a resumed run reads these results back in place of retraining, in the same order.
  writer.write_json(RESULTS_FILE, {"config": cfg.to_json(), "results": results, "train_seconds": train_seconds,
                                   "data": data_read}, sort_keys=False)
  writer.close()
  return results


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A trained run restored from its directory: config, frozen CLIP, learner and its trained params."""

  cfg: PromptRunConfig
  clip_config: clip.CLIPConfig
  clip_params: Any
  learner: Any
  params: Any
  train_classnames: tuple[str, ...]
  template: str


def load_trained(run_dir: str | pathlib.Path) -> TrainedRun:
  """Restores the latest checkpoint of a trained run (raises ValueError for a directory that is not one)."""
  run_dir = pathlib.Path(run_dir)
  config_path = run_dir / "checkpoints" / "run_config.json"
  if not config_path.exists():
    raise UserError(f"{run_dir} is not a trained run directory (no checkpoints/run_config.json): --eval_only "
                    "needs one seed's directory, <run_dir>/<variant>/seed<N>, as printed by the training run")
  stored = json.loads(config_path.read_text())
  known = {f.name for f in dataclasses.fields(PromptRunConfig)}
  stored = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in known}
  cfg = PromptRunConfig(**stored)
  clip_config, clip_params = clip.load_checkpoint(cfg.checkpoint)
  clip_config = clip_config.replace(dtype=cfg.compute_dtype)
  learner = make_learner(cfg.method, clip_config, **dict(cfg.learner_kwargs))
  stored_classes = json.loads((run_dir / "train_classes.json").read_text())
  train_classes = stored_classes["classnames"]
  class_state = learner.prepare_classes(clip_params, train_classes, templates=[stored_classes["template"]],
                                        train_classnames=train_classes)
  # The restore template needs the trained optimizer's state structure: a schedule carries a step count that
  # a constant learning rate does not (the number of steps per epoch does not change the structure).
  schedule = optim.dassl_cosine_schedule(cfg.lr, cfg.epochs, 1, warmup_epochs=cfg.warmup_epochs,
                                         warmup_lr=cfg.warmup_lr)
  optimizer = optim.make_optimizer(cfg.optimizer, schedule, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
  template = prompt_trainer.create_train_state(learner, optimizer, cfg.seed, clip_params, class_state)
  manager = CheckpointManager(run_dir / "checkpoints", async_save=False)
  restored = manager.restore_latest(template)
  manager.close()
  if restored is None:
    raise UserError(f"{run_dir} holds no completed checkpoint")
  _, state = restored
  return TrainedRun(cfg, clip_config, clip_params, learner, state.params, tuple(train_classes),
                    stored_classes["template"])


def evaluate_trained(run_dir: str | pathlib.Path, *, dataset: str, protocol: str = "few_shot",
                     data_dir: str | None = None, max_eval_examples: int | None = None,
                     progress: bool = True, source: str | None = None) -> dict[str, dict[str, float]]:
  """Evaluates the latest checkpoint of a trained run on another dataset or class list (no retraining:
  class-dependent state is rebuilt from the new class names). `source`: as `PromptRunConfig.source`."""
  protocol = protocols.canonical_protocol(protocol)
  run = load_trained(run_dir)
  cfg = run.cfg
  if protocol == "base2new":
    data = protocols.base_to_new(dataset, seed=cfg.seed, num_shots=cfg.num_shots, train=False,
                                 data_dir=data_dir, source=source)
  else:
    data = protocols.zero_shot(dataset, protocol="all", data_dir=data_dir, source=source)
  return {name: evaluate(run.learner, run.params, run.clip_params, split, batch_size=cfg.eval_batch_size,
                         seed=cfg.seed, max_examples=max_eval_examples, progress=progress,
                         train_classnames=run.train_classnames)
          for name, split in data.evals.items()}
