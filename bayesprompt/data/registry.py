"""Registry of classification datasets: where they live, their splits, class names and templates.

Every dataset a protocol can run on (the 15 of the field's benchmark and the sandbox world) is one
`DatasetSpec`. Protocols, pipelines and binaries look datasets up by name here, never by special case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from bayesprompt.errors import UserError

# The benchmark splits, in order: the keys of `DatasetSpec.splits` and the lists of a Dassl split file.
BENCHMARK_SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Carve:
  """A class-stratified slice of a TFDS split, for benchmark splits TFDS does not have.

  Per class, the examples of `split` are permuted with a fixed seed (independent of the experiment seed,
  so every run sees the same partition, as Dassl's saved split files do) and the positions
  [round(n·start), round(n·stop)) are kept. Carve("train", 0.0, 0.2) and Carve("train", 0.2, 1.0) are
  Dassl's `split_trainval(p_val=0.2)`: disjoint, and together the whole split.
  """

  split: str
  start: float
  stop: float
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.start < self.stop <= 1.0:
      raise ValueError(f"Carve needs 0 <= start < stop <= 1, got start={self.start}, stop={self.stop}")


@dataclasses.dataclass(frozen=True)
class FolderLayout:
  """Where a dataset lives in Dassl's (CoOp's) image-folder layout, relative to `--data_dir`.

  Attributes:
    dataset_dir: directory under the data root (`oxford_pets`, `caltech-101`, ...).
    image_dir: image directory relative to `dataset_dir` ("" = `dataset_dir` itself).
    split_file: the split file relative to `dataset_dir` (`split_zhou_OxfordPets.json`).
    reader: "split_json" (Dassl `{"train": [[path, label, classname], ...], "val": ..., "test": ...}`)
      or "fgvc_variants" (FGVC-Aircraft's `variants.txt` + `images_variant_{train,val,test}.txt`).
    num_classes: the classes the files must list (labels 0..num_classes-1, each in every split); a file
      that lacks the last classes is refused instead of silently shifting the base/new split. None:
      whatever the file has (datasets registered without a known class count).
  """

  dataset_dir: str
  image_dir: str
  split_file: str = ""
  reader: str = "split_json"
  num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A classification dataset as the benchmark uses it.

  Attributes:
    name: registry key used by flags (`--dataset=oxford_pets`).
    tfds_name: TFDS builder name, optionally with version (`"oxford_iiit_pet:4.0.0"`), or None for
      datasets that are read from an image folder + split JSON instead.
    splits: benchmark split -> TFDS split string (TFDS slicing syntax allowed) or a `Carve`, for the keys
      "train", "val", "test" (test-only datasets have just "test").
    classnames: human-readable class names in label order, as the field uses them; a callable is
      resolved lazily (e.g. from `tfds.builder(name).info`).
    template: the hand-crafted prompt, with one "{}" for the class name.
    image_key / label_key: feature names in the TFDS examples.
    label_subset: for datasets evaluated on a subset of (or a reordering of) the TFDS label space
      (ImageNet-A/-R: 200 of 1000 ImageNet ids; Caltech101: CoOp's order without the two ignored
      classes): the TFDS label ids kept, in the order of `classnames`. Examples of other ids are dropped.
      A callable is resolved lazily. Applies to the TFDS source only (split files carry their labels).
    source: the default source, "tfds" or "folder" (Dassl image-folder + split_zhou_*.json layout).
    few_shot_sampler: the default few-shot sampler of the protocols, "dassl" (CoOp's images) or "nested"
      (see `protocols.sample_few_shot`).
    notes: which partition is followed and why (shown in docs).
    folder: the Dassl folder layout, for datasets readable that way (None: TFDS only).
    train_crop_scale: the random-resized-crop area range used when training on this dataset.
    prepare: for generated datasets (the sandbox): called as prepare(data_dir) before the TFDS source is
      opened, with the user's data_dir (None if not given); makes sure the data exist there (generating
      them; never downloading) and returns the data_dir to read.
  """

  name: str
  tfds_name: str | None
  splits: dict[str, str | Carve]
  classnames: Sequence[str] | Callable[[], Sequence[str]]
  template: str = "a photo of a {}."
  image_key: str = "image"
  label_key: str = "label"
  label_subset: Sequence[int] | Callable[[], Sequence[int]] | None = None
  source: str = "tfds"
  few_shot_sampler: str = "dassl"
  notes: str = ""
  folder: FolderLayout | None = None
  prepare: Callable[[str | None], str] | None = None
  # Random-resized-crop area range of the training augmentation. The field's (0.08, 1) suits photographs;
  # datasets whose object can fall outside a small crop (the sandbox's 32-px compositions) narrow it.
  train_crop_scale: tuple[float, float] = (0.08, 1.0)

  def __post_init__(self):
    unknown = sorted(set(self.splits) - set(BENCHMARK_SPLITS))
    if not self.splits or unknown:
      raise ValueError(f"dataset {self.name!r}: splits must map some of {BENCHMARK_SPLITS} to TFDS splits; "
                       f"got keys {sorted(self.splits)}")


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
  """Adds `spec` to the registry; re-registering the same name with another spec is an error."""
  if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
    raise ValueError(f"dataset {spec.name!r} is already registered with a different spec")
  _REGISTRY[spec.name] = spec
  return spec


def get_dataset(name: str) -> DatasetSpec:
  """Looks a dataset up by registry name; unknown names list the known ones. (Importing `bayesprompt.data`
  registers the benchmark datasets and the sandbox's, so every name is known once this module is loaded.)"""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_REGISTRY))}") from None


def dataset_names() -> list[str]:
  return sorted(_REGISTRY)


def resolve_classnames(spec: DatasetSpec) -> tuple[str, ...]:
  """`spec.classnames` as a tuple (calling it if lazy), checked: non-empty, distinct, non-blank strings."""
  names = spec.classnames() if callable(spec.classnames) else spec.classnames
  return check_classnames(names, what=f"dataset {spec.name!r}")


def resolve_label_subset(spec: DatasetSpec) -> tuple[int, ...] | None:
  """`spec.label_subset` as a tuple of TFDS label ids (calling it if lazy), or None."""
  subset = spec.label_subset() if callable(spec.label_subset) else spec.label_subset
  return None if subset is None else tuple(int(i) for i in subset)


def check_classnames(names: Sequence[str], what: str = "class list") -> tuple[str, ...]:
  """Returns `names` as a tuple; ValueError for an empty list, blank or non-str names, or duplicates."""
  if isinstance(names, str):
    raise TypeError(f"{what}: class names must be a sequence of str, got the single str {names!r}")
  names = tuple(names)
  if not names:
    raise ValueError(f"{what}: the class list is empty")
  for i, name in enumerate(names):
    if not isinstance(name, str) or not name.strip():
      raise ValueError(f"{what}: class name #{i} is {name!r}; expected a non-blank str")
  seen: dict[str, int] = {}
  for i, name in enumerate(names):
    if name in seen:
      raise ValueError(f"{what}: duplicate class name {name!r} at positions {seen[name]} and {i}")
    seen[name] = i
  return names
