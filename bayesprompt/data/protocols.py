"""The field's evaluation protocols (CoOp / CoCoOp / MaPLe semantics) over registry datasets.

- base-to-new: sort the C labels, base = the first ceil(C/2), new = the rest, each relabelled from 0;
  train on K shots (default 16) of every base class, evaluate on the base and the new test classes.
- few-shot: K in {1, 2, 4, 8, 16} shots per class for train, min(K, 4) for val, all classes.
- cross-dataset: train on ImageNet (16 shots), evaluate on the 10 other datasets (all their classes).
- domain generalisation: train on ImageNet (16 shots), evaluate on ImageNet-V2/-Sketch/-A/-R.
Seeds 1, 2, 3 by default. Sampling reads labels only, never images.

Few-shot draws are per class from a NumPy generator seeded with (seed, class), as a prefix of one
permutation: the K-shot set contains the K'-shot set for K' < K, a class's draw does not depend on the
other classes (so K shots of the base classes are K shots of all classes restricted to base, the order in
which CoOp does it), and different seeds give different sets. CoOp draws with Python's `random` state
after everything Dassl did before; no other code can reproduce those exact images, only the protocol.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from bayesprompt.data.datasets import IMAGENET_CROSS_DATASET_TARGETS, IMAGENET_SHIFT_TARGETS
from bayesprompt.data.registry import DatasetSpec, get_dataset
from bayesprompt.data.sources import LabeledSplit, open_split

SHOT_CHOICES = (1, 2, 4, 8, 16)
PROTOCOLS = ("base2new", "few_shot", "cross_dataset", "domain_generalization", "all")
MAX_VAL_SHOTS = 4


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
  seed: int,
  *,
  num_classes: int | None = None,
  classnames: Sequence[str] | None = None,
  on_short: str = "error",
) -> np.ndarray:
  """Positions (ascending) of `num_shots` examples of every class, from the labels alone.

  Args:
    labels: int [N] labels in [0, num_classes).
    num_shots: K >= 1 examples per class.
    seed: the draw is a function of (seed, class) only.
    num_classes: classes expected (default max(labels) + 1); every one must have examples.
    classnames: for error messages.
    on_short: "error" (default) if a class has fewer than K examples; "all" takes what it has (Dassl's
      `generate_fewshot_dataset(repeat=False)`).

  Raises:
    ValueError: naming the class and its count when it has fewer than K examples (on_short="error").
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if not isinstance(num_shots, (int, np.integer)) or num_shots < 1:
    raise ValueError(f"num_shots must be a positive int, got {num_shots!r}")
  if on_short not in ("error", "all"):
    raise ValueError(f"on_short must be 'error' or 'all', got {on_short!r}")
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  if num_classes == 0:
    raise ValueError("cannot sample few-shot examples from an empty label set")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < num_shots and on_short == "error":
      name = f"{classnames[c]!r} (label {c})" if classnames is not None else f"label {c}"
      raise ValueError(
        f"class {name} has {len(members)} examples, fewer than the {num_shots} shots asked for"
      )
    perm = np.random.default_rng([int(seed), c]).permutation(members)
    chosen.append(perm[:num_shots])
  return np.sort(np.concatenate(chosen))


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


def few_shot_split(split: LabeledSplit, num_shots: int, seed: int, on_short: str = "error") -> LabeledSplit:
  """K examples of every class of `split` (see `sample_few_shot`)."""
  positions = sample_few_shot(
    split.labels,
    num_shots,
    seed,
    num_classes=split.num_classes,
    classnames=split.classnames,
    on_short=on_short,
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
  dataset, which: str, num_shots: int, seed: int, **open_kwargs
) -> tuple[LabeledSplit, LabeledSplit]:
  train = subsample_classes(
    few_shot_split(open_split(dataset, "train", **open_kwargs), num_shots, seed), which
  )
  val_shots = min(num_shots, MAX_VAL_SHOTS)
  val = subsample_classes(few_shot_split(open_split(dataset, "val", **open_kwargs), val_shots, seed), which)
  return train, val


def base_to_new(
  dataset: str | DatasetSpec,
  *,
  seed: int = 1,
  num_shots: int = 16,
  train: bool = True,
  data_dir: str | os.PathLike | None = None,
  source: str | None = None,
  label_cache_dir: str | os.PathLike | None = None,
) -> ProtocolData:
  """Base-to-new generalisation: K shots of the base classes; test on base and new, each relabelled."""
  _check_shots(num_shots)
  kw = dict(data_dir=data_dir, source=source, label_cache_dir=label_cache_dir)
  train_split, val_split = _train_val(dataset, "base", num_shots, seed, **kw) if train else (None, None)
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
) -> ProtocolData:
  """K-shot learning on all classes: K shots for train, min(K, 4) for val, the full test split."""
  _check_shots(num_shots)
  kw = dict(data_dir=data_dir, source=source, label_cache_dir=label_cache_dir)
  train_split, val_split = _train_val(dataset, "all", num_shots, seed, **kw) if train else (None, None)
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
) -> ProtocolData:
  _check_shots(num_shots)
  sources = sources or {}

  def kw(name):
    return dict(data_dir=data_dir, source=sources.get(name), label_cache_dir=label_cache_dir)

  train_split, val_split = (
    _train_val(source_dataset, "all", num_shots, seed, **kw(source_dataset)) if train else (None, None)
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
  )


def render_prompts(classnames: Sequence[str], template: str) -> list[str]:
  """template.format(classname) for each class, after CoOp's cleaning (underscores -> spaces).

  Raises:
    ValueError: template without exactly one "{}" placeholder, empty class list, blank or duplicate names.
  """
  from bayesprompt.data.datasets import clean_classname
  from bayesprompt.data.registry import check_classnames

  if (
    not isinstance(template, str)
    or template.count("{}") != 1
    or template.replace("{}", "").count("{")
    or template.replace("{}", "").count("}")
  ):
    raise ValueError(
      f"template must contain exactly one '{{}}' placeholder and no other braces, got {template!r}"
    )
  if isinstance(classnames, str):
    raise TypeError(f"class names must be a sequence of str, got the single str {classnames!r}")
  names = check_classnames([clean_classname(n) if isinstance(n, str) else n for n in classnames])
  return [template.format(name) for name in names]
