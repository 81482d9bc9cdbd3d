"""Random access to the examples of one benchmark split, from TFDS (`tfds.data_source`) or a Dassl folder.

`open_split("oxford_pets", "train", data_dir=...)` gives a `LabeledSplit`: `len(split)`, `split[i] ->
{"image": uint8 [H, W, 3] array or encoded bytes, "label": int, "record_id": int}`, the class names and
the template. Protocols narrow it with `split.select(positions)` (few-shot) and `split.relabel(...)`
(base/new) without touching images: labels are read once per split (the label column only where the
backend allows) and cached.

TFDS is read with `tfds.data_source(..., download=False)` (ArrayRecord random access, no tensorflow): the
dataset must have been prepared with `file_format="array_record"`; an unprepared one is a one-line error
with the `tfds build` command. Nothing here downloads (tests/test_data_folders.py proves it with the
network and TFDS's download manager disabled). Folder sources never import TFDS.

A Dassl split file is read and checked in full when a split of it is first opened (before any training):
the file parses, rows are [path, label, classname], labels are 0..C-1 with C the dataset's class count
and every class in every split, each label has one class name and each name one label, and every listed
image exists. Errors name the file, the split and the row.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bayesprompt.data.datasets import clean_classname
from bayesprompt.data.registry import (
  BENCHMARK_SPLITS,
  Carve,
  DatasetSpec,
  FolderLayout,
  check_classnames,
  get_dataset,
  resolve_classnames,
  resolve_label_subset,
)
from bayesprompt.errors import UserError

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
    describe_record: Callable[[int], str] | None = None,
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
    self._describe_record = describe_record

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

  def record_description(self, record_id: int) -> str:
    """Where record `record_id` lives, for error messages: the image file of a folder source, the TFDS
    split and record number otherwise."""
    if self._describe_record is not None:
      return self._describe_record(int(record_id))
    return f"{self.description} record {int(record_id)}"

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
      describe_record=self._describe_record,
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


def tfds_build_command(tfds_name: str, data_dir: str | None) -> str:
  """The shell command that prepares `tfds_name` where bayesprompt reads it (ArrayRecord files)."""
  target = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
  command = f"tfds build {tfds_name} --file_format=array_record --data_dir={target}"
  if tfds_name.split(":")[0].split("/")[0] == "imagenet2012":
    command += " --manual_dir=DIR_WITH_ILSVRC2012_TARS"
  return command


def tfds_unavailable_message(
  spec: DatasetSpec, tfds_split: str, data_dir: str | None, error: BaseException
) -> str:
  """One line saying why TFDS `spec.tfds_name` cannot be read from `data_dir` and what to run."""
  import tensorflow_datasets as tfds

  prepared_as = None
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
      prepared_as = str(builder.info.file_format.value if builder.info.file_format else "tfrecord")
    where = os.fspath(builder.data_dir)
  except Exception:  # noqa: BLE001 -- an unknown name or config: say what TFDS said.
    where = data_dir or "TFDS's default data_dir"
  folder_hint = ""
  if spec.folder is not None:
    layout = spec.folder
    marker = layout.split_file or "variants.txt"
    folder_hint = (f"; or read CoOp's files with --source=folder and --data_dir=<root holding "
                   f"{layout.dataset_dir}/{marker}>")
  if prepared_as is not None and prepared_as != "array_record":
    what = f"is prepared as {prepared_as} in {where}, and random access needs ArrayRecord files: rebuild"
  elif prepared_as is None:
    what = f"is not prepared in {where}: prepare it"
  else:
    first_line = str(error).splitlines()[0] if str(error) else ""
    what = f"cannot be opened ({type(error).__name__}: {first_line}): rebuild"
  return (f"dataset {spec.name!r} (split {tfds_split!r}): TFDS {spec.tfds_name} {what} with "
          f"`{tfds_build_command(spec.tfds_name, data_dir)}`{folder_hint}. bayesprompt never downloads.")


def _tfds_store(spec: DatasetSpec, tfds_split: str, data_dir: str | None):
  """(read_record, num_records, labels_loader) for one TFDS split. Not cached across calls: a source made
  inside `tfds.testing.mock_data` must not outlive it; splits derived from one open share its labels."""
  import tensorflow_datasets as tfds

  tfds_name, image_key, label_key = spec.tfds_name, spec.image_key, spec.label_key
  try:
    full = tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 -- re-raised with what the user has to do.
    raise ValueError(tfds_unavailable_message(spec, tfds_split, data_dir, e)) from e

  # Prefer a view that leaves the image bytes encoded (we decode with PIL, in the pipeline threads) and,
  # for the label column, skips every image feature. Under tfds.testing.mock_data (no tensorflow to encode
  # the mock images) these views fail on first access: fall back to TFDS's own decoding.
  def skipping(keys):
    try:
      src = tfds.data_source(
        tfds_name,
        split=tfds_split,
        data_dir=data_dir,
        download=False,
        decoders={k: tfds.decode.SkipDecoding() for k in keys},
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
  read_record, num_records, raw_labels = _tfds_store(spec, tfds_split, data_dir)
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
    describe_record=lambda record_id: f"TFDS {spec.tfds_name} {tfds_split} record {record_id}",
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


@dataclasses.dataclass(frozen=True)
class FolderTable:
  """A checked Dassl split file (or FGVC-Aircraft list files): per split, image paths and labels in file
  order; the class names in label order."""

  source: str  # the file(s) read, for messages
  paths: dict[str, tuple[str, ...]]
  labels: dict[str, np.ndarray]
  classnames: tuple[str, ...]


def _row_error(where: str, split: str, row: int, message: str) -> ValueError:
  return ValueError(f"{where}: {split} row {row}: {message}")


def _parse_label(value: Any) -> int | None:
  """CoOp's `int(label)`, without its silent acceptance of floats and bools."""
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
    return int(value)
  return None


def _check_folder_table(
  where: str,
  rows: dict[str, list[tuple[str, int, str]]],
  num_classes: int | None,
) -> tuple[str, ...]:
  """Checks labels and names of every split's (path, label, classname) rows; the class names in label order.

  Labels must lie in [0, C) (C = `num_classes`, or the file's max + 1), every split must hold every
  label, and the label <-> class-name map must be one-to-one over the whole file. CoOp would keep going
  on a label with two names (its `get_lab2cname` then picks one in set-iteration order, which changes
  with PYTHONHASHSEED), so we name the rows instead.
  """
  uses: dict[int, dict[str, list[tuple[str, int]]]] = {}  # label -> name -> [(split, row)]
  for split, items in rows.items():
    for row, (_, label, name) in enumerate(items):
      uses.setdefault(label, {}).setdefault(name, []).append((split, row))
  found = max(uses) + 1
  expected = found if num_classes is None else num_classes
  if found > expected:
    bad = min(y for y in uses if y >= expected)
    split, row = next(iter(uses[bad].values()))[0]
    message = f"label {bad} is outside 0..{expected - 1} (the dataset has {expected} classes)"
    raise _row_error(where, split, row, message)

  def listed(places: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"{split} row {row}" for split, row in places[:3])
    return shown + (f" and {len(places) - 3} more" if len(places) > 3 else "")

  for label in sorted(uses):
    names = uses[label]
    if len(names) > 1:
      ranked = sorted(names.items(), key=lambda kv: -len(kv[1]))
      majority, others = ranked[0][0], ranked[1:]
      odd = "; ".join(f"{name!r} at {listed(places)}" for name, places in others)
      raise ValueError(
        f"{where}: label {label} has more than one class name: {majority!r} on {len(ranked[0][1])} rows, "
        f"{odd}. Fix the rows (CoOp's class name would depend on Python's hash order)."
      )
  name_of = {label: next(iter(names)) for label, names in uses.items()}
  labels_of: dict[str, list[int]] = {}
  for label, name in name_of.items():
    labels_of.setdefault(name, []).append(label)
  for name, labels in labels_of.items():
    if len(labels) > 1:
      places = "; ".join(f"label {y} at {listed(next(iter(uses[y].values())))}" for y in sorted(labels))
      raise ValueError(f"{where}: class name {name!r} is used for more than one label: {places}")
  for split, items in rows.items():
    present = {label for _, label, _ in items}
    missing = [y for y in range(expected) if y not in present]
    if missing:
      tail = missing[-1] == expected - 1 and all(y not in uses for y in missing)
      reason = (
        f"the file lists labels 0..{found - 1} but the dataset has {expected} classes: the last classes "
        "are missing, which would shift the base/new split"
        if tail and found < expected
        else "every class must appear in every split (CoOp's files list each one in train, val and test)"
      )
      shown = ", ".join(f"{y} ({name_of[y]!r})" if y in name_of else str(y) for y in missing[:5])
      more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
      raise ValueError(f"{where}: split {split!r} has no rows of label(s) {shown}{more}: {reason}")
  return tuple(clean_classname(name_of[y]) for y in range(expected))


def _check_images_exist(where: str, rows: dict[str, list[tuple[str, int, str]]]) -> None:
  missing = [(split, row, path) for split, items in rows.items() for row, (path, _, _) in enumerate(items)
             if not os.path.isfile(path)]
  if missing:
    shown = "; ".join(f"{split} row {row}: {path}" for split, row, path in missing[:5])
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise ValueError(f"{where}: {len(missing)} listed image(s) do not exist: {shown}{more}")


def _read_split_json(split_path: str, image_dir: str) -> dict[str, list[tuple[str, int, str]]]:
  try:
    with open(split_path, encoding="utf-8") as f:
      table = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{split_path}: cannot read the split file: {type(e).__name__}: {e}") from e
  if not isinstance(table, dict) or any(not isinstance(table.get(k), list) for k in BENCHMARK_SPLITS):
    keys = sorted(table) if isinstance(table, dict) else type(table).__name__
    raise ValueError(f"{split_path}: expected a JSON object with lists 'train', 'val', 'test'; got {keys}")
  rows: dict[str, list[tuple[str, int, str]]] = {}
  for split in BENCHMARK_SPLITS:
    if not table[split]:
      raise ValueError(f"{split_path}: split {split!r} is empty")
    out = []
    for row, item in enumerate(table[split]):
      if not isinstance(item, (list, tuple)) or len(item) != 3:
        raise _row_error(split_path, split, row, f"expected [image path, label, class name], got {item!r}")
      path, label, name = item
      parsed = _parse_label(label)
      if not isinstance(path, str) or not path or parsed is None or parsed < 0:
        message = f"expected [image path, label >= 0, class name], got {item!r}"
        raise _row_error(split_path, split, row, message)
      if not isinstance(name, str) or not name.strip():
        raise _row_error(split_path, split, row, f"class name must be a non-blank str, got {name!r}")
      out.append((os.path.join(image_dir, path), parsed, name))
    rows[split] = out
  return rows


def _read_fgvc_lists(name: str, layout: FolderLayout, dataset_dir: str, image_dir: str):
  variants_path = os.path.join(dataset_dir, "variants.txt")
  if not os.path.isfile(variants_path):
    raise ValueError(
      f"dataset {name!r}: {variants_path} not found (expected fgvc-aircraft-2013b/data "
      f"as <data_dir>/{layout.dataset_dir})"
    )
  with open(variants_path, encoding="utf-8") as f:
    variants = [line.strip() for line in f if line.strip()]
  label_of = {v: i for i, v in enumerate(variants)}
  rows = {}
  for split in BENCHMARK_SPLITS:
    list_path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
    if not os.path.isfile(list_path):
      raise ValueError(f"dataset {name!r}: {list_path} not found (expected fgvc-aircraft-2013b/data)")
    items = []
    with open(list_path, encoding="utf-8") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        image, _, variant = line.strip().partition(" ")
        if variant not in label_of:
          raise ValueError(f"{list_path}:{line_number}: variant {variant!r} is not in variants.txt")
        items.append((os.path.join(image_dir, image + ".jpg"), label_of[variant], variant))
    if not items:
      raise ValueError(f"dataset {name!r}: {list_path} is empty")
    rows[split] = items
  return os.path.join(dataset_dir, "images_variant_*.txt"), rows


@functools.lru_cache(maxsize=32)
def _folder_table_cached(name: str, layout: FolderLayout, root: str, stamp: tuple) -> FolderTable:
  del stamp  # Part of the cache key only: an edited file is read and checked again.
  dataset_dir = os.path.join(root, layout.dataset_dir)
  image_dir = os.path.join(dataset_dir, layout.image_dir)
  if layout.reader == "split_json":
    where = os.path.join(dataset_dir, layout.split_file)
    rows = _read_split_json(where, image_dir)
  elif layout.reader == "fgvc_variants":
    where, rows = _read_fgvc_lists(name, layout, dataset_dir, image_dir)
  else:
    raise ValueError(f"dataset {name!r}: unknown folder reader {layout.reader!r}")
  classnames = _check_folder_table(where, rows, layout.num_classes)
  _check_images_exist(where, rows)
  return FolderTable(
    source=where,
    paths={split: tuple(path for path, _, _ in items) for split, items in rows.items()},
    labels={split: np.asarray([y for _, y, _ in items], dtype=np.int64) for split, items in rows.items()},
    classnames=classnames,
  )


def read_folder_table(spec: DatasetSpec | str, data_dir: str | os.PathLike) -> FolderTable:
  """Reads and checks every split of a dataset's Dassl folder layout (cached until the files change).

  Raises:
    ValueError: naming the file, split and row, for a missing or malformed split file, labels outside
      0..C-1 or missing from a split (C = the layout's `num_classes`), a label with two class names or a
      name with two labels, listed images that do not exist.
  """
  spec = get_dataset(spec) if isinstance(spec, str) else spec
  if spec.folder is None:
    raise ValueError(f"dataset {spec.name!r} has no folder layout; read it with source='tfds'")
  root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  layout = spec.folder
  dataset_dir = os.path.join(root, layout.dataset_dir)
  if layout.reader == "split_json":
    files = [os.path.join(dataset_dir, layout.split_file)]
    if not os.path.isfile(files[0]):
      raise ValueError(
        f"dataset {spec.name!r}: split file {files[0]} not found (expected Dassl's layout "
        f"<data_dir>/{layout.dataset_dir}/{layout.split_file} with the images under "
        f"<data_dir>/{layout.dataset_dir}/{layout.image_dir or '.'}/, see CoOp's DATASETS.md)"
      )
  else:
    files = [os.path.join(dataset_dir, name) for name in
             ("variants.txt", *(f"images_variant_{s}.txt" for s in BENCHMARK_SPLITS))]
  stamp = tuple((os.stat(f).st_mtime_ns, os.stat(f).st_size) if os.path.exists(f) else None for f in files)
  return _folder_table_cached(spec.name, layout, root, stamp)


def _open_folder(spec: DatasetSpec, split: str, data_dir) -> LabeledSplit:
  if data_dir is None:
    raise ValueError(f"dataset {spec.name!r} from the folder layout needs data_dir (the Dassl data root)")
  table = read_folder_table(spec, data_dir)
  paths, labels = table.paths[split], table.labels[split]

  def read_record(record_id: int):
    return _read_bytes(paths[record_id]), int(labels[record_id])

  return LabeledSplit(
    dataset=spec.name,
    split=split,
    classnames=table.classnames,
    template=spec.template,
    read_record=read_record,
    raw_labels=lambda: labels,
    record_ids=np.arange(len(paths), dtype=np.int64),
    label_map=np.arange(len(table.classnames), dtype=np.int64),
    description=f"folder {table.source} ({split})",
    describe_record=lambda record_id: paths[record_id],
  )
