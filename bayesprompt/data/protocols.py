"""The field's evaluation protocols (CoOp / CoCoOp / MaPLe semantics) over registry datasets.

- base-to-new: sort the C labels, base = the first ceil(C/2), new = the rest, each relabelled from 0;
  train on K shots (default 16) of every base class, evaluate on the base and the new test classes.
- few-shot: K in {1, 2, 4, 8, 16} shots per class for train, min(K, 4) for val, all classes.
- cross-dataset: train on ImageNet (16 shots), evaluate on the 10 other datasets (all their classes).
- domain generalisation: train on ImageNet (16 shots), evaluate on ImageNet-V2/-Sketch/-A/-R.
Seeds 1, 2, 3 by default. Sampling reads labels only, never images.

Two few-shot samplers (`sampler=`; each registry entry names its default, `DatasetSpec.few_shot_sampler`):

- "dassl" (the field's datasets): CoOp's draw. CoOp's train.py calls `set_random_seed(seed)` and nothing
  consumes Python's `random` before the dataset is built, which calls Dassl's
  `generate_fewshot_dataset(train, num_shots=K)` then `generate_fewshot_dataset(val, num_shots=min(K, 4))`:
  per class in order of first appearance in the split, `random.sample(items, K)`. Here one
  `random.Random(seed)` makes the same calls in the same order, so on a Dassl split file (same rows, same
  order) the K-shot train and val images are exactly CoOp's, for every seed and K. The draw is over all
  classes before the base/new subsampling, as CoOp's. K-shot sets are not nested across K.
- "nested" (the sandbox's recorded tables): per class from `np.random.default_rng([seed, class])`, a
  prefix of one permutation: the K-shot set contains the K'-shot set for K' < K and a class's draw does
  not depend on the other classes -- for curves over K with less sampling noise.

A class with fewer than K examples: both take all it has (`on_short="all"`, Dassl's default
`repeat=False`, logged as a warning), or refuse (`on_short="error"`). A class with none is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Sequence

import numpy as np

from bayesprompt import options
from bayesprompt.data.datasets import IMAGENET_CROSS_DATASET_TARGETS, IMAGENET_SHIFT_TARGETS
from bayesprompt.data.registry import DatasetSpec, get_dataset
from bayesprompt.data.sources import LabeledSplit, open_split
from bayesprompt.errors import UserError

SHOT_CHOICES = (1, 2, 4, 8, 16)
PROTOCOLS = ("base2new", "few_shot", "cross_dataset", "domain_generalization", "all")
# The short names of the first prompt-run flags, still accepted (with a FutureWarning) by
# `canonical_protocol`.
RENAMED_PROTOCOLS = {"fewshot": "few_shot", "xd": "cross_dataset", "dg": "domain_generalization"}
MAX_VAL_SHOTS = 4
SAMPLERS = ("dassl", "nested")
ON_SHORT = ("all", "error")


def canonical_protocol(name: str) -> str:
  """`name` in the one spelling of `PROTOCOLS`; an old name of `RENAMED_PROTOCOLS` is translated with a
  FutureWarning. Raises ValueError for anything else."""
  name = options.resolve_renamed_value(name, RENAMED_PROTOCOLS, "protocol")
  if name not in PROTOCOLS:
    raise UserError(f"unknown protocol {name!r}; expected one of {PROTOCOLS} "
                     f"(or an old name: {sorted(RENAMED_PROTOCOLS)})")
  return name


def base_new_classes(num_classes: int) -> tuple[list[int], list[int]]:
  """(base labels, new labels): the first ceil(C/2) sorted labels and the rest."""
  if num_classes < 2:
    raise ValueError(f"base-to-new needs at least 2 classes, got {num_classes}")
  m = math.ceil(num_classes / 2)
  return list(range(m)), list(range(m, num_classes))


def subsample_classes(split: LabeledSplit, which: str) -> LabeledSplit:
  """CoOp's `subsample_classes`: "base" or "new" classes relabelled from 0, or "all" (unchanged)."""
  if which == "all":
    return split
  if which not in ("base", "new"):
    raise ValueError(f"subsample must be 'all', 'base' or 'new', got {which!r}")
  base, new = base_new_classes(split.num_classes)
  return split.relabel(base if which == "base" else new)


def sample_few_shot(
  labels: np.ndarray,
  num_shots: int,
  seed: int | random.Random,
  *,
  num_classes: int | None = None,
  classnames: Sequence[str] | None = None,
  on_short: str = "all",
  sampler: str = "dassl",
) -> np.ndarray:
  """Positions (ascending) of `num_shots` examples of every class, from the labels alone.

  Args:
    labels: int [N] labels in [0, num_classes), in the split's (the split file's) order.
    num_shots: K >= 1 examples per class.
    seed: an int, or for sampler="dassl" a `random.Random` whose state continues from an earlier draw
      (CoOp draws val after train from one state; `few_shot_split` callers pass the same generator).
    num_classes: classes expected (default max(labels) + 1); every one must have examples.
    classnames: for messages.
    on_short: "all" (default; Dassl's `repeat=False`) takes all the examples of a class with fewer than K,
      with a warning; "error" refuses.
    sampler: "dassl" (Dassl's `generate_fewshot_dataset`) or "nested" (see the module docstring).

  Raises:
    ValueError: a class without examples, or (on_short="error") with fewer than K, naming it and its count.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if not isinstance(num_shots, (int, np.integer)) or num_shots < 1:
    raise ValueError(f"num_shots must be a positive int, got {num_shots!r}")
  if on_short not in ON_SHORT:
    raise ValueError(f"on_short must be one of {ON_SHORT}, got {on_short!r}")
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if isinstance(seed, random.Random) and sampler != "dassl":
    raise TypeError(f"a random.Random is for sampler='dassl'; sampler={sampler!r} needs an int seed")
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  if num_classes == 0:
    raise ValueError("cannot sample few-shot examples from an empty label set")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")

  def name(c: int) -> str:
    return f"{classnames[c]!r} (label {c})" if classnames is not None else f"label {c}"

  counts = np.bincount(labels, minlength=num_classes)
  short = [c for c in range(num_classes) if counts[c] < num_shots]
  for c in short:
    if counts[c] == 0 or on_short == "error":
      raise ValueError(
        f"class {name(c)} has {counts[c]} examples, fewer than the {num_shots} shots asked for"
      )
  if short:
    listed = ", ".join(f"{name(c)}: {counts[c]}" for c in short[:5]) + (" ..." if len(short) > 5 else "")
    logging.getLogger(__name__).warning(
      "%d class(es) have fewer than %d examples; taking all they have (Dassl's repeat=False): %s",
      len(short),
      num_shots,
      listed,
    )
  if sampler == "nested":
    chosen = [np.random.default_rng([int(seed), c]).permutation(np.flatnonzero(labels == c))[:num_shots]
              for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))
  rng = seed if isinstance(seed, random.Random) else random.Random(int(seed))
  groups: dict[int, list[int]] = {}  # Dassl's split_dataset_by_label: classes in order of first appearance.
  for position, label in enumerate(labels.tolist()):
    groups.setdefault(label, []).append(position)
  chosen_positions: list[int] = []
  for members in groups.values():
    # random.sample's draws depend only on len(members) and K: sampling positions consumes the generator
    # exactly as Dassl's sampling of Datum objects does.
    chosen_positions.extend(rng.sample(members, num_shots) if len(members) >= num_shots else members)
  return np.sort(np.asarray(chosen_positions, dtype=np.int64))


def evaluation_subset(split: LabeledSplit, max_examples: int | None) -> LabeledSplit:
  """A fixed (seed 0) random subset of `max_examples` examples of `split`, in store order, for quick
  evaluations; the whole split when `max_examples` is None or not smaller than it."""
  if max_examples is None:
    return split
  if max_examples <= 0:
    raise ValueError(f"max_examples must be positive, got {max_examples}")
  if max_examples >= len(split):
    return split
  return split.select(np.sort(np.random.default_rng(0).choice(len(split), max_examples, replace=False)))


def few_shot_split(
  split: LabeledSplit,
  num_shots: int,
  seed: int | random.Random,
  on_short: str = "all",
  sampler: str = "dassl",
) -> LabeledSplit:
  """K examples of every class of `split` (see `sample_few_shot`)."""
  positions = sample_few_shot(
    split.labels,
    num_shots,
    seed,
    num_classes=split.num_classes,
    classnames=split.classnames,
    on_short=on_short,
    sampler=sampler,
  )
  return split.select(positions)


@dataclasses.dataclass
class ProtocolData:
  """What one (protocol, dataset, seed) run trains and evaluates on.

  Attributes:
    train / val: the few-shot training and validation splits (None for a zero-shot evaluation).
    evals: name -> test split. base2new: {"base", "new"}; few_shot / all: {"all"}; cross-dataset and
      domain generalisation: {dataset name: its test split}, the source dataset included.
  """

  protocol: str
  dataset: str
  seed: int
  num_shots: int | None
  train: LabeledSplit | None
  val: LabeledSplit | None
  evals: dict[str, LabeledSplit]


def _check_shots(num_shots: int) -> None:
  if num_shots not in SHOT_CHOICES:
    raise ValueError(f"num_shots must be one of {SHOT_CHOICES} (the field's protocol), got {num_shots!r}")


def _name(dataset: str | DatasetSpec) -> str:
  return get_dataset(dataset).name if isinstance(dataset, str) else dataset.name


def _train_val(
  dataset, which: str, num_shots: int, seed: int, sampler: str | None, on_short: str, **open_kwargs
) -> tuple[LabeledSplit, LabeledSplit]:
  """CoOp's order: K shots of every class of train, then min(K, 4) of val (for "dassl" from one continuing
  `random` state seeded once), then the base/new subsampling of both."""
  spec = get_dataset(dataset) if isinstance(dataset, str) else dataset
  sampler = spec.few_shot_sampler if sampler is None else sampler
  if sampler not in SAMPLERS:
    raise ValueError(f"few-shot sampler must be one of {SAMPLERS}, got {sampler!r}")
  rng = random.Random(int(seed)) if sampler == "dassl" else int(seed)
  train_all, val_all = open_split(spec, "train", **open_kwargs), open_split(spec, "val", **open_kwargs)
  train = few_shot_split(train_all, num_shots, rng, on_short=on_short, sampler=sampler)
  val = few_shot_split(val_all, min(num_shots, MAX_VAL_SHOTS), rng, on_short=on_short, sampler=sampler)
  return subsample_classes(train, which), subsample_classes(val, which)


def base_to_new(
  dataset: str | DatasetSpec,
  *,
  seed: int = 1,
  num_shots: int = 16,
  train: bool = True,
  data_dir: str | os.PathLike | None = None,
  source: str | None = None,
  label_cache_dir: str | os.PathLike | None = None,
  sampler: str | None = None,
  on_short: str = "all",
) -> ProtocolData:
  """Base-to-new generalisation: K shots of the base classes; test on base and new, each relabelled.

  `sampler`: "dassl" / "nested" (None: the dataset's default); `on_short`: "all" / "error" (see
  `sample_few_shot`). Every split is opened (a split file read and checked) before this returns."""
  _check_shots(num_shots)
  kw = dict(data_dir=data_dir, source=source, label_cache_dir=label_cache_dir)
  train_split, val_split = (
    _train_val(dataset, "base", num_shots, seed, sampler, on_short, **kw) if train else (None, None)
  )
  test = open_split(dataset, "test", **kw)
  return ProtocolData(
    "base2new",
    _name(dataset),
    seed,
    num_shots,
    train_split,
    val_split,
    {"base": subsample_classes(test, "base"), "new": subsample_classes(test, "new")},
  )


def few_shot(
  dataset: str | DatasetSpec,
  *,
  num_shots: int,
  seed: int = 1,
  train: bool = True,
  data_dir: str | os.PathLike | None = None,
  source: str | None = None,
  label_cache_dir: str | os.PathLike | None = None,
  sampler: str | None = None,
  on_short: str = "all",
) -> ProtocolData:
  """K-shot learning on all classes: K shots for train, min(K, 4) for val, the full test split
  (`sampler`, `on_short`: as `base_to_new`)."""
  _check_shots(num_shots)
  kw = dict(data_dir=data_dir, source=source, label_cache_dir=label_cache_dir)
  train_split, val_split = (
    _train_val(dataset, "all", num_shots, seed, sampler, on_short, **kw) if train else (None, None)
  )
  return ProtocolData(
    "few_shot",
    _name(dataset),
    seed,
    num_shots,
    train_split,
    val_split,
    {"all": open_split(dataset, "test", **kw)},
  )


def zero_shot(
  dataset: str | DatasetSpec,
  *,
  protocol: str = "all",
  data_dir: str | os.PathLike | None = None,
  source: str | None = None,
  label_cache_dir: str | os.PathLike | None = None,
) -> ProtocolData:
  """Test splits only: {"all"} or, for protocol="base2new", {"base", "new"}."""
  if protocol == "base2new":
    return base_to_new(
      dataset, train=False, data_dir=data_dir, source=source, label_cache_dir=label_cache_dir
    )
  if protocol != "all":
    raise ValueError(f"zero-shot protocol must be 'all' or 'base2new', got {protocol!r}")
  test = open_split(dataset, "test", data_dir=data_dir, source=source, label_cache_dir=label_cache_dir)
  return ProtocolData("all", _name(dataset), 0, None, None, None, {"all": test})


def _transfer(
  protocol: str,
  source_dataset: str,
  targets: Sequence[str],
  *,
  seed: int,
  num_shots: int,
  train: bool,
  data_dir,
  sources: dict[str, str] | None,
  label_cache_dir,
  sampler: str | None,
  on_short: str,
) -> ProtocolData:
  _check_shots(num_shots)
  sources = sources or {}

  def kw(name):
    return dict(data_dir=data_dir, source=sources.get(name), label_cache_dir=label_cache_dir)

  train_split, val_split = (
    _train_val(source_dataset, "all", num_shots, seed, sampler, on_short, **kw(source_dataset))
    if train
    else (None, None)
  )
  evals = {name: open_split(name, "test", **kw(name)) for name in (source_dataset, *targets)}
  return ProtocolData(protocol, source_dataset, seed, num_shots, train_split, val_split, evals)


def cross_dataset(
  *,
  seed: int = 1,
  num_shots: int = 16,
  source_dataset: str = "imagenet",
  targets: Sequence[str] = IMAGENET_CROSS_DATASET_TARGETS,
  train: bool = True,
  data_dir: str | os.PathLike | None = None,
  sources: dict[str, str] | None = None,
  label_cache_dir: str | os.PathLike | None = None,
  sampler: str | None = None,
  on_short: str = "all",
) -> ProtocolData:
  """Cross-dataset transfer: train on `source_dataset` (all classes, K shots), test on each target's
  full test split. `sources` maps a dataset name to "tfds"/"folder" where it differs from its default."""
  return _transfer(
    "cross_dataset",
    source_dataset,
    targets,
    seed=seed,
    num_shots=num_shots,
    train=train,
    data_dir=data_dir,
    sources=sources,
    label_cache_dir=label_cache_dir,
    sampler=sampler,
    on_short=on_short,
  )


def domain_generalization(
  *,
  seed: int = 1,
  num_shots: int = 16,
  source_dataset: str = "imagenet",
  targets: Sequence[str] = IMAGENET_SHIFT_TARGETS,
  train: bool = True,
  data_dir: str | os.PathLike | None = None,
  sources: dict[str, str] | None = None,
  label_cache_dir: str | os.PathLike | None = None,
  sampler: str | None = None,
  on_short: str = "all",
) -> ProtocolData:
  """Domain generalisation: train on ImageNet (K shots), test on ImageNet-V2/-Sketch/-A/-R."""
  return _transfer(
    "domain_generalization",
    source_dataset,
    targets,
    seed=seed,
    num_shots=num_shots,
    train=train,
    data_dir=data_dir,
    sources=sources,
    label_cache_dir=label_cache_dir,
    sampler=sampler,
    on_short=on_short,
  )
