"""CoOp (Zhou et al., IJCV 2022) and CoCoOp (Zhou et al., CVPR 2022): learnable text context.

CoOp learns n context vectors shared by all classes (or one set per class) in the text input; the image
tower is untouched and the text tower runs once per step over the C class prompts.
CoCoOp adds a meta-net Linear(D, D/16)-ReLU-Linear(D/16, W_t) on the normalised image feature whose output
is added to every context token, so the prompts are per image: B x C text sequences in one batched call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import bayesprompt.clip as clip
from bayesprompt.prompts import engine
from bayesprompt.prompts.base import LearnerOutput, Params, PromptLearner, register


@dataclasses.dataclass(frozen=True)
class ContextLearner(PromptLearner):
  """Shared fields of the learners with an input text context.

  Attributes:
    n_ctx: context tokens; None: the number of tokens of `ctx_init` (or the method's default).
    ctx_init: phrase initialising the context from its word embeddings ("a photo of a"); None: random
      N(0, 0.02²) init.
    class_token_position: "end" (default), "middle" or "front" (CoOp only).
  """

  n_ctx: int | None = None
  ctx_init: str | None = None
  class_token_position: str = "end"

  # Default n_ctx with random init, and with a phrase init (None: the phrase's token count).
  _default_n_ctx = 16
  _default_phrase_n_ctx = None

  def __post_init__(self):
    n_ctx = self.n_ctx
    tokenizer = None
    if self.ctx_init is not None:
      if not isinstance(self.ctx_init, str):
        raise TypeError(f"ctx_init must be a str or None, got {type(self.ctx_init).__name__}")
      tokenizer = clip.get_tokenizer(self.clip_config)
      if n_ctx is None:
        n_ctx = self._default_phrase_n_ctx or len(engine.phrase_token_ids(tokenizer, self.ctx_init))
    if n_ctx is None:
      n_ctx = self._default_n_ctx
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
      raise ValueError(f"{self.method}: n_ctx must be an int >= 1, got {n_ctx!r}")
    object.__setattr__(self, "n_ctx", n_ctx)
    if tokenizer is not None:
      engine.check_layout(self._layout(), tokenizer)
    elif self.class_token_position not in engine.CLASS_POSITIONS:
      raise ValueError(f"unknown class_token_position {self.class_token_position!r}; "
                       f"expected one of {engine.CLASS_POSITIONS}")

  def _layout(self) -> engine.PromptLayout:
    return engine.PromptLayout(n_ctx=self.n_ctx, ctx_init=self.ctx_init,
                               class_position=self.class_token_position)

  def _init_ctx(self, rng: jax.Array, clip_params: Params, leading: tuple[int, ...] = ()) -> jax.Array:
    """Context [*leading, n_ctx, W_t]: the init phrase's word embeddings, or N(0, 0.02²)."""
    width = self.clip_config.text.width
    if self.ctx_init is not None:
      ctx = engine.phrase_context(clip_params, self.clip_config, self.ctx_init, self.n_ctx)
      return jnp.broadcast_to(ctx, (*leading, self.n_ctx, width)).astype(jnp.float32)
    return 0.02 * jax.random.normal(rng, (*leading, self.n_ctx, width), jnp.float32)


@register
@dataclasses.dataclass(frozen=True)
class CoOp(ContextLearner):
  """CoOp. Params: {"ctx": [n_ctx, W_t]} or [C, n_ctx, W_t] with `class_specific`.

  Attributes (besides ContextLearner's):
    class_specific: one context per class (CSC); such params only apply to the same number of classes.
  Defaults: n_ctx=16 random (paper); n_ctx=4 "a photo of a" via ctx_init.
  """

  method = "coop"
  official_ove_pg_trainer = "CoOp_OVE_PG"
  class_specific: bool = False

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    leading = (class_state.num_classes,) if self.class_specific else ()
    return {"ctx": self._init_ctx(rng, clip_params, leading)}

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    image = self._frozen_image_features(clip_params, images)
    logits = self.logits_from_features(learner_params, clip_params, class_state, image)[None]
    return LearnerOutput(logits=logits, kl=self._zero(), image_features=image, frozen_image_features=image)

  def logits_from_features(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
                           image_features: jax.Array) -> jax.Array:
    """Logits [B, C] float32 of normalised frozen image features [B, D] (CoOp never changes them, so a
    caller may compute them once: `bayesprompt.train.feature_coop`)."""
    text = self.shared_text_features(learner_params, clip_params, class_state)
    return engine.logits(clip_params, image_features, text, per_image=False)

  @property
  def shares_text_features(self) -> bool:
    # A class-specific context ([C, n_ctx, W]) cannot be applied to one class at a time.
    return not self.class_specific

  def shared_text_features(self, learner_params: Params, clip_params: Params,
                           class_state: engine.ClassState) -> jax.Array:
    prompts = engine.build_prompts(class_state, learner_params["ctx"], class_specific=self.class_specific)
    return engine.text_features(clip_params, self.clip_config, prompts, class_state.pool_index)  # [C, D]


def init_meta_net(rng: jax.Array, embed_dim: int, ctx_dim: int) -> Params:
  """CoCoOp's meta-net Linear(D, D//16)-ReLU-Linear(D//16, W_t), PyTorch default init."""
  k1, k2 = jax.random.split(rng)
  hidden = max(embed_dim // 16, 1)
  return {"linear1": engine.torch_linear_init(k1, embed_dim, hidden),
          "linear2": engine.torch_linear_init(k2, hidden, ctx_dim)}


def apply_meta_net(meta_net: Params, features: jax.Array) -> jax.Array:
  return engine.dense(meta_net["linear2"], jax.nn.relu(engine.dense(meta_net["linear1"], features)))


@register
@dataclasses.dataclass(frozen=True)
class CoCoOp(ContextLearner):
  """CoCoOp. Params: {"ctx": [n_ctx, W_t], "meta_net": {"linear1", "linear2"}}.

  The meta-net reads the normalised frozen image feature; its output (a bias [W_t]) is added to every
  context token. Defaults (paper): n_ctx=4 from "a photo of a".
  """

  method = "cocoop"
  official_ove_pg_trainer = "CoCoOp_OVE_PG"
  ctx_init: str | None = "a photo of a"
  _default_n_ctx = 4

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    k_ctx, k_meta = jax.random.split(rng)
    return {"ctx": self._init_ctx(k_ctx, clip_params),
            "meta_net": init_meta_net(k_meta, self.clip_config.embed_dim, self.clip_config.text.width)}

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    config = self.clip_config
    image = self._frozen_image_features(clip_params, images)  # [B, D]
    bias = apply_meta_net(learner_params["meta_net"], image)  # [B, W_t]
    ctx = learner_params["ctx"][None] + bias[:, None]  # [B, n_ctx, W_t]
    prompts = engine.build_prompts(class_state, ctx)  # [B, C, T, W_t]: B x C sequences in one call
    text = engine.text_features(clip_params, config, prompts, class_state.pool_index)  # [B, C, D]
    logits = engine.logits(clip_params, image, text, per_image=True)[None]
    return LearnerOutput(logits=logits, kl=self._zero(), image_features=image, frozen_image_features=image)
