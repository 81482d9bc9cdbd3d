"""CoOp trained on cached image features: the shared text context fitted against precomputed image embeddings.

CoOp never touches the image tower, so a training step needs only each image's normalised frozen feature and
a text-tower pass over the class prompts. Computing the features once turns a sandbox CoOp run into seconds:
the sandbox regime probe (`eval/regime.py`, `experiments.sandbox_regime`) and its regression test use it.
Same learner init (`prompt_trainer.create_train_state`), Dassl cosine schedule with constant warm-up and
torch-style SGD as `prompt_run`. The augmentation is precomputed too: given the features of V views of each
image (e.g. the image and its mirror image: the sandbox's flip-only augmentation), each step draws one view
per example, as the binary's random flip does. Batches are a per-epoch permutation (drop-last, as the
binary), but not the binary's data order, so figures are close to, not equal to, those of
`experiments.prompt_learning`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesprompt.prompts.coop import CoOp
from bayesprompt.train import optim, prompt_trainer


def fit_context(
  learner: CoOp,
  clip_params,
  classnames: Sequence[str],
  features: np.ndarray,
  labels: np.ndarray,
  *,
  epochs: int,
  batch_size: int,
  lr: float,
  seed: int,
  weight_decay: float = 5e-4,
  warmup_epochs: int = 1,
  warmup_lr: float = 1e-5,
  optimizer: str = "sgd",
  momentum: float = 0.9,
) -> dict:
  """Trains a CoOp context with cross-entropy on cached features.

  Args:
    learner: a CoOp learner (shared context; class-specific contexts too).
    clip_params: the frozen CLIP.
    classnames: the C training classes.
    features: float32 [N, D] normalised frozen image features (`CoOp._frozen_image_features` of the images),
      or [N, V, D]: V augmented views per image, one drawn uniformly per example and step.
    labels: int [N] in [0, C).
    epochs, batch_size, lr, weight_decay, warmup_epochs, warmup_lr, optimizer, momentum: the recipe (as
      experiments.prompt_learning's flags).
    seed: init of the context and order of the batches.
  Returns:
    The learner params ({"ctx": ...}).
  """
  if not isinstance(learner, CoOp):
    raise TypeError(f"fit_context trains CoOp only (its image tower is frozen), got {type(learner).__name__}")
  features, labels = np.asarray(features, np.float32), np.asarray(labels)
  if features.ndim == 2:
    features = features[:, None]
  if features.ndim != 3 or len(features) != len(labels):
    raise ValueError(
      f"features must be [N, D] or [N, V, D] with one label each; got {features.shape} and {labels.shape}"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
    raise ValueError(f"labels must lie in [0, {len(classnames)}); got [{labels.min()}, {labels.max()}]")
  steps_per_epoch = len(labels) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(labels)} training examples")
  schedule = optim.dassl_cosine_schedule(
    lr, epochs, steps_per_epoch, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr
  )
  tx = optim.make_optimizer(optimizer, schedule, weight_decay=weight_decay, momentum=momentum)
  class_state = learner.prepare_classes(clip_params, classnames)
  state = prompt_trainer.create_train_state(learner, tx, seed, clip_params, class_state)

  def loss_fn(params, image, label):
    logits = learner.logits_from_features(params, clip_params, class_state, image)
    return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

  @jax.jit
  def step(params, opt_state, image, label):
    grads = jax.grad(loss_fn)(params, image, label)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = state.params, state.opt_state
  order = np.random.default_rng(seed)
  for _ in range(epochs):
    perm = order.permutation(len(labels))
    for s in range(steps_per_epoch):
      batch = perm[s * batch_size : (s + 1) * batch_size]
      views = order.integers(0, features.shape[1], len(batch))
      params, opt_state = step(
        params, opt_state, jnp.asarray(features[batch, views]), jnp.asarray(labels[batch], jnp.int32)
      )
  return params


def accuracy(
  learner: CoOp,
  learner_params: dict,
  clip_params,
  classnames: Sequence[str],
  features: np.ndarray,
  labels: np.ndarray,
) -> float:
  """Top-1 accuracy of the context on cached features [N, D] with labels [N] over the class list `classnames`
  (a context trained on other classes applies as is: base-to-new)."""
  class_state = learner.prepare_classes(clip_params, classnames)
  logits = jax.jit(learner.logits_from_features)(
    learner_params, clip_params, class_state, jnp.asarray(features)
  )
  return float(np.mean(np.asarray(logits).argmax(1) == np.asarray(labels)))
