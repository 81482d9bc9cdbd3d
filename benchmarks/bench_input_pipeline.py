"""Input-pipeline throughput: grain pipeline (threads) vs a sequential loop doing the same decoding work.

  python -m benchmarks.bench_input_pipeline [--num_images=256] [--image_size=224]

Builds `num_images` JPEGs of ImageNet-like size (500x375) in memory, then times, for the eval transform
(resize short side + centre crop) and the train transform (random-resized-crop + flip):
  reference: a Python loop calling the same preprocess function one image at a time, then np.stack;
  pipeline:  `make_pipeline` with 1 and N reader threads.
Prints images/s and the ratio pipeline / reference (same run, same machine).
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
from PIL import Image

from bayesprompt.data import pipeline, preprocess
from bayesprompt.data.sources import LabeledSplit
from benchmarks import harness


def _jpegs(n: int) -> list[bytes]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    # Smooth gradients + noise: compresses like a photo, not like white noise.
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, (x + y) % 256], -1).astype(np.float32)
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def _split(jpegs: list[bytes]) -> LabeledSplit:
  labels = np.arange(len(jpegs)) % 10
  return LabeledSplit(
    dataset="bench",
    split="test",
    classnames=[f"c{i}" for i in range(10)],
    template="a photo of a {}.",
    read_record=lambda i: (jpegs[i], int(labels[i])),
    raw_labels=lambda: labels,
    record_ids=np.arange(len(jpegs)),
    label_map=np.arange(10),
    description="in-memory JPEGs",
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
  args = parser.parse_args()
  jpegs = _jpegs(args.num_images)
  split = _split(jpegs)
  size, n = args.image_size, args.num_images
  threads = max(2, os.cpu_count() or 2)
  print(f"{n} JPEGs 500x375 -> {size}px, batch {args.batch_size}, {os.cpu_count()} CPUs")

  def reference(train: bool):
    rng = np.random.default_rng(0)
    for start in range(0, n, args.batch_size):
      chunk = jpegs[start : start + args.batch_size]
      if train:
        np.stack([preprocess.train_image(j, size, rng) for j in chunk])
      else:
        np.stack([preprocess.eval_image(j, size) for j in chunk])

  def piped(train: bool, num_threads: int):
    it = pipeline.make_pipeline(
      split,
      image_size=size,
      batch_size=args.batch_size,
      train=train,
      seed=0,
      shuffle=False,
      drop_remainder=False,
      num_threads=num_threads,
    )
    for _ in it:
      pass

  for train in (False, True):
    name = "train" if train else "eval"
    piped(train, 1)  # warm-up (imports, thread pools)
    comparison = harness.interleaved({
        "reference loop": lambda train=train: reference(train),
        "pipeline, 1 thread": lambda train=train: piped(train, 1),
        f"pipeline, {threads} threads": lambda train=train: piped(train, threads)}, rounds=args.rounds, warmup=0)
    print(f"\n{name} transform, {n} images per call:")
    print(comparison.markdown(reference="reference loop"))
    for candidate in comparison.samples:
      print(f"  {candidate:22s} {n / comparison.spread(candidate, 'wall').median:7.1f} img/s (median wall)")

if __name__ == "__main__":
  main()
