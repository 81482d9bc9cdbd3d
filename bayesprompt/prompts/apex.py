"""APEX (Yang, Ko, Yun — arXiv 2311.15569): text Adapter, visual Prompts, adaptive Ensemble with frozen CLIP.

What is learned (official trainer `APEX`, the IVLP prompt design with text depth 1):
  text   a shallow context of n tokens after SOS, initialised from "a photo of a" (n=2: "a photo" is learned,
         "of a {class}." stays fixed text, as MaPLe), and a linear text adapter t' = t·W + b on the projected
         text feature (W = I, b = 0 at init);
  vision n_v prompt tokens per layer for layers 0..J_v-1 (N(0, 0.02²) init, independent of the text side):
         layer 0 appended after the patches (before ln_pre), layers 1..J_v-1 *replace* the previous layer's
         prompt outputs (the last n_v tokens).

Test-time adaptive ensemble with frozen CLIP (the official `init_coeff` / eval branch). With T_b the frozen
zero-shot text features of the training classes and T_t,c that of test class c:
  d_nn(c)  = 1 − max_b cos(T_b, T_t,c),   d_avg(c) = 1 − mean_b cos(T_b, T_t,c),
  α_c      = exp(−β · d_avg(c) · [d_nn(c) > τ]),   β = 4, τ = 0.05,
  text_c   = α_c · adapted_c + (1 − α_c) · unadapted_c,
  image    = ᾱ · prompted + (1 − ᾱ) · frozen,   ᾱ = mean_c α_c over the test class list,
then both are L2-normalised. A training class is its own nearest neighbour (d_nn = 0 ≤ τ), so α = 1 there:
pure adapted text, pure prompted image.

Decisions (each against the official code, github.com/YangYongJin/APEX and the OVE-PG copy of it):
  * The ensemble is a test-time rule: `apply(train=True)` returns the pure adapted model, as the official
    forward does in training mode. That *is* the ensemble on the training class list (α ≡ 1), and skipping it
    saves the frozen image-tower pass in every training step.
  * Features are mixed *before* normalisation (raw projection outputs), as the official code does: the
    adapter acts on raw features, so its bias and the recipes' learning rates are calibrated to that scale,
    and raw mixing keeps the ensemble's weights those of the official runs when the adapter changes the norm.
  * `unadapted_text="prompted"` (default, the official code): the unadapted text feature is the prompted text
    feature *before* the adapter. `"zeroshot"` (the paper's "pre-trained VLM" reading): the frozen zero-shot
    feature of the class state (dataset template(s)); those exist only normalised, so the adapted feature is
    normalised before the mix.
  * Distances use the class state's zero-shot features (the dataset's template(s)); the official code encodes
    "a photo of a {class}." (identical for the datasets whose template that is).
  * Frozen image features come from the frozen CLIP. The official code uses a second copy built with the same
    prompt design, whose own vision prompts are never trained (they stay at their random N(0, 0.02²) init).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import bayesprompt.clip as clip
from bayesprompt.clip import edits as edits_lib
from bayesprompt.prompts import engine
from bayesprompt.prompts.base import LearnerOutput, Params, register
from bayesprompt.prompts.coop import ContextLearner

UNADAPTED_TEXT = ("prompted", "zeroshot")


def adaptive_ensemble_weights(test_features: jax.Array, train_features: jax.Array, *, beta: float = 4.0,
                              threshold: float = 0.05) -> jax.Array:
  """APEX's per-class ensemble weight α_c = exp(−β · d_avg(c) · [d_nn(c) > threshold]).

  Args:
    test_features: [C, D] L2-normalised frozen text features of the test classes.
    train_features: [C_train, D] L2-normalised frozen text features of the training classes.
    beta: β ≥ 0, how fast α decays with the mean distance to the training classes.
    threshold: τ, nearest-neighbour cosine distance up to which a class counts as a training class (α = 1).
  Returns:
    [C] float32 in (0, 1].
  """
  # HIGHEST: on accelerators a float32 matmul may run in reduced precision by default; the cosines of a
  # training class with itself must stay well inside the threshold.
  cosine = jnp.matmul(test_features.astype(jnp.float32), train_features.astype(jnp.float32).T,
                      precision=jax.lax.Precision.HIGHEST)  # [C, C_train]
  nearest_distance = 1.0 - jnp.max(cosine, axis=-1)
  mean_distance = 1.0 - jnp.mean(cosine, axis=-1)
  return jnp.exp(-beta * jnp.where(nearest_distance > threshold, mean_distance, 0.0))


@register
@dataclasses.dataclass(frozen=True)
class APEX(ContextLearner):
  """APEX. Params: {"ctx": [n, W_t], "adapter": {"kernel": [D, D], "bias": [D]},
  "vision_prompts": [J_v, n_v, W_v]} ("vision_prompts" only when J_v > 0).

  Attributes (besides ContextLearner's):
    n_vision_ctx: n_v, vision prompt tokens per layer.
    vision_depth: J_v, vision prompts at layers 0..J_v-1 (0: none, the image tower is frozen CLIP's); None:
      every layer of the vision tower (the paper's 12 of 12). The OVE-PG runs use 1.
    beta: β of the ensemble weights.
    distance_threshold: τ of the ensemble weights.
    unadapted_text: "prompted" (official code) or "zeroshot" — what the adapted text feature is mixed with.
  Defaults (official vit_b16_c2_ep15_batch16_2+2ctx): n=2 of "a photo of a", n_v=2, J_v = all layers, β=4,
  τ=0.05. `prepare_classes` needs `templates` (the distances use zero-shot features) and, at test time, the
  training classes (`train_classnames`).
  """

  method = "apex"
  official_ove_pg_trainer = "APEX_OVE_PG"
  needs_train_classes = True
  ctx_init: str | None = "a photo of a"
  n_vision_ctx: int = 2
  vision_depth: int | None = None
  beta: float = 4.0
  distance_threshold: float = 0.05
  unadapted_text: str = "prompted"
  _default_n_ctx = 2
  _default_phrase_n_ctx = 2

  def __post_init__(self):
    super().__post_init__()
    layers = self.clip_config.vision.layers
    if self.vision_depth is None:
      object.__setattr__(self, "vision_depth", layers)
    depth = self.vision_depth
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= layers:
      raise ValueError(f"apex: vision_depth must be an int in [0, {layers}] (prompts at vision layers "
                       f"0..depth-1 of the tower's {layers}), got {depth!r}")
    n = self.n_vision_ctx
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"apex: n_vision_ctx must be an int >= 1, got {n!r}")
    for name in ("beta", "distance_threshold"):
      value = getattr(self, name)
      is_number = isinstance(value, int | float) and not isinstance(value, bool)
      if not is_number or not math.isfinite(value) or value < 0:
        raise ValueError(f"apex: {name} must be a finite number >= 0, got {value!r}")
    if self.unadapted_text not in UNADAPTED_TEXT:
      raise ValueError(f"apex: unknown unadapted_text {self.unadapted_text!r}; "
                       f"expected one of {UNADAPTED_TEXT}")

  @property
  def touches_image_tower(self) -> bool:
    return self.vision_depth > 0

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    k_ctx, k_vision = jax.random.split(rng)
    embed_dim = self.clip_config.embed_dim
    params = {"ctx": self._init_ctx(k_ctx, clip_params),
              "adapter": {"kernel": jnp.eye(embed_dim, dtype=jnp.float32),
                          "bias": jnp.zeros((embed_dim,), jnp.float32)}}
    if self.vision_depth:
      shape = (self.vision_depth, self.n_vision_ctx, self.clip_config.vision.width)
      params["vision_prompts"] = 0.02 * jax.random.normal(k_vision, shape, jnp.float32)
    return params

  # ------------------------------------------------------------------------------------------ pieces

  def vision_edits(self, learner_params: Params) -> dict:
    """Vision schedule: layer-0 prompts appended before ln_pre; layers 1..J_v-1 replace the last n_v
    tokens."""
    prompts = learner_params["vision_prompts"]
    schedule = {-1: [edits_lib.insert(prompts[0])]}
    schedule.update({i: [edits_lib.replace(prompts[i], position=-self.n_vision_ctx)]
                     for i in range(1, self.vision_depth)})
    return schedule

  def prompted_text_features(self, learner_params: Params, clip_params: Params,
                             class_state: engine.ClassState) -> jax.Array:
    """Raw (un-normalised) text features [C, D] of the class prompts with the learned context."""
    prompts = engine.build_prompts(class_state, learner_params["ctx"])  # [C, T, W_t]
    features, _ = clip.text_tower_from_embeddings(clip_params, prompts, class_state.pool_index,
                                                  config=self.clip_config)
    return features.astype(jnp.float32)

  def learner_class_state(self, clip_params: Params, classnames: Sequence[str],
                          **inputs: Any) -> dict[str, jax.Array]:
    """Adds `engine.train_class_state` (the training classes' zero-shot features, for the ensemble)."""
    state = super().learner_class_state(clip_params, classnames, **inputs)
    train_state = engine.train_class_state(clip_params, self.clip_config, classnames, inputs["templates"],
                                           inputs["train_classnames"])
    return {**state, **train_state}

  def adapt(self, learner_params: Params, text_features: jax.Array) -> jax.Array:
    """The text adapter t·W + b on [..., D] raw text features."""
    return engine.dense(learner_params["adapter"], text_features)

  def ensemble_weights(self, class_state: engine.ClassState) -> jax.Array:
    """α [C] of the class list against the training classes (see `adaptive_ensemble_weights`)."""
    train_text = class_state.learner_state.get("train_text_features")
    if class_state.zeroshot_text_features is None or train_text is None:
      raise ValueError("apex: the test-time ensemble needs the class state's zero-shot text features of the "
                       "test and of the training classes: call learner.prepare_classes(clip_params, "
                       "classnames, templates=..., train_classnames=<the classes the params were trained "
                       "on>)")
    return adaptive_ensemble_weights(class_state.zeroshot_text_features, train_text,
                                     beta=self.beta, threshold=self.distance_threshold)

  def _image_features_raw(self, learner_params: Params, clip_params: Params, images: jax.Array,
                          prompted: bool) -> jax.Array:
    edits = self.vision_edits(learner_params) if prompted else None
    features, _ = clip.image_tower(clip_params, images, config=self.clip_config, edits=edits)
    return features.astype(jnp.float32)

  # ------------------------------------------------------------------------------------------ forward

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    del rng, labels
    prompted_text = self.prompted_text_features(learner_params, clip_params, class_state)  # [C, D]
    adapted_text = self.adapt(learner_params, prompted_text)
    prompted = self.vision_depth > 0
    frozen_image = None
    if not (train and prompted):
      frozen_image = self._image_features_raw(learner_params, clip_params, images, prompted=False)  # [B, D]
    image = frozen_image
    if prompted:
      image = self._image_features_raw(learner_params, clip_params, images, prompted=True)
    if train:
      text = clip.normalize(adapted_text)
    else:
      ensemble_weight = self.ensemble_weights(class_state)[:, None]  # [C, 1], the paper's α
      if self.unadapted_text == "prompted":
        text = clip.normalize(ensemble_weight * adapted_text + (1.0 - ensemble_weight) * prompted_text)
      else:
        text = clip.normalize(ensemble_weight * clip.normalize(adapted_text)
                              + (1.0 - ensemble_weight) * class_state.zeroshot_text_features)
      if prompted:
        image_weight = jnp.mean(ensemble_weight)
        image = image_weight * image + (1.0 - image_weight) * frozen_image
    image = clip.normalize(image)
    logits = engine.logits(clip_params, image, text, per_image=False)[None]
    frozen = None if frozen_image is None else clip.normalize(frozen_image)
    return LearnerOutput(logits=logits, kl=self._zero(), image_features=image, frozen_image_features=frozen)
