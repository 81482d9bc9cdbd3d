"""Zero-shot evaluation of a CLIP on the sandbox tasks (used by pretraining and its regression test).

Protocol (the field's base-to-new one, on the sandbox's label order): the classifier of a dataset is the
normalised text embedding of `template.format(classname)` for each class; an image's prediction is the
argmax of cosine similarity. "base" accuracy is measured on test images of base classes against the base
classes only, "new" on new classes against new classes only (chance = 1 / number of classes of that
half), "all" on every test image against every class.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bayesprompt.clip import model as clip_model
from bayesprompt.clip.config import CLIPConfig
from bayesprompt.data.sandbox import builder, model, tasks

# Registry name -> (builder config, TFDS split).
EVAL_SETS = {
    "sandbox_shapes": ("colour_shape", "test"),
    "sandbox_shapes_v2": ("colour_shape", "test_v2"),
    "sandbox_shapes_sketch": ("colour_shape", "test_sketch"),
    "sandbox_shapes_a": ("colour_shape", "test_a"),
    "sandbox_shapes_r": ("colour_shape", "test_r"),
    "sandbox_textures": ("texture_shape", "test"),
    "sandbox_sizes": ("size_shape", "test"),
    "sandbox_catalogue": ("catalogue", "test"),
}


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 CLIP-normalised pixels."""
  mean, std = jnp.asarray(model.MEAN_RGB, jnp.float32), jnp.asarray(model.STD_RGB, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def read_split(config: str | builder.SandboxConfig, split: str, *, data_dir: str | None = None,
               limit: int | None = None, fields: Sequence[str] = ("image", "label")) -> dict[str, np.ndarray]:
  """The first `limit` examples (all if None) of a split as stacked arrays (captions as lists of str)."""
  source = builder.data_source(config, split, data_dir)
  n = len(source) if limit is None else min(limit, len(source))
  out: dict[str, list] = {f: [] for f in fields}
  for start in range(0, n, 4096):
    for example in source.__getitems__(list(range(start, min(n, start + 4096)))):
      for f in fields:
        out[f].append(example[f])
  arrays = {}
  for f, values in out.items():
    if values and _is_text(values[0]):
      arrays[f] = [_decode(v) for v in values]
    else:
      arrays[f] = np.stack(values) if values else np.zeros((0,))
  return arrays


def _is_text(value) -> bool:
  if isinstance(value, (bytes, str)):
    return True
  if isinstance(value, np.ndarray):
    return value.dtype.kind in "OSU"
  return isinstance(value, list) and bool(value) and _is_text(value[0])


def _decode(value):
  """bytes -> str, recursively through lists and arrays of text."""
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, str):
    return value
  return [_decode(v) for v in value]


@functools.partial(jax.jit, static_argnames=("config",))
def _image_embeddings(params, images, config: CLIPConfig):
  return clip_model.normalize(clip_model.image_tower(params, normalize_images(images), config=config)[0])


@functools.partial(jax.jit, static_argnames=("config",))
def _text_embeddings(params, token_ids, config: CLIPConfig):
  return clip_model.normalize(clip_model.text_tower(params, token_ids, config=config)[0])


def image_embeddings(params, images: np.ndarray, config: CLIPConfig, batch_size: int = 512) -> np.ndarray:
  """Normalised image embeddings [N, D] of uint8 images [N, H, W, 3], in fixed-size batches (one compile)."""
  n = len(images)
  out = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    out.append(np.asarray(_image_embeddings(params, jnp.asarray(chunk), config))[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, config.embed_dim), np.float32)


def class_embeddings(params, classnames: Sequence[str], template: str, config: CLIPConfig,
                     tokenizer) -> np.ndarray:
  """Normalised text embeddings [C, D] of the prompts `template.format(name)`."""
  ids = tokenizer([template.format(name) for name in classnames], context_length=config.text.context_length)
  return np.asarray(_text_embeddings(params, jnp.asarray(ids), config))


def base_new_accuracy(image_emb: np.ndarray, labels: np.ndarray, text_emb: np.ndarray, num_base: int) -> dict:
  """Accuracies of cosine-argmax classification: base (base images vs base classes), new (new vs new),
  all (all vs all), and the harmonic mean of base and new."""
  labels = np.asarray(labels)
  sims = image_emb @ text_emb.T
  base = labels < num_base
  result = {
      "all": float(np.mean(sims.argmax(1) == labels)),
      "base": float(np.mean(sims[base][:, :num_base].argmax(1) == labels[base])),
      "new": float(np.mean(sims[~base][:, num_base:].argmax(1) == labels[~base] - num_base)),
  }
  b, n = result["base"], result["new"]
  result["hm"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
  return result


def zero_shot(params, config: CLIPConfig, tokenizer, *, datasets: Iterable[str] = tuple(EVAL_SETS),
              data_dir: str | None = None, limit: int | None = None,
              builder_configs: dict[str, str | builder.SandboxConfig] | None = None) -> dict[str, dict]:
  """Zero-shot base / new / all accuracy (and chance levels) on sandbox test sets.

  Args:
    params, config, tokenizer: the model.
    datasets: names from EVAL_SETS.
    data_dir: where the sandbox data live (default: the sandbox cache).
    limit: evaluate on the first `limit` test examples of each set (a fixed slice), default all.
    builder_configs: builder config name -> a SandboxConfig to use instead (smoke runs with tiny splits).
  Returns:
    {dataset: {"base", "new", "all", "hm", "chance_base", "chance_new", "chance_all", "num_examples"}}.
  """
  results = {}
  for name in datasets:
    if name not in EVAL_SETS:
      raise ValueError(f"unknown sandbox eval set {name!r}; expected one of {sorted(EVAL_SETS)}")
    task, split = EVAL_SETS[name]
    spec = tasks.TASKS[task]
    cfg = (builder_configs or {}).get(task, task)
    data = read_split(cfg, split, data_dir=data_dir, limit=limit)
    text_emb = class_embeddings(params, spec.classnames, spec.template, config, tokenizer)
    accuracy = base_new_accuracy(image_embeddings(params, data["image"], config), data["label"], text_emb,
                                 spec.num_base)
    num_classes = len(spec.classnames)
    results[name] = {**accuracy, "chance_base": 1 / spec.num_base,
                     "chance_new": 1 / (num_classes - spec.num_base), "chance_all": 1 / num_classes,
                     "num_examples": len(data["label"])}
  return results


def generate_in_memory(task: str, split: str, *, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A task split generated in memory (no TFDS), `count` images per class of world seed `seed`: images uint8
  [C * count, 32, 32, 3] and labels int32 [C * count] (the split's distribution; the prepared files' images
  when `count` is the split's size)."""
  chunks = list(tasks.generate(task, split, seed=seed, count=count))
  return np.concatenate([c["image"] for c in chunks]), np.concatenate([c["label"] for c in chunks])


REGRESSION_COUNT = 10  # images per class of the regression slice (640 colour_shape test images)


def regression_slice(params, config: CLIPConfig, tokenizer, *, seed: int = 0,
                     count: int = REGRESSION_COUNT, template: str | None = None) -> dict:
  """Zero-shot accuracy on a fixed, small evaluation slice generated in memory (no TFDS): the colour_shape
  "test" distribution with `count` images per class, world seed `seed`. The pretraining run stores it with
  the exported model, and the regression test recomputes it from the shipped checkpoint. `template`
  replaces the dataset's hand-crafted prompt (default) with another, e.g. one that names the light."""
  images, labels = generate_in_memory("colour_shape", "test", count=count, seed=seed)
  spec = tasks.TASKS["colour_shape"]
  text_emb = class_embeddings(params, spec.classnames, template or spec.template, config, tokenizer)
  result = base_new_accuracy(image_embeddings(params, images, config), labels, text_emb, spec.num_base)
  return {**result, "num_examples": len(labels), "count_per_class": count, "seed": seed}
