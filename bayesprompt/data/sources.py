"""Random access to the examples of one benchmark split, from TFDS (`tfds.data_source`) or a Dassl folder.

`open_split("oxford_pets", "train", data_dir=...)` gives a `LabeledSplit`: `len(split)`, `split[i] ->
{"image": uint8 [H, W, 3] array or encoded bytes, "label": int, "record_id": int}`, the class names and
the template. Protocols narrow it with `split.select(positions)` (few-shot) and `split.relabel(...)`
(base/new) without touching images: labels are read once per split (the label column only where the
backend allows) and cached.

TFDS is read with `tfds.data_source` (ArrayRecord random access, no tensorflow): the dataset must have been
prepared with `file_format="array_record"`. Nothing here downloads.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bayesprompt.data.datasets import clean_classname
from bayesprompt.data.registry import (
  Carve,
  DatasetSpec,
  check_classnames,
  get_dataset,
  resolve_classnames,
  resolve_label_subset,
)
from bayesprompt.errors import UserError

BENCHMARK_SPLITS = ("train", "val", "test")
SOURCES = ("tfds", "folder")


class LabeledSplit:
  """The examples of one benchmark split, with labels in [0, num_classes).

  An example is read from an underlying record store by record id; `label_map` maps the store's raw
  label to this split's label (-1: the record does not belong here). Cheap to copy: `select` and
  `relabel` share the store and the cached raw labels.

  Attributes:
    dataset: registry name.  split: "train", "val" or "test".  classnames: names in label order.
    template: the dataset's hand-crafted prompt ("a photo of a {}.").
    record_ids: int64 [N], the records of the store this split holds, in order.
  """

  def __init__(
    self,
    *,
    dataset: str,
    split: str,
    classnames: Sequence[str],
    template: str,
    read_record: Callable[[int], tuple[Any, int]],
    raw_labels: Callable[[], np.ndarray],
    record_ids: np.ndarray,
    label_map: np.ndarray,
    description: str,
  ):
    self.dataset = dataset
    self.split = split
    self.classnames = check_classnames(classnames, what=f"{dataset}/{split}")
    self.template = template
    self.record_ids = np.asarray(record_ids, dtype=np.int64)
    self.label_map = np.asarray(label_map, dtype=np.int64)
    self.description = description
    self._read_record = read_record
    self._raw_labels = raw_labels

  @property
  def num_classes(self) -> int:
    return len(self.classnames)

  def __len__(self) -> int:
    return len(self.record_ids)

  def __repr__(self) -> str:
    return (
      f"LabeledSplit({self.dataset}/{self.split}: {len(self)} examples, {self.num_classes} classes, "
      f"from {self.description})"
    )

  @property
  def labels(self) -> np.ndarray:
    """int64 [N] labels of the examples, read from the label column only (cached per store)."""
    return self.label_map[self._raw_labels()[self.record_ids]]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    record_id = int(self.record_ids[index])
    image, raw_label = self._read_record(record_id)
    label = int(self.label_map[raw_label]) if 0 <= raw_label < len(self.label_map) else -1
    if label < 0:  # The store changed under us or the label map is wrong: never return a silent bad label.
      raise ValueError(f"record {record_id} of {self.description} has label {raw_label}, outside {self!r}")
    return {"image": image, "label": label, "record_id": record_id}

  def select(self, positions: np.ndarray | Sequence[int]) -> LabeledSplit:
    """The examples at `positions` (int indices into this split), same labels and classes."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
      raise ValueError(f"positions must lie in [0, {len(self)}) for {self!r}")
    return self._replace(record_ids=self.record_ids[positions])

  def relabel(self, kept_labels: Sequence[int]) -> LabeledSplit:
    """Keeps the classes `kept_labels` (labels of this split), relabelled 0..len-1 in the given order;
    examples of other classes are dropped."""
    kept = [int(k) for k in kept_labels]
    if not kept:
      raise ValueError(f"relabel needs at least one class to keep ({self!r})")
    if min(kept) < 0 or max(kept) >= self.num_classes or len(set(kept)) != len(kept):
      raise ValueError(f"kept labels must be distinct labels in [0, {self.num_classes}), got {kept}")
    new_of_old = np.full(self.num_classes, -1, dtype=np.int64)
    new_of_old[kept] = np.arange(len(kept))
    label_map = np.where(self.label_map >= 0, new_of_old[np.maximum(self.label_map, 0)], -1)
    keep = np.isin(self.labels, kept)
    return self._replace(
      record_ids=self.record_ids[keep], label_map=label_map, classnames=[self.classnames[k] for k in kept]
    )

  def _replace(self, **changes) -> LabeledSplit:
    fields = dict(
      dataset=self.dataset,
      split=self.split,
      classnames=self.classnames,
      template=self.template,
      read_record=self._read_record,
      raw_labels=self._raw_labels,
      record_ids=self.record_ids,
      label_map=self.label_map,
      description=self.description,
    )
    fields.update(changes)
    return LabeledSplit(**fields)


# --------------------------------------------------------------------------------------------------------


def open_split(
  dataset: str | DatasetSpec,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  source: str | None = None,
  label_cache_dir: str | os.PathLike | None = None,
) -> LabeledSplit:
  """Opens one benchmark split of a registry dataset.

  Args:
    dataset: registry name (or a spec).
    split: "train", "val" or "test" (test-only datasets have just "test").
    data_dir: the TFDS data_dir, or the root of the Dassl folder layout for source="folder". None: TFDS's
      default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    source: "tfds" or "folder"; None: the dataset's default (`spec.source`).
    label_cache_dir: if given, the label column of TFDS splits is cached there as .npy (reading every
      record of a large split once is slow); never used for folder sources (labels are in the JSON).

  Raises:
    ValueError: unknown dataset (lists the known ones), a split the dataset does not have, a source the
      dataset cannot be read from, missing data.
  """
  spec = get_dataset(dataset) if isinstance(dataset, str) else dataset
  if split not in spec.splits:
    raise ValueError(f"dataset {spec.name!r} has no split {split!r}; its splits are {sorted(spec.splits)}")
  source = spec.source if source is None else source
  if source not in SOURCES:
    raise UserError(f"unknown source {source!r}; expected one of {SOURCES}")
  if source == "tfds":
    if spec.tfds_name is None:
      raise ValueError(f"dataset {spec.name!r} is not in TFDS; read it with source='folder' (Dassl layout)")
    return _open_tfds(spec, split, data_dir, label_cache_dir)
  if spec.folder is None:
    raise ValueError(f"dataset {spec.name!r} has no folder layout; read it with source='tfds'")
  return _open_folder(spec, split, data_dir)


# --------------------------------------------------------------------------------------------------------
# TFDS.


def carve_indices(labels: np.ndarray, start: float, stop: float, seed: int = 0) -> np.ndarray:
  """Record ids (ascending) of a class-stratified slice: per class c (a fixed permutation seeded by
  (seed, c)), the positions [round(n·start), round(n·stop)) of its n records."""
  labels = np.asarray(labels)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    perm = np.random.default_rng([seed, int(c)]).permutation(members)
    n = len(members)
    chosen.append(perm[round(n * start) : round(n * stop)])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _split_names(tfds_split: str) -> list[str]:
  """The split names in a TFDS split expression: "train[:80%]+validation" -> ["train", "validation"]."""
  return [re.sub(r"\[.*\]$", "", part.strip()) for part in tfds_split.split("+")]


def _check_tfds_split(spec: DatasetSpec, tfds_split: str, data_dir) -> None:
  import tensorflow_datasets as tfds

  try:
    known = list(tfds.builder(spec.tfds_name, data_dir=data_dir).info.splits.keys())
  except Exception:  # noqa: BLE001 -- metadata unavailable: tfds.data_source reports the real problem.
    return
  if not known:  # Not prepared (or tfds.testing.mock_data, which has no split metadata): nothing to check.
    return
  for name in _split_names(tfds_split):
    if name not in known:
      raise ValueError(
        f"TFDS dataset {spec.tfds_name!r} has no split {name!r} (wanted by {spec.name!r}); "
        f"its splits are {sorted(known)}"
      )


def _image_feature_keys(features) -> list[str]:
  import tensorflow_datasets as tfds

  return [k for k, f in features.items() if isinstance(f, (tfds.features.Image, tfds.features.Video))]


def _tfds_store(tfds_name: str, tfds_split: str, data_dir: str | None, image_key: str, label_key: str):
  """(read_record, num_records, labels_loader) for one TFDS split. Not cached across calls: a source made
  inside `tfds.testing.mock_data` must not outlive it; splits derived from one open share its labels."""
  import tensorflow_datasets as tfds

  try:
    full = tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 -- re-raised with what the user has to do.
    raise ValueError(
      f"cannot open TFDS {tfds_name!r} split {tfds_split!r} (data_dir={data_dir!r}): "
      f"{type(e).__name__}: {e}. "
      "Prepare it with tfds build --file_format=array_record (or download_and_prepare(file_format="
      "'array_record')); bayesprompt never downloads implicitly."
    ) from e

  # Prefer a view that leaves the image bytes encoded (we decode with PIL, in the pipeline threads) and,
  # for the label column, skips every image feature. Under tfds.testing.mock_data (no tensorflow to encode
  # the mock images) these views fail on first access: fall back to TFDS's own decoding.
  def skipping(keys):
    try:
      src = tfds.data_source(
        tfds_name, split=tfds_split, data_dir=data_dir, decoders={k: tfds.decode.SkipDecoding() for k in keys}
      )
      if len(src):
        src[0]
      return src
    except Exception:  # noqa: BLE001
      return None

  # Only encoded-image features are skipped (a Tensor image has no encoded form to hand to PIL).
  encoded = _image_feature_keys(full.dataset_info.features)
  images = (skipping([image_key]) if image_key in encoded else None) or full
  labels_src = (skipping(encoded) if encoded else None) or full

  def read_record(record_id: int):
    example = images[record_id]
    return example[image_key], int(example[label_key])

  @functools.cache
  def raw_labels() -> np.ndarray:
    # One record at a time: `__getitems__` fails under mock_data, and this is a one-off per split.
    return np.fromiter(
      (int(labels_src[i][label_key]) for i in range(len(labels_src))), np.int64, count=len(labels_src)
    )

  return read_record, len(full), raw_labels


def _open_tfds(spec: DatasetSpec, split: str, data_dir, label_cache_dir) -> LabeledSplit:
  ref = spec.splits[split]
  tfds_split = ref.split if isinstance(ref, Carve) else ref
  data_dir = None if data_dir is None else os.fspath(data_dir)
  if spec.prepare is not None:
    data_dir = os.fspath(spec.prepare(data_dir))
  _check_tfds_split(spec, tfds_split, data_dir)
  read_record, num_records, raw_labels = _tfds_store(
    spec.tfds_name, tfds_split, data_dir, spec.image_key, spec.label_key
  )
  if label_cache_dir is not None:
    raw_labels = _disk_cached(raw_labels, label_cache_dir, f"{spec.tfds_name}-{tfds_split}-{num_records}")

  classnames = resolve_classnames(spec)
  subset = resolve_label_subset(spec)
  needs_labels = isinstance(ref, Carve) or subset is not None
  if subset is None:
    label_map = np.arange(len(classnames), dtype=np.int64)
  else:
    if len(subset) != len(classnames):
      raise ValueError(
        f"dataset {spec.name!r}: label_subset has {len(subset)} ids for {len(classnames)} classes"
      )
    label_map = np.full(max(subset) + 1, -1, dtype=np.int64)
    label_map[list(subset)] = np.arange(len(subset))

  record_ids = np.arange(num_records, dtype=np.int64)
  if needs_labels:
    labels = raw_labels()
    if isinstance(ref, Carve):
      record_ids = carve_indices(labels, ref.start, ref.stop, ref.seed)
    if subset is not None:
      raw = labels[record_ids]
      inside = (raw >= 0) & (raw < len(label_map))
      inside[inside] = label_map[raw[inside]] >= 0
      record_ids = record_ids[inside]

  return LabeledSplit(
    dataset=spec.name,
    split=split,
    classnames=classnames,
    template=spec.template,
    read_record=read_record,
    raw_labels=raw_labels,
    record_ids=record_ids,
    label_map=label_map,
    description=f"TFDS {spec.tfds_name} {ref}",
  )


def _disk_cached(loader: Callable[[], np.ndarray], cache_dir, key: str) -> Callable[[], np.ndarray]:
  path = os.path.join(os.fspath(cache_dir), re.sub(r"[^A-Za-z0-9_.+-]", "_", key) + ".labels.npy")

  @functools.cache
  def cached() -> np.ndarray:
    if os.path.exists(path):
      return np.load(path)
    labels = loader()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npy"
    np.save(tmp, labels)
    os.replace(tmp, path)
    return labels

  return cached


# --------------------------------------------------------------------------------------------------------
# Dassl folders.


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ValueError(f"cannot read image {path!r}: {e}") from e


def _folder_items(
  spec: DatasetSpec, split: str, root: str
) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
  """(image paths, labels, classnames in label order) of one split of a Dassl folder dataset."""
  layout = spec.folder
  dataset_dir = os.path.join(root, layout.dataset_dir)
  image_dir = os.path.join(dataset_dir, layout.image_dir)
  if layout.reader == "split_json":
    split_path = os.path.join(dataset_dir, layout.split_file)
    if not os.path.isfile(split_path):
      raise ValueError(
        f"dataset {spec.name!r}: split file {split_path} not found (expected Dassl's layout "
        f"<data_dir>/{layout.dataset_dir}/{layout.split_file}, see CoOp's DATASETS.md)"
      )
    with open(split_path, encoding="utf-8") as f:
      table = json.load(f)
    if split not in table:
      raise ValueError(f"split file {split_path} has no split {split!r}; it has {sorted(table)}")
    items = [(os.path.join(image_dir, p), int(y), str(c)) for p, y, c in table[split]]
    # Class names: every split of the file together, so train/val/test agree even if one lacks a class.
    name_of: dict[int, str] = {}
    for rows in table.values():
      for _, y, c in rows:
        name_of.setdefault(int(y), clean_classname(str(c)))
  elif layout.reader == "fgvc_variants":
    variants_path = os.path.join(dataset_dir, "variants.txt")
    if not os.path.isfile(variants_path):
      raise ValueError(
        f"dataset {spec.name!r}: {variants_path} not found (expected fgvc-aircraft-2013b/data "
        f"as <data_dir>/{layout.dataset_dir})"
      )
    with open(variants_path, encoding="utf-8") as f:
      variants = [line.strip() for line in f if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    list_path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
    if not os.path.isfile(list_path):
      raise ValueError(f"dataset {spec.name!r}: {list_path} not found (expected fgvc-aircraft-2013b/data)")
    items = []
    with open(list_path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        image, variant = line.strip().split(" ", 1)
        if variant not in label_of:
          raise ValueError(f"{list_path}: variant {variant!r} is not in variants.txt")
        items.append((os.path.join(image_dir, image + ".jpg"), label_of[variant], variant))
    name_of = dict(enumerate(variants))
  else:
    raise ValueError(f"dataset {spec.name!r}: unknown folder reader {layout.reader!r}")
  if not items:
    raise ValueError(f"dataset {spec.name!r}: split {split!r} of the folder layout is empty")
  if sorted(name_of) != list(range(len(name_of))):
    raise ValueError(
      f"dataset {spec.name!r}: labels in the split file are not 0..C-1: {sorted(name_of)[:10]}..."
    )
  paths, labels, _ = zip(*items, strict=True)
  return tuple(paths), np.asarray(labels, dtype=np.int64), tuple(name_of[i] for i in range(len(name_of)))


def _open_folder(spec: DatasetSpec, split: str, data_dir) -> LabeledSplit:
  if data_dir is None:
    raise ValueError(f"dataset {spec.name!r} from the folder layout needs data_dir (the Dassl data root)")
  root = os.fspath(data_dir)
  folder_split = {"train": "train", "val": "val", "test": "test"}[split]
  paths, labels, file_names = _folder_items(spec, folder_split, root)
  expected = resolve_classnames(spec)
  if file_names != expected:
    differing = [(a, b) for a, b in zip(file_names, expected, strict=False) if a != b][:3]
    logging.warning(
      "dataset %s: class names in the split file differ from the registry's (%d vs %d classes; "
      "e.g. %s); using the split file's.",
      spec.name,
      len(file_names),
      len(expected),
      differing,
    )

  def read_record(record_id: int):
    return _read_bytes(paths[record_id]), int(labels[record_id])

  return LabeledSplit(
    dataset=spec.name,
    split=split,
    classnames=file_names,
    template=spec.template,
    read_record=read_record,
    raw_labels=lambda: labels,
    record_ids=np.arange(len(paths), dtype=np.int64),
    label_map=np.arange(len(file_names), dtype=np.int64),
    description=f"folder {os.path.join(root, spec.folder.dataset_dir)} ({folder_split})",
  )
