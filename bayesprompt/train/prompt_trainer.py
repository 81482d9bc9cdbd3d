"""jit-compiled training and evaluation steps for prompt learners, independent of learner and objective.

The frozen CLIP is a constant argument: gradients are taken with respect to the learner's params only,
so no gradient of the backbone is ever computed. Randomness is derived from (seed, step) by `fold_in`,
so a run resumed from a checkpoint draws exactly the numbers an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

import bayesprompt.clip as clip
from bayesprompt.prompts import engine


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: learner params; opt_state: optax state; key: raw uint32 PRNG key data [2]."""

  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array


def create_train_state(learner, optimizer: optax.GradientTransformation, seed: int, clip_params,
                       class_state) -> TrainState:
  init_key, train_key = jax.random.split(jax.random.key(seed))
  params = learner.init(init_key, clip_params, class_state)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    key=jax.random.key_data(train_key))


def frozen_teacher_logits(clip_params, clip_config, text_features: jax.Array, images: jax.Array,
                          frozen_image_features: jax.Array | None) -> jax.Array:
  """Frozen zero-shot logits [B, C] float32: exp(logit_scale)·cos (+ logit_bias for SigLIP), the logits the
  learners produce (`engine.logits`), so the λ₁ teacher term compares like with like.

  Args:
    text_features: [C, D] normalised frozen class text features. images: [B, S, S, 3].
    frozen_image_features: [B, D] normalised frozen image features the learner already computed, or None.
  """
  if frozen_image_features is None:
    frozen_image_features = clip.normalize(clip.image_tower(clip_params, images, config=clip_config)[0])
  logits = engine.logits(clip_params, frozen_image_features, text_features, per_image=False)
  return jax.lax.stop_gradient(logits)


def _official_trainer_kwarg(objective, learner) -> dict:
  """{"official_trainer": ...} for objectives that reproduce a learner's official trainer (OVE-PG
  faithful)."""
  if getattr(objective, "mode", None) != "faithful":
    return {}
  return {"official_trainer": getattr(learner, "official_ove_pg_trainer", None)}


def train_step_fn(learner, objective, optimizer: optax.GradientTransformation):
  """The un-jitted `step(state, clip_params, class_state, images, labels, teacher_text) -> (state, metrics)`.

  images [B, S, S, 3] float32, labels [B] int32 (-1 marks padding), teacher_text [C, D] normalised frozen text
  features (ignored unless the objective needs the teacher). `make_train_step` jits it for one device;
  `bayesprompt.train.distributed` jits the same function with mesh shardings.
  """

  def loss_fn(params, clip_params, class_state, images, labels, teacher_text, key):
    apply_key, objective_key = jax.random.split(key)
    output = learner.apply(params, clip_params, class_state, images, apply_key, train=True, labels=labels)
    teacher = None
    if objective.needs_teacher:
      teacher = frozen_teacher_logits(clip_params, learner.clip_config, teacher_text, images,
                                      output.frozen_image_features)
    return objective(output, labels, objective_key, teacher,
                     default_sample_reduction=getattr(learner, "sample_reduction", "mean_loss"),
                     default_kl_weight=getattr(learner, "kl_weight", 0.0),
                     **_official_trainer_kwarg(objective, learner))

  def step(state: TrainState, clip_params, class_state, images, labels, teacher_text):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, clip_params, class_state, images, labels,
                                                     teacher_text, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # A non-finite loss or gradient never reaches the params or the optimizer state: the step is skipped
    # (params and moments unchanged, the step counter still advances so the RNG stream stays aligned) and
    # reported as metrics["nonfinite_skipped"] = 1; prompt_run stops on a non-finite epoch loss.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
    metrics = dict(metrics, grad_norm=grad_norm, nonfinite_skipped=1.0 - finite.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_train_step(learner, objective, optimizer: optax.GradientTransformation):
  """Returns a jitted
  `step(state, clip_params, class_state, images, labels, teacher_text) -> (state, metrics)` (see
  `train_step_fn`); the state argument is donated."""
  return jax.jit(train_step_fn(learner, objective, optimizer), donate_argnums=(0,))


def predict_fn(learner):
  """The un-jitted `predict(params, clip_params, class_state, images, key) -> probs [B, C]`."""

  def predict(params, clip_params, class_state, images, key):
    output = learner.apply(params, clip_params, class_state, images, key, train=False)
    return learner.predict_probs(output)

  return predict


def make_predict_step(learner):
  """Returns a jitted `predict(params, clip_params, class_state, images, key) -> probs [B, C]`."""
  return jax.jit(predict_fn(learner))
