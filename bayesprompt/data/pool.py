"""An unlabelled active-learning pool mixed from several sources, most of them off the target task.

BayesVLM's active learning (arXiv 2412.06014 §5) picks from a large unlabelled pool the images whose labels
help a specific target distribution. That choice only matters when much of the pool is useless for the target:
other domains (sketches, cartoons) or classes outside the target's label set. `compose_pool` builds such a pool
from registry splits, one `PoolSource` ("dataset:split:count[:on_target]") each:

  * every source contributes `count` images, a seeded random subset of its split (the same for every
    acquisition seed: the pool is part of the set-up, not of the selection);
  * an image's label is *revealed only when it is selected*, and is translated into the target's label set by
    class name: an image of a class the target does not have gets label -1 (`OFF_LABEL_SET`). Selecting it
    costs budget and adds nothing: it is not fine-tuned on and does not update the Hessian (the labeller's
    answer is "none of the target classes", which the target's softmax has no way to express);
  * an image is *on target* when its source is marked on_target (the target's own domain) and its class is in
    the target's label set. Images of off-target sources keep their label when their class is in the label set
    (a sketch of a red circle is still labelled "red circle"): they are real labels of another domain.

The result holds, per pool position, the source index, the translated label and the on-target flag, so a
selection's make-up (`selection_make_up`) and the pool's (`composition_rows`) can be reported.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from bayesprompt.data.sources import LabeledSplit

OFF_LABEL_SET = -1  # the translated label of an image whose class the target task does not have
ON_TARGET = "on_target"


@dataclasses.dataclass(frozen=True)
class PoolSource:
  """One source of pool images: `count` images of registry dataset `dataset`, split `split`.

  Attributes:
    on_target: the source is the target's own domain (its in-label-set images count as on-target picks).
  """

  dataset: str
  split: str
  count: int
  on_target: bool = False

  @property
  def name(self) -> str:
    return f"{self.dataset}/{self.split}"


def parse_pool_sources(specs: Sequence[str]) -> list[PoolSource]:
  """Parses "dataset:split:count" or "dataset:split:count:on_target" entries (the --pool_sources flag).

  Raises:
    ValueError: a malformed entry, a count that is not a positive integer, a repeated dataset/split.
  """
  sources = []
  for spec in specs:
    fields = spec.strip().split(":")
    if len(fields) not in (3, 4) or not all(fields) or (len(fields) == 4 and fields[3] != ON_TARGET):
      raise ValueError(f"pool source {spec!r}; expected 'dataset:split:count' or "
                       f"'dataset:split:count:{ON_TARGET}'")
    try:
      count = int(fields[2])
    except ValueError:
      count = 0
    if count <= 0:
      raise ValueError(f"pool source {spec!r}: count {fields[2]!r} is not a positive integer")
    sources.append(PoolSource(fields[0], fields[1], count, len(fields) == 4))
  names = [s.name for s in sources]
  if len(set(names)) != len(names):
    raise ValueError(f"pool sources repeat a dataset/split: {names}")
  return sources


def scale_counts(sources: Sequence[PoolSource], total: int) -> list[PoolSource]:
  """The sources with counts scaled down (each ≥ 1) so that they sum to about `total` (smoke runs)."""
  have = sum(s.count for s in sources)
  if have <= total:
    return list(sources)
  return [dataclasses.replace(s, count=max(1, s.count * total // have)) for s in sources]


@dataclasses.dataclass(frozen=True)
class ComposedPool:
  """The pool, in source order.

  Attributes:
    sources: the PoolSources.
    splits: per source, the LabeledSplit of its chosen images (in pool order; features are read from these).
    labels: int64 [N] labels in the target's label set, OFF_LABEL_SET for classes the target does not have.
    source_ids: int64 [N] index into `sources` of each pool image.
    on_target: bool [N] the image is from an on_target source and of a target class.
    own_classnames: [N] the class name of each image in its own dataset.
  """

  sources: tuple[PoolSource, ...]
  splits: tuple[LabeledSplit, ...]
  labels: np.ndarray
  source_ids: np.ndarray
  on_target: np.ndarray
  own_classnames: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.labels)


def _subset_seed(seed: int, source: PoolSource) -> list[int]:
  # Seeded by the source's name, not its position: reordering --pool_sources keeps each source's images.
  return [seed, zlib.crc32(source.name.encode())]


def compose_pool(splits: Sequence[LabeledSplit], sources: Sequence[PoolSource], target_classnames: Sequence[str],
                 *, seed: int = 0) -> ComposedPool:
  """Draws each source's images and translates their labels into the target's label set.

  Args:
    splits: the opened split of each source (same order as `sources`).
    sources: the PoolSources.
    target_classnames: the target task's classes, in label order.
    seed: the subset seed (each source draws `count` positions without replacement, sorted).

  Raises:
    ValueError: a source asks for more images than its split has; no pool image is of a target class.
  """
  if len(splits) != len(sources) or not sources:
    raise ValueError(f"need one split per pool source, got {len(splits)} splits for {len(sources)} sources")
  target_index = {name: i for i, name in enumerate(target_classnames)}
  chosen, labels, source_ids, on_target, own = [], [], [], [], []
  for i, (split, source) in enumerate(zip(splits, sources, strict=True)):
    if source.count > len(split):
      raise ValueError(f"pool source {source.name} asks for {source.count} images; the split has {len(split)}")
    positions = np.sort(np.random.default_rng(_subset_seed(seed, source)).choice(len(split), source.count,
                                                                                replace=False))
    part = split.select(positions)
    own_labels = part.labels
    names = [part.classnames[c] for c in own_labels]
    mapped = np.asarray([target_index.get(n, OFF_LABEL_SET) for n in names], np.int64)
    chosen.append(part)
    labels.append(mapped)
    source_ids.append(np.full(len(part), i, np.int64))
    on_target.append((mapped != OFF_LABEL_SET) & source.on_target)
    own.extend(names)
  labels_all = np.concatenate(labels)
  if not np.any(labels_all != OFF_LABEL_SET):
    raise ValueError(f"no pool image is of a target class ({[s.name for s in sources]} vs "
                     f"{len(target_classnames)} target classes): the pool cannot teach the target anything")
  return ComposedPool(tuple(sources), tuple(chosen), labels_all, np.concatenate(source_ids),
                      np.concatenate(on_target), tuple(own))


def composition_rows(pool: ComposedPool) -> list[dict]:
  """Per source: {"source", "role", "images", "in_label_set", "on_target"} counts, then a "total" row."""
  rows = []
  for i, source in enumerate(pool.sources):
    mine = pool.source_ids == i
    rows.append({"source": source.name, "role": "target domain" if source.on_target else "other domain",
                 "images": int(mine.sum()), "in_label_set": int(np.sum(pool.labels[mine] != OFF_LABEL_SET)),
                 "on_target": int(np.sum(pool.on_target[mine]))})
  rows.append({"source": "total", "role": "", "images": len(pool),
               "in_label_set": int(np.sum(pool.labels != OFF_LABEL_SET)), "on_target": int(pool.on_target.sum())})
  return rows


def composition_markdown(pool: ComposedPool) -> str:
  """The pool's make-up as a markdown table (counts and the off-target share)."""
  rows = composition_rows(pool)
  total = rows[-1]
  lines = ["| source | role | images | of a target class | on target |", "|---|---|---|---|---|"]
  lines += [f"| {r['source']} | {r['role']} | {r['images']} | {r['in_label_set']} | {r['on_target']} |"
            for r in rows]
  lines += ["", f"off target: {total['images'] - total['on_target']} of {total['images']} "
                f"({100 * (1 - total['on_target'] / total['images']):.1f}%)"]
  return "\n".join(lines)


def selection_make_up(pool: ComposedPool, indices: np.ndarray) -> dict[str, float]:
  """Fractions of a selection (pool indices [B]): on target, of a target class (a label the fine-tuning can
  use), and per source ("from <dataset/split>")."""
  indices = np.asarray(indices, np.int64)
  if indices.size == 0:
    raise ValueError("an empty selection has no make-up")
  out = {"on_target": float(pool.on_target[indices].mean()),
         "labelled": float(np.mean(pool.labels[indices] != OFF_LABEL_SET))}
  for i, source in enumerate(pool.sources):
    out[f"from {source.name}"] = float(np.mean(pool.source_ids[indices] == i))
  return out
