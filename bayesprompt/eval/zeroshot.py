"""Zero-shot CLIP classification: a text classifier from the dataset's template, evaluated over a split.

The classifier is CLIP's (`prompts.engine.zeroshot_text_features`, the package's one zero-shot classifier):
for each class, the normalised text embedding of template.format(classname); logits = exp(logit_scale) ·
cos(image embedding, class embedding) (`clip.contrastive_logits`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np
import tqdm

from bayesprompt import clip
from bayesprompt.data import pipeline, protocols
from bayesprompt.data.protocols import evaluation_subset
from bayesprompt.data.sources import LabeledSplit
from bayesprompt.errors import UserError
from bayesprompt.eval import metrics as metrics_lib
from bayesprompt.eval import results as results_lib
from bayesprompt.prompts import engine
from bayesprompt.prompts.engine import zeroshot_text_features


@functools.lru_cache(maxsize=8)
def _logits_fn(config: clip.CLIPConfig):  # One compiled function per architecture, not per call.
  @jax.jit
  def logits(params, images, text_features):
    return clip.contrastive_logits(params, clip.encode_image(params, images, config=config), text_features)

  return logits


def evaluate_split(
  params: Any,
  config: clip.CLIPConfig,
  text_features: jax.Array,
  split: LabeledSplit,
  *,
  batch_size: int = 128,
  max_examples: int | None = None,
  num_threads: int = 8,
  progress: bool = True,
  description: str | None = None,
) -> dict[str, Any]:
  """Logits and metrics of a fixed classifier `text_features` [C, D] over `split`.

  Args:
    max_examples: evaluate a seeded (seed 0) random subset of this size, for quick runs.

  Returns:
    {"metrics": {accuracy, nll, ece, brier} (floats), "logits": float32 [N, C], "labels": int32 [N],
    "num_examples": N}.
  """
  if text_features.shape[0] != split.num_classes:
    raise ValueError(
      f"classifier has {text_features.shape[0]} classes, split {split!r} has {split.num_classes}"
    )
  split = evaluation_subset(split, max_examples)
  batches = pipeline.make_pipeline(
    split, image_size=config.vision.image_size, batch_size=batch_size, train=False, num_threads=num_threads
  )
  logits_fn = _logits_fn(config)
  all_logits, all_labels = [], []
  num_batches = -(-len(split) // batch_size)
  bar = tqdm.tqdm(
    pipeline.iterate_padded(batches, batch_size),
    total=num_batches,
    disable=not progress,
    desc=description or f"{split.dataset}/{split.split}",
    unit="batch",
  )
  for batch, n in bar:
    logits = np.asarray(logits_fn(params, batch["image"], text_features))[:n]
    all_logits.append(logits)
    all_labels.append(batch["label"][:n])
  logits = np.concatenate(all_logits).astype(np.float32)
  labels = np.concatenate(all_labels).astype(np.int32)
  values = metrics_lib.classification_metrics(logits, labels)
  return {
    "metrics": {k: float(v) for k, v in values.items()},
    "logits": logits,
    "labels": labels,
    "num_examples": len(labels),
  }


def evaluate_checkpoint(
  checkpoint: str,
  datasets: list[str],
  *,
  protocol: str,
  data_dir: str | None,
  source: str | None,
  batch_size: int,
  max_examples: int | None,
  run_dir: str,
  tokenizer: str | None = None,
  label_cache_dir: str | None = None,
  num_threads: int = 8,
  progress: bool = True,
  template: str | None = None,
) -> dict:
  """Evaluates `checkpoint` zero-shot on each dataset (experiments.zeroshot); writes results.{md,csv,json}
  into `run_dir` and returns {dataset: {split: metrics}} (plus {"hm": {"accuracy"}} under base2new).

  `template` (one "{}" for the class name) replaces every dataset's hand-crafted prompt; None keeps them.
  """
  if template is not None:  # a bad --template fails before the checkpoint is loaded
    try:
      engine.as_templates(template)
    except ValueError as e:
      raise UserError(f"--template: {e}") from None
  config, params = clip.load_checkpoint(checkpoint)
  tok = clip.get_tokenizer(tokenizer if tokenizer is not None else config)
  writer = results_lib.ResultsWriter(
    run_dir, title=f"Zero-shot {os.path.basename(os.fspath(checkpoint))} ({protocol})"
  )
  out = {}
  for name in datasets:
    data = protocols.zero_shot(
      name, protocol=protocol, data_dir=data_dir, source=source, label_cache_dir=label_cache_dir
    )
    out[name] = {}
    for split_name, split in data.evals.items():
      text_features = zeroshot_text_features(
        params, config, split.classnames, template if template is not None else split.template, tokenizer=tok
      )
      result = evaluate_split(
        params,
        config,
        text_features,
        split,
        batch_size=batch_size,
        max_examples=max_examples,
        num_threads=num_threads,
        progress=progress,
        description=f"{name}/{split_name}",
      )
      metrics = dict(result["metrics"], num_examples=result["num_examples"])
      out[name][split_name] = metrics
      writer.add(name, seed=0, metrics=result["metrics"], split=split_name)
      print(
        f"{name:>16s} {split_name:>5s}: accuracy {100 * metrics['accuracy']:6.2f}%  "
        f"ece {metrics['ece']:.4f}  "
        f"nll {metrics['nll']:.4f}  brier {metrics['brier']:.4f}  ({metrics['num_examples']} images)"
      )
    if protocol == "base2new":
      hm = float(metrics_lib.harmonic_mean(out[name]["base"]["accuracy"], out[name]["new"]["accuracy"]))
      out[name]["hm"] = {"accuracy": hm}
      print(f"{name:>16s}    HM: {100 * hm:6.2f}%")
  paths = writer.write()
  print(writer.markdown())
  print(f"wrote {', '.join(paths.values())}")
  return out
