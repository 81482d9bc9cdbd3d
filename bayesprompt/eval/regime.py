"""Which base-to-new regime a sandbox task is in: zero-shot vs CoOp on both halves, from cached features.

The probe behind the `catalogue` task's design (bayesprompt/data/sandbox/tasks.py) and its regression test:
a task's train and test splits are generated in memory (world seed 0), embedded once by the frozen image
tower, and then
  * zero-shot: the task's hand-crafted template, base images against base classes, new against new;
  * nearest class mean: each class's mean feature over its few shots (per half), a data-only reference;
  * CoOp: a context trained with cross-entropy on the base classes' few shots (`train.feature_coop`),
    evaluated on base and, as is, on the new classes.
`experiments.sandbox_regime` prints it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import bayesprompt.clip as clip
from bayesprompt.data.sandbox import evaluate, tasks
from bayesprompt.prompts.coop import CoOp
from bayesprompt.train import feature_coop

# The sandbox CoOp recipe (experiments/flags/coop_sandbox.flags).
COOP_RECIPE = {
  "n_ctx": 16,
  "epochs": 25,
  "batch_size": 32,
  "lr": 2e-3,
  "weight_decay": 5e-4,
  "warmup_epochs": 1,
  "warmup_lr": 1e-5,
}


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """`shots` indices per class of `labels` [N], drawn without replacement by a generator seeded by `seed`."""
  rng = np.random.default_rng(seed)
  out = []
  for k in np.unique(labels):
    members = np.flatnonzero(labels == k)
    if len(members) < shots:
      raise ValueError(f"class {k} has {len(members)} examples, fewer than shots={shots}")
    out.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(out))


def _nearest_mean_accuracy(
  train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray
) -> float:
  means = np.stack([train_f[train_y == k].mean(0) for k in range(int(train_y.max()) + 1)])
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  return float(np.mean((test_f @ means.T).argmax(1) == test_y))


def regime_probe(
  clip_params,
  clip_config: clip.CLIPConfig,
  task: str = "catalogue",
  *,
  shots: int = 16,
  train_count: int = 40,
  test_count: int = 50,
  seeds: Sequence[int] = (1, 2, 3),
  recipe: dict | None = None,
  world_seed: int = 0,
) -> dict:
  """Zero-shot, nearest-class-mean and CoOp accuracies (fractions) on the base and new halves of a task.

  Args:
    clip_params, clip_config: the frozen CLIP (the shipped one: `bayesprompt.data.sandbox.model.load()`).
    task: a key of `tasks.TASKS`.
    shots: training images per class (drawn per seed from `train_count` generated ones).
    train_count, test_count: images per class generated for the train pool and the test split.
    seeds: CoOp seeds (few-shot draw, context init, batch order).
    recipe: CoOp hyper-parameters; default COOP_RECIPE.
    world_seed: the world seed of the generated images.
  Returns:
    {"task", "num_base", "num_new", "zero_shot": {"base", "new"}, "runs": [{"seed", "coop_base", "coop_new",
    "ncm_base", "ncm_new"}], "recipe"}.
  """
  recipe = {**COOP_RECIPE, **(recipe or {})}
  spec = tasks.TASKS[task]
  names, num_base = spec.classnames, spec.num_base
  tokenizer = clip.get_tokenizer(clip_config)
  train_images, train_labels = evaluate.generate_in_memory(task, "train", count=train_count, seed=world_seed)
  test_images, test_labels = evaluate.generate_in_memory(task, "test", count=test_count, seed=world_seed)
  # Two views per training image, as the sandbox datasets' flip-only augmentation (train_crop_scale (1, 1)).
  train_f = np.stack(
    [
      evaluate.image_embeddings(clip_params, train_images, clip_config),
      evaluate.image_embeddings(clip_params, train_images[:, :, ::-1], clip_config),
    ],
    axis=1,
  )
  test_f = evaluate.image_embeddings(clip_params, test_images, clip_config)
  halves = {
    "base": (test_labels < num_base, 0, names[:num_base]),
    "new": (test_labels >= num_base, num_base, names[num_base:]),
  }
  zero_shot = {}
  for half, (mask, offset, half_names) in halves.items():
    text = evaluate.class_embeddings(clip_params, half_names, spec.template, clip_config, tokenizer)
    zero_shot[half] = float(np.mean((test_f[mask] @ text.T).argmax(1) == test_labels[mask] - offset))
  learner = CoOp(clip_config=clip_config, n_ctx=recipe["n_ctx"])
  fit_kwargs = {k: v for k, v in recipe.items() if k != "n_ctx"}
  runs = []
  for seed in seeds:
    shot = few_shot_indices(train_labels, shots, seed)
    f, y = train_f[shot], train_labels[shot]
    run = {"seed": int(seed)}
    for half, (mask, offset, _) in halves.items():
      in_half = (y >= num_base) == (half == "new")
      run[f"ncm_{half}"] = _nearest_mean_accuracy(
        f[in_half, 0], y[in_half] - offset, test_f[mask], test_labels[mask] - offset
      )
    base = y < num_base
    ctx = feature_coop.fit_context(
      learner, clip_params, names[:num_base], f[base], y[base], seed=int(seed), **fit_kwargs
    )
    for half, (mask, offset, half_names) in halves.items():
      run[f"coop_{half}"] = feature_coop.accuracy(
        learner, ctx, clip_params, half_names, test_f[mask], test_labels[mask] - offset
      )
    runs.append(run)
  return {
    "task": task,
    "num_base": num_base,
    "num_new": len(names) - num_base,
    "zero_shot": zero_shot,
    "runs": runs,
    "recipe": recipe,
  }


def format_probe(result: dict) -> str:
  """A markdown table of `regime_probe`'s result: zero-shot, then per seed CoOp and nearest class mean (%)."""
  zs = result["zero_shot"]
  lines = [
    f"# {result['task']}: {result['num_base']} base / {result['num_new']} new classes; CoOp recipe "
    f"{result['recipe']}",
    "",
    "| row | base | new |",
    "|---|---|---|",
    f"| zero-shot | {100 * zs['base']:.2f} | {100 * zs['new']:.2f} |",
  ]
  for run in result["runs"]:
    lines.append(f"| CoOp seed {run['seed']} | {100 * run['coop_base']:.2f} | {100 * run['coop_new']:.2f} |")
  for run in result["runs"]:
    lines.append(
      f"| nearest class mean seed {run['seed']} | {100 * run['ncm_base']:.2f} | {100 * run['ncm_new']:.2f} |"
    )
  return "\n".join(lines)
