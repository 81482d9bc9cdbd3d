"""KFAC-GGN factors of both CLIP projections from image–caption pairs, chunked and resumable (BayesVLM).

Protocol (the paper's): the pairs are shuffled (seeded) and cut into "class batches" of `class_batch_size`
pairs. Inside a class batch each image embedding is scored against the batch's caption embeddings (the
image projection's factors) and each caption embedding against the batch's image embeddings (the text
projection's), with the InfoNCE (CLIP) or sigmoid (SigLIP) curvature; the per-batch sums add up
(`laplace.kfac_update`), and A = Σφφᵀ/√N, B = ΣH/√N at the end.

Resumability: after every `checkpoint_every` class batches the running sums of both towers and the index
of the next class batch are saved with orbax (`laplace.save_factors`) into checkpoint_dir/step_<k>; orbax
finalises a checkpoint by renaming its temporary directory, so a crash never leaves a half-written step.
A restart with the same settings (fingerprinted) continues after the latest complete step; different
settings raise instead of mixing two estimates. The sums are stored as host arrays, so a run may resume on
another number of devices.

Data parallel (`mesh`, from `bayesprompt.train.distributed.make_mesh`): every forward batch of
`batch_size` pairs is split over the mesh's "data" axis. With several processes each reads only its own
contiguous block of batch_size / num_processes pairs of every forward batch (`shard_batch` assembles the
global batch in process order, so the class batch keeps its order). The towers run sharded, the class
batch's embeddings are all-gathered as targets, and each device sums the KFAC terms of its own rows;
`bayes.distributed.kfac_update_sharded` adds the per-device partial sums with one all-reduce. The result
equals the single-device estimate up to the order of floating-point sums. Only process 0 deletes old
partial steps (orbax coordinates the writes themselves).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import pathlib
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from bayesprompt import clip
from bayesprompt.bayes import distributed as bayes_distributed
from bayesprompt.bayes import laplace
from bayesprompt.bayesvlm import features as features_lib
from bayesprompt.bayesvlm import vlm
from bayesprompt.data import preprocess

_STEP = re.compile(r"^step_(\d+)$")


class CaptionPairs:
  """Random access to image–caption pairs of a TFDS dataset: `pairs[i] -> (image, caption str)`.

  `image` is whatever the store holds (uint8 array or encoded bytes; `preprocess.eval_image` takes both);
  a caption field holding several captions yields the first.
  """

  def __init__(self, source: Any, *, image_key: str = "image", caption_key: str = "caption", name: str = ""):
    self._source = source
    self.image_key = image_key
    self.caption_key = caption_key
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: np.ndarray) -> tuple[list[Any], list[str]]:
    indices = [int(i) for i in indices]
    getitems = getattr(self._source, "__getitems__", None)
    try:
      examples = getitems(indices) if getitems is not None else [self._source[i] for i in indices]
    except Exception:  # noqa: BLE001 -- some stores (mock data) only support one record at a time.
      examples = [self._source[i] for i in indices]
    images, captions = [], []
    for example in examples:
      for key in (self.image_key, self.caption_key):
        if key not in example:
          raise ValueError(f"caption dataset {self.name!r} has no field {key!r}; fields: {sorted(example)}")
      images.append(example[self.image_key])
      captions.append(_first_text(example[self.caption_key]))
    return images, captions


def _first_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, str):
    return value
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _first_text(value.item())
  if isinstance(value, dict) and "text" in value:  # e.g. coco_captions: {"captions": {"text": [...]}}
    return _first_text(value["text"])
  if len(value) == 0:
    raise ValueError("empty caption list")
  return _first_text(value[0])


def open_caption_pairs(
  name: str,
  split: str = "train",
  *,
  data_dir: str | None = None,
  image_key: str = "image",
  caption_key: str = "caption",
  sandbox_count: int | None = None,
) -> CaptionPairs:
  """Opens a TFDS image–caption dataset (e.g. "sandbox_world/captions") for random access.

  Args:
    name: TFDS name (with config); the sandbox corpus is generated on first use, others must be prepared
      with `file_format="array_record"` (nothing is downloaded).
    sandbox_count: for "sandbox_world/..." only: a small generated corpus of this many pairs (smoke runs).
  """
  import tensorflow_datasets as tfds

  if sandbox_count is not None:
    if not name.startswith("sandbox_world"):
      raise ValueError(f"sandbox_count is only for the sandbox caption corpus, not {name!r}")
    from bayesprompt.data.sandbox import builder

    config = builder.SandboxConfig(name="captions_smoke_w0", task="captions", seed=0, count=int(sandbox_count))
    source = builder.data_source(config, split, data_dir)
  else:
    if name.startswith("sandbox_world"):
      from bayesprompt.data.sandbox import builder

      # Generated on first use (never downloaded); `tfds.data_source` below does not prepare anything.
      builder.prepare(name.split("/", 1)[1].split(":")[0] if "/" in name else "colour_shape", data_dir)
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 -- re-raised with what to do.
      from bayesprompt.data.sources import tfds_build_command

      raise ValueError(
        f"cannot open caption dataset {name!r} split {split!r} (data_dir={data_dir!r}; "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): prepare it with "
        f"`{tfds_build_command(name, data_dir)}`. bayesprompt never downloads."
      ) from err
  if len(source) == 0:
    raise ValueError(f"caption dataset {name!r} split {split!r} is empty")
  return CaptionPairs(source, image_key=image_key, caption_key=caption_key, name=name)


def _fingerprint(settings: dict[str, Any]) -> str:
  return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _latest_step(directory: pathlib.Path) -> pathlib.Path | None:
  steps = [(int(m.group(1)), p) for p in directory.glob("step_*") if (m := _STEP.match(p.name)) and p.is_dir()]
  return max(steps)[1] if steps else None


def _state_from_factors(f: laplace.KFACFactors) -> laplace.KFACState:
  return laplace.KFACState(jnp.asarray(f.a), jnp.asarray(f.b), jnp.asarray(int(round(float(f.num_data))), jnp.int32))


def estimate_pair_factors(
  params: Any,
  config: clip.CLIPConfig,
  pairs: CaptionPairs,
  *,
  tokenizer: Callable[..., np.ndarray],
  num_pairs: int | None = None,
  class_batch_size: int = 4096,
  batch_size: int = 256,
  seed: int = 0,
  checkpoint_dir: str | pathlib.Path | None = None,
  checkpoint_every: int = 1,
  kfac_chunk: int = 512,
  num_threads: int = 8,
  progress: bool = True,
  model_fingerprint: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  la_batch_size: int | None = None,
) -> tuple[dict[str, laplace.KFACFactors], dict[str, Any]]:
  """KFAC factors {"img", "txt"} of both projections over `num_pairs` pairs (all if None).

  Args:
    params, config: the model; tokenizer: texts -> int ids [M, context].
    pairs: from `open_caption_pairs`.
    class_batch_size: pairs per class batch (the paper: 32,768); the last batch may be smaller.
    batch_size: pairs per tower forward pass (memory), independent of the class batch.
    seed: the shuffle of the pairs.
    checkpoint_dir: where partial sums go (None: no checkpoints, no resume).
    checkpoint_every: class batches between checkpoints.
    mesh: run data-parallel over this mesh's "data" axis (see the module docstring); `batch_size` is then
      the global forward batch and must be a multiple of the data axis size and of the process count.
      None: one device.
    la_batch_size: None (default): every pair counts in A, B and N. An int reproduces the official
      `kfac_ggn` (AaltoML/BayesVLM `--la_batch_size`): a trailing partial class batch is dropped, and inside
      each class batch B sums over whole data batches of `la_batch_size` pairs only (the leftover pairs
      still count in A and N; `laplace.kfac_update(b_batch_size=)`). One device only (mesh=None).

  Returns:
    ({"img": KFACFactors, "txt": KFACFactors}, info: num_pairs, class_batch_size, likelihood, dims).

  Raises:
    ValueError: bad sizes, or a checkpoint_dir holding a run with other settings.
  """
  total = len(pairs)
  num_pairs = total if num_pairs is None else int(num_pairs)
  if not 0 < num_pairs <= total:
    raise ValueError(f"num_pairs={num_pairs}; expected 1..{total} (the caption dataset's size)")
  for name, value in (("class_batch_size", class_batch_size), ("batch_size", batch_size),
                      ("checkpoint_every", checkpoint_every), ("kfac_chunk", kfac_chunk)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r}; expected a positive integer")
  if la_batch_size is not None:
    if isinstance(la_batch_size, bool) or not isinstance(la_batch_size, (int, np.integer)) or (
        la_batch_size <= 0):
      raise ValueError(f"la_batch_size={la_batch_size!r}; expected a positive integer or None")
    if mesh is not None:
      raise ValueError("la_batch_size (the official code's B batching) runs on one device; pass mesh=None")
    if num_pairs < class_batch_size:
      raise ValueError(f"la_batch_size: the official code needs at least class_batch_size={class_batch_size} "
                       f"pairs (it drops a partial class batch), got num_pairs={num_pairs}")
  likelihood = vlm.likelihood_of(params)
  logit_scale = float(np.asarray(params["logit_scale"]))
  logit_bias = vlm.logit_bias_of(params)
  dims = {t: vlm.projection_dims(params, config, t) for t in vlm.TOWERS}
  add_bias = {t: vlm.projection_has_bias(config, t) for t in vlm.TOWERS}
  settings = {
    "model": model_fingerprint or features_lib.params_fingerprint(params),
    "config": repr(config),
    "pairs": pairs.name,
    "num_pairs": num_pairs,
    "total_pairs": total,
    "class_batch_size": int(class_batch_size),
    "seed": int(seed),
  }
  if la_batch_size is not None:  # only then: the fingerprints of default runs stay as they were
    settings["la_batch_size"] = int(la_batch_size)
  fingerprint = _fingerprint(settings)
  order = np.random.default_rng(seed).permutation(total)[:num_pairs]
  # The official code drops a trailing partial class batch (floor); ours keeps it (ceil).
  num_batches = -(-num_pairs // class_batch_size) if la_batch_size is None else num_pairs // class_batch_size
  official_b = {} if la_batch_size is None else {"b_batch_size": int(la_batch_size)}

  states = {t: laplace.kfac_init(dims[t][0], dims[t][1], add_bias=add_bias[t]) for t in vlm.TOWERS}
  first_batch = 0
  directory = None if checkpoint_dir is None else pathlib.Path(checkpoint_dir)
  if directory is not None:
    latest = _latest_step(directory)
    if latest is not None:
      stored, info = laplace.load_factors(latest)
      if info.get("fingerprint") != fingerprint:
        raise ValueError(
          f"{directory} holds partial factors of another estimate (settings {info.get('settings')}); "
          f"use a fresh directory or delete it (this run: {settings})"
        )
      states = {t: _state_from_factors(stored[t]) for t in vlm.TOWERS}
      first_batch = int(info["next_batch"])
      logging.info("resuming KFAC estimation at class batch %d/%d from %s", first_batch, num_batches, latest)

  forward = _OneDeviceForward(params, config, batch_size) if mesh is None else (
    _ShardedForward(params, config, batch_size, mesh))
  bar = tqdm.tqdm(total=num_pairs, initial=min(num_pairs, first_batch * class_batch_size), disable=not progress,
                  desc=f"KFAC {pairs.name}", unit="pair")
  size = config.vision.image_size
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for index in range(first_batch, num_batches):
      batch_ids = order[index * class_batch_size : (index + 1) * class_batch_size]
      feats: dict[str, dict[str, list[Any]]] = {"img": {}, "txt": {}}
      for start in range(0, len(batch_ids), batch_size):
        rows = forward.rows(batch_ids, start)
        if len(rows):
          images, captions = pairs.read(rows)
          pixels = np.stack(list(pool.map(lambda im: preprocess.eval_image(im, size), images)))
          ids = np.asarray(tokenizer(captions, context_length=config.text.context_length))
        else:  # a process whose block of the last forward batch is all padding
          pixels = np.zeros((0, size, size, 3), np.float32)
          ids = np.zeros((0, config.text.context_length), np.int32)
        for tower, out in forward(pixels, ids).items():
          for k, v in out.items():
            feats[tower].setdefault(k, []).append(v)
        bar.update(min(batch_size, len(batch_ids) - start))
      for tower, other in (("img", "txt"), ("txt", "img")):
        states[tower] = forward.accumulate(
          states[tower],
          forward.concatenate(feats[tower]["pre_projection"]),
          forward.concatenate(feats[tower]["embeddings"]),
          forward.concatenate(feats[other]["embeddings"]),
          num_valid=len(batch_ids),
          logit_scale=logit_scale,
          likelihood=likelihood,
          logit_bias=logit_bias,
          add_bias=add_bias[tower],
          chunk_size=kfac_chunk,
          **official_b,
        )
      done = index + 1
      if directory is not None and (done % checkpoint_every == 0 or done == num_batches):
        _save_partial(directory, states, {"fingerprint": fingerprint, "settings": settings, "next_batch": done})
  bar.close()
  # Host copies (replicated sums are readable on every process): the factors of a sharded run are the same
  # single-device arrays a one-device run returns.
  factors = {t: laplace.kfac_finalize(_to_host(states[t])) for t in vlm.TOWERS}
  info = {
    # Which weights the factors belong to: consumers refuse factors of another model of the same shapes.
    "model_fingerprint": settings["model"],
    "num_pairs": num_pairs,
    "class_batch_size": int(class_batch_size),
    "num_class_batches": num_batches,
    "la_batch_size": la_batch_size,
    "likelihood": likelihood,
    "seed": int(seed),
    "pairs": pairs.name,
    **{f"dims_{t}": list(dims[t]) for t in vlm.TOWERS},
    **{f"add_bias_{t}": add_bias[t] for t in vlm.TOWERS},
  }
  return factors, info


def _to_host(state: laplace.KFACState) -> laplace.KFACState:
  return laplace.KFACState(*(np.asarray(x) for x in state))


def _save_partial(directory: pathlib.Path, states: dict[str, laplace.KFACState], info: dict[str, Any]) -> None:
  """Every process calls this (orbax's save is collective); only process 0 deletes the previous step."""
  step = directory / f"step_{info['next_batch']:06d}"
  laplace.save_factors(step, {t: laplace.KFACFactors(*_to_host(s)) for t, s in states.items()}, info)
  if jax.process_index() != 0:
    return
  for old in directory.glob("step_*"):  # keep only the newest complete step
    if old != step and _STEP.match(old.name):
      shutil.rmtree(old, ignore_errors=True)


class _OneDeviceForward:
  """Both towers on one device; every forward batch padded to `batch_size` rows (one compiled shape)."""

  def __init__(self, params: Any, config: clip.CLIPConfig, batch_size: int):
    self._params, self._config, self._batch_size = params, config, batch_size

  def rows(self, batch_ids: np.ndarray, start: int) -> np.ndarray:
    """The pair indices of the forward batch at `start` that this process reads."""
    return batch_ids[start : start + self._batch_size]

  def __call__(self, pixels: np.ndarray, ids: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    n = len(pixels)
    if n < self._batch_size:  # pad to one compiled shape
      pixels = np.concatenate([pixels, np.zeros((self._batch_size - n, *pixels.shape[1:]), pixels.dtype)])
      ids = np.concatenate([ids, np.repeat(ids[-1:], self._batch_size - n, axis=0)])
    image_out = features_lib.image_features(self._params, self._config, pixels)
    text_out = features_lib.text_features(self._params, self._config, ids, batch_size=self._batch_size)
    return {tower: {k: out[k][:n] for k in ("pre_projection", "embeddings")}
            for tower, out in (("img", image_out), ("txt", text_out))}

  @staticmethod
  def concatenate(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts)

  @staticmethod
  def accumulate(state, features, embeddings, targets, *, num_valid, logit_scale, **kwargs) -> laplace.KFACState:
    del num_valid  # the single-device path drops padding rows in __call__
    return laplace.kfac_update(state, features, embeddings, targets, logit_scale, **kwargs)


class _ShardedForward(_OneDeviceForward):
  """Both towers over a mesh: each process reads its block of every forward batch, the batch is split over
  "data", the outputs stay sharded global arrays (padding rows included, at the class batch's end)."""

  def __init__(self, params: Any, config: clip.CLIPConfig, batch_size: int, mesh: jax.sharding.Mesh):
    from bayesprompt.train import distributed as mesh_lib

    self._config, self._batch_size, self._mesh = config, batch_size, mesh
    self._local = mesh_lib.check_global_batch(batch_size, mesh)  # rows per process per forward batch
    self._shard_batch = mesh_lib.shard_batch
    rows = mesh_lib.batch_sharding(mesh)
    self._params = mesh_lib.place_clip(params, mesh)

    def towers(params, pixels, ids):
      image, image_out = clip.image_tower(params, pixels, config=config)
      text, text_out = clip.text_tower(params, ids, config=config)
      return {"img": {"pre_projection": image_out["pre_projection"].astype(jnp.float32),
                      "embeddings": image.astype(jnp.float32)},
              "txt": {"pre_projection": text_out["pre_projection"].astype(jnp.float32),
                      "embeddings": text.astype(jnp.float32)}}

    self._towers = jax.jit(towers, in_shardings=(mesh_lib.clip_shardings(params, mesh), rows, rows),
                           out_shardings=rows)

  def rows(self, batch_ids: np.ndarray, start: int) -> np.ndarray:
    first = start + jax.process_index() * self._local
    return batch_ids[first : min(first + self._local, start + self._batch_size)]

  def __call__(self, pixels: np.ndarray, ids: np.ndarray) -> dict[str, dict[str, jax.Array]]:
    n = len(pixels)
    if n < self._local:  # padding rows: dropped by `num_valid` in accumulate
      pixels = np.concatenate([pixels.astype(np.float32),
                               np.zeros((self._local - n, *pixels.shape[1:]), np.float32)])
      ids = np.concatenate([ids, np.zeros((self._local - n, ids.shape[1]), ids.dtype)]).astype(np.int32)
    batch = self._shard_batch({"pixels": pixels, "ids": ids}, self._mesh)
    return self._towers(self._params, batch["pixels"], batch["ids"])

  @staticmethod
  def concatenate(parts: list[jax.Array]) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

  def accumulate(self, state, features, embeddings, targets, *, num_valid, logit_scale,
                 **kwargs) -> laplace.KFACState:
    return bayes_distributed.kfac_update_sharded(state, features, embeddings, targets, logit_scale, self._mesh,
                                                 num_valid=num_valid, num_targets=num_valid, **kwargs)
