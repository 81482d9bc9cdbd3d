"""Cached pre-projection features of a CLIP / SigLIP model (the inputs BayesVLM's Laplace works from).

Everything in BayesVLM after the towers is a function of
  φ = out["pre_projection"]  [N, d_in]   the projection's input (float32)
  g = the projected embedding [N, D]      (unnormalised; φ @ P (+ bias) (+ SigLIP's residual))
so the towers run once per split and the result is cached on disk:

  extract_split_features(params, config, split, cache_dir=...)  ->  {"pre_projection", "embeddings",
                                                                      "labels", ["residual"]}

The split is processed in chunks of `chunk_size` examples; each chunk is written atomically
(`chunk_00003.npz` via a temporary file + `os.replace`) into a directory keyed by a fingerprint of
(model config, model weights, split identity, preprocessing), so an interrupted extraction resumes at the
first missing chunk and a changed model or split never reads stale features.

Text features of prompts (`text_features`) are cheap (one forward per class) and are not cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bayesprompt import clip
from bayesprompt.data import pipeline
from bayesprompt.data.sources import LabeledSplit
from bayesprompt.prompts import engine

_FORMAT_VERSION = 1


def has_image_residual(config: clip.CLIPConfig) -> bool:
  """True for SigLIP's attention-pooling image head (embedding = fc2(φ) + a deterministic residual)."""
  return config.vision.pool != "cls"


@functools.lru_cache(maxsize=8)
def _image_fn(config: clip.CLIPConfig):
  residual = has_image_residual(config)

  @jax.jit
  def fn(params, images):
    features, out = clip.image_tower(params, images, config=config)
    extra = out["projection_residual"] if residual else jnp.zeros((images.shape[0], 0), jnp.float32)
    return out["pre_projection"].astype(jnp.float32), features.astype(jnp.float32), extra.astype(jnp.float32)

  return fn


@functools.lru_cache(maxsize=8)
def _text_fn(config: clip.CLIPConfig):
  @jax.jit
  def fn(params, token_ids):
    features, out = clip.text_tower(params, token_ids, config=config)
    return out["pre_projection"].astype(jnp.float32), features.astype(jnp.float32)

  return fn


def image_features(params: Any, config: clip.CLIPConfig, images: np.ndarray) -> dict[str, np.ndarray]:
  """One forward of the image tower on CLIP-normalised float images [N, S, S, 3].

  Returns:
    {"pre_projection": float32 [N, d_in], "embeddings": float32 [N, D]} plus "residual" float32 [N, D]
    for SigLIP's image head.
  """
  pre, emb, residual = _image_fn(config)(params, jnp.asarray(images, jnp.float32))
  out = {"pre_projection": np.asarray(pre), "embeddings": np.asarray(emb)}
  if has_image_residual(config):
    out["residual"] = np.asarray(residual)
  return out


def text_features(
  params: Any, config: clip.CLIPConfig, token_ids: np.ndarray, batch_size: int = 256
) -> dict[str, np.ndarray]:
  """Text tower on int token ids [M, T] in batches: {"pre_projection" [M, d_t], "embeddings" [M, D]}."""
  token_ids = np.asarray(token_ids)
  if token_ids.ndim != 2 or len(token_ids) == 0:
    raise ValueError(f"token ids must be a non-empty [M, context] array, got shape {token_ids.shape}")
  if token_ids.min() < 0 or token_ids.max() >= config.text.vocab_size:
    raise ValueError(
      f"token ids span [{token_ids.min()}, {token_ids.max()}] but the model's vocabulary has "
      f"{config.text.vocab_size} ids: the tokenizer does not match the checkpoint"
    )
  fn = _text_fn(config)
  pres, embs = [], []
  for start in range(0, len(token_ids), batch_size):
    chunk = token_ids[start : start + batch_size]
    n = len(chunk)
    if n < batch_size and len(token_ids) > batch_size:  # one compiled shape for every batch
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    pre, emb = fn(params, jnp.asarray(chunk, jnp.int32))
    pres.append(np.asarray(pre)[:n])
    embs.append(np.asarray(emb)[:n])
  return {"pre_projection": np.concatenate(pres), "embeddings": np.concatenate(embs)}


def prompt_features(
  params: Any, config: clip.CLIPConfig, tokenizer: Any, classnames: Sequence[str], template: str
) -> dict[str, np.ndarray]:
  """Text features of `template.format(name)` per class: {"pre_projection" [C, d_t], "embeddings" [C, D]}.

  BayesVLM's inputs (pre-projection features for the text posterior, unnormalised embeddings), from the
  prompts the zero-shot classifier (`prompts.engine.zeroshot_text_features`) reads; not a second classifier.
  """
  prompts = engine.render_prompts(classnames, template)
  ids = np.asarray(tokenizer(prompts, context_length=config.text.context_length))
  return text_features(params, config, ids)


# ------------------------------------------------------------------------------------------------------------
# Cached extraction over a split.
# ------------------------------------------------------------------------------------------------------------


def params_fingerprint(params: Any) -> str:
  """sha1 over every leaf's path, shape, dtype and bytes (identifies a checkpoint's weights)."""
  digest = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _split_fingerprint(config: clip.CLIPConfig, model_fingerprint: str, split: LabeledSplit) -> str:
  digest = hashlib.sha1()
  digest.update(
    json.dumps(
      {
        "version": _FORMAT_VERSION,
        "config": repr(config),
        "model": model_fingerprint,
        "dataset": split.dataset,
        "split": split.split,
        "description": split.description,
        "classes": list(split.classnames),
      }
    ).encode()
  )
  digest.update(np.asarray(split.record_ids, np.int64).tobytes())
  digest.update(np.asarray(split.label_map, np.int64).tobytes())
  return digest.hexdigest()[:16]


def _atomic_save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def extract_split_features(
  params: Any,
  config: clip.CLIPConfig,
  split: LabeledSplit,
  *,
  cache_dir: str | os.PathLike | None = None,
  batch_size: int = 128,
  chunk_size: int = 2048,
  num_threads: int = 8,
  progress: bool = True,
  description: str | None = None,
  model_fingerprint: str | None = None,
) -> dict[str, np.ndarray]:
  """Image pre-projection features, embeddings and labels of every example of `split`, in split order.

  Args:
    params, config: the CLIP model.
    split: the examples (`sources.open_split`, possibly `select`-ed).
    cache_dir: if given, chunks are cached under cache_dir/<dataset>-<split>-<fingerprint>/ and an
      interrupted run resumes at the first missing chunk; None: nothing is written.
    batch_size: images per forward pass (the last batch is padded, so one shape is compiled).
    chunk_size: examples per cached chunk (rounded up to a multiple of batch_size).
    num_threads: grain decoding threads.
    model_fingerprint: `params_fingerprint(params)` if already known (it hashes every weight).

  Returns:
    {"pre_projection": float32 [N, d_in], "embeddings": float32 [N, D], "labels": int32 [N]} plus
    "residual" float32 [N, D] for SigLIP.

  Raises:
    ValueError: an empty split or non-positive sizes.
  """
  if len(split) == 0:
    raise ValueError(f"cannot extract features of an empty split: {split!r}")
  if batch_size <= 0 or chunk_size <= 0:
    raise ValueError(f"batch_size={batch_size}, chunk_size={chunk_size}; expected positive integers")
  chunk_size = -(-chunk_size // batch_size) * batch_size
  num_chunks = -(-len(split) // chunk_size)
  directory = None
  if cache_dir is not None:
    fingerprint = _split_fingerprint(config, model_fingerprint or params_fingerprint(params), split)
    directory = pathlib.Path(cache_dir) / f"{split.dataset}-{split.split}-{fingerprint}"
    directory.mkdir(parents=True, exist_ok=True)
  bar = tqdm.tqdm(
    total=len(split), disable=not progress, desc=description or f"features {split.dataset}/{split.split}",
    unit="img",
  )
  chunks = []
  for index in range(num_chunks):
    start, stop = index * chunk_size, min(len(split), (index + 1) * chunk_size)
    path = None if directory is None else directory / f"chunk_{index:05d}.npz"
    if path is not None and path.exists():
      with np.load(path) as stored:
        chunk = {k: stored[k] for k in stored.files}
    else:
      chunk = _extract_chunk(params, config, split.select(np.arange(start, stop)), batch_size, num_threads)
      if path is not None:
        _atomic_save_npz(path, chunk)
    if len(chunk["labels"]) != stop - start:
      raise ValueError(f"cached chunk {path} has {len(chunk['labels'])} rows; expected {stop - start}")
    chunks.append(chunk)
    bar.update(stop - start)
  bar.close()
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _extract_chunk(
  params: Any, config: clip.CLIPConfig, split: LabeledSplit, batch_size: int, num_threads: int
) -> dict[str, np.ndarray]:
  batches = pipeline.make_pipeline(
    split, image_size=config.vision.image_size, batch_size=batch_size, train=False, num_threads=num_threads
  )
  parts: dict[str, list[np.ndarray]] = {}
  for batch, n in pipeline.iterate_padded(batches, batch_size):
    out = image_features(params, config, batch["image"])
    out["labels"] = np.asarray(batch["label"], np.int32)
    for k, v in out.items():
      parts.setdefault(k, []).append(v[:n])
  return {k: np.concatenate(v) for k, v in parts.items()}
