"""grain input pipelines over a `LabeledSplit`: shuffle, decode + CLIP preprocessing on CPU threads, batch.

Batches are dicts of NumPy arrays: "image" float32 [batch, size, size, 3] (NHWC, CLIP-normalised),
"label" int32 [batch], "record_id" int64 [batch]. Given a seed the stream is deterministic: grain's
index shuffle and per-element augmentation RNGs depend on (seed, position), not on thread timing.

Typical use:
  split = protocols.base_to_new("oxford_pets", seed=1, data_dir=...).train
  for batch in make_pipeline(split, image_size=config.vision.image_size, batch_size=32, train=True, seed=1,
                             num_epochs=None):
    ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import numpy as np

from bayesprompt.data import preprocess
from bayesprompt.data.sources import LabeledSplit

# Offset between the shuffle seed and the augmentation seed, so the two streams are unrelated.
_AUGMENT_SEED_OFFSET = 0x5EED


def _stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  return {
    "image": np.stack([e["image"] for e in examples]),
    "label": np.asarray([e["label"] for e in examples], dtype=np.int32),
    "record_id": np.asarray([e["record_id"] for e in examples], dtype=np.int64),
  }


def make_pipeline(
  split: LabeledSplit,
  *,
  image_size: int,
  batch_size: int,
  train: bool,
  seed: int = 0,
  shuffle: bool | None = None,
  num_epochs: int | None = 1,
  drop_remainder: bool | None = None,
  num_threads: int = 8,
  prefetch_buffer_size: int = 64,
  num_workers: int = 0,
  crop_scale: tuple[float, float] = (0.08, 1.0),
) -> grain.IterDataset:
  """A batched, prefetching iterable over `split`.

  Args:
    split: the examples (see `sources.open_split` and `protocols`).
    image_size: output resolution: the model's `config.vision.image_size`.
    batch_size: examples per batch.
    train: training augmentation (random-resized-crop + flip) instead of resize + centre crop.
    seed: shuffle and augmentation seed.
    shuffle: default `train`. A fresh permutation each epoch.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: default `train`: drop a final short batch.
    num_threads / prefetch_buffer_size: grain's reader threads and read-ahead (elements); decoding and
      augmentation run in these threads (PIL releases the GIL while resizing).
    num_workers: > 0 adds grain multiprocessing prefetch with that many worker processes.
    crop_scale: the random-resized-crop area range.
  """
  if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if len(split) == 0:
    raise ValueError(f"cannot build a pipeline over an empty split: {split!r}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  shuffle = train if shuffle is None else shuffle
  drop_remainder = train if drop_remainder is None else drop_remainder
  where = f"{split.dataset}/{split.split}"
  size = int(image_size)

  ds = grain.MapDataset.source(split)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if train:

    def augment(example: dict, rng: np.random.Generator) -> dict:
      image = preprocess.train_image(
        example["image"],
        size,
        rng,
        scale=crop_scale,
        where=f"{where}: {split.record_description(example['record_id'])}",
      )
      return {"image": image, "label": example["label"], "record_id": example["record_id"]}

    ds = ds.random_map(augment, seed=seed + _AUGMENT_SEED_OFFSET)
  else:

    def resize(example: dict) -> dict:
      image = preprocess.eval_image(
        example["image"], size, where=f"{where}: {split.record_description(example['record_id'])}"
      )
      return {"image": image, "label": example["label"], "record_id": example["record_id"]}

    ds = ds.map(resize)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_stack)
  iter_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  )
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter_ds


def verify_images(split: LabeledSplit, *, num_threads: int = 8, progress: bool = True) -> int:
  """Reads and decodes every image of `split` once (in `num_threads` threads, with a progress bar), so that
  an unreadable or truncated file fails before training rather than in the middle of it.

  Returns the number of images checked. Raises ValueError listing every image that failed (file path for
  folder sources, record number for TFDS) with PIL's reason.
  """
  import concurrent.futures

  import tqdm

  where = f"{split.dataset}/{split.split}"

  def check(position: int) -> str | None:
    record_id = int(split.record_ids[position])
    try:
      preprocess.decode_image(split[position]["image"], where=split.record_description(record_id))
    except ValueError as e:
      return str(e)
    return None

  failures = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    results = pool.map(check, range(len(split)))
    for failure in tqdm.tqdm(results, total=len(split), desc=f"verify {where}", unit="image",
                             disable=not progress, leave=False):
      if failure is not None:
        failures.append(failure)
  if failures:
    shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
    raise ValueError(f"{where}: {len(failures)} of {len(split)} images cannot be decoded: {shown}")
  return len(split)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> tuple[dict[str, np.ndarray], int]:
  """Pads a short final batch to `batch_size` rows (zeros; label -1) so a jitted step sees one shape.

  Returns (padded batch, number of real rows).
  """
  n = len(batch["label"])
  if n > batch_size:
    raise ValueError(f"batch has {n} rows, more than batch_size {batch_size}")
  if n == batch_size:
    return batch, n
  padded = {}
  for key, value in batch.items():
    fill = -1 if key == "label" else 0
    pad = np.full((batch_size - n, *value.shape[1:]), fill, dtype=value.dtype)
    padded[key] = np.concatenate([value, pad])
  return padded, n


def iterate_padded(batches, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """(padded batch, number of real rows) for each batch of an evaluation pipeline."""
  for batch in batches:
    yield pad_batch(batch, batch_size)
