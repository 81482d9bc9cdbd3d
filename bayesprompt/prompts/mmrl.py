"""MMRL: multi-modal representation learning (Guo & Gu, CVPR 2025, arXiv 2503.08497).

A shared, modality-agnostic representation space R [K, d_r] (K = 5 tokens, d_r = 512 for ViT-B/16) is
mapped per prompted layer to each tower by linear aligners, R_t^i = F_t^i(R) [K, W_t] and
R_v^i = F_v^i(R) [K, W_v], i = J .. J+H-1 (0-based blocks; the recipe's 1-based layers 6..12 of ViT-B/16
are J = 5, H = 7). Both towers get the same schedule (`insert_then_replace`):

  text    R_t^J inserted after SOS before block J, then replaced in place before every later prompted block
          (the causal mask grows with the sequence and the EOT index shifts by K: `bayesprompt.clip.edits`);
          the text input is a hand-crafted template (MMRL learns no input context);
  vision  R_v^J inserted after CLS before block J, then replaced in place.

Two image features, both against the same (prompted) text features:
  class head           CLS output -> ln_post -> frozen CLIP projection
  representation head  the K representation-token outputs -> ln_post (per token) -> mean over the K tokens
                       -> trainable projection `rep_proj` [W_v, D]
Loss (official MMRL_Loss):
  α·CE(class head) + (1 − α)·CE(rep head) + λ·(1 − mean_b cos(f_img, f_img^CLIP))
                                          + λ·(1 − mean_c cos(f_txt, f_txt^CLIP))
with f_img the class-head image feature, f_img^CLIP the frozen CLIP image feature, f_txt^CLIP the frozen
zero-shot text feature of the same template. α = 0.7 (`class_head_weight`); λ is per dataset (`reg_weight`,
see the vitb16 flagfile). The objective plug-ins compute the CE (or OVE-PG) part from `LearnerOutput.logits`
(class head, weight 1 − aux_weight = α) and `aux_logits` (representation head, weight 1 − α); the λ terms
arrive as `LearnerOutput.aux_loss`.
Inference (decoupled, official `test`): logits α·cls + (1 − α)·rep for the classes the learner was trained on
(`ClassState.learner_state["is_train_class"]`, this learner's own class state), class-head logits for the
other classes; column by column, so one class list may mix both (the official code decides per split:
base -> fused, new -> class head).

Checked against the official code (yunncheng/MMRL): ln_post is applied to each representation token before
the mean; the text input is the dataset's hand-crafted template (the first template given to
`prepare_classes`, "a photo of a {}." without one); the aligners are one Linear each copied to all layers.
Differences: logits use exp(logit_scale) where the official code uses the constant 100 (the same for OpenAI
CLIP); `rep_proj` starts from the frozen projection (`rep_proj_init="frozen"`, the representation head starts
out as a CLIP head) where the official code draws it from N(0, 1/W_v) (`rep_proj_init="random"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import bayesprompt.clip as clip
from bayesprompt.clip import edits as edits_lib
from bayesprompt.clip.layers import LayerNorm
from bayesprompt.prompts import engine
from bayesprompt.prompts.base import LearnerOutput, Params, PromptLearner, register, template_prepare_classes

REP_PROJ_INITS = ("frozen", "random")


# ------------------------------------------------------------------------------------------ shared placement


def prompted_layer_range(method: str, config: clip.CLIPConfig, first_layer: int | None,
                         depth: int | None) -> tuple[int, int]:
  """(J, H): the first prompted block (0-based) and the number of prompted blocks of both towers.

  Defaults (MMRL's 1-based layers 6..12 of 12, scaled to the tower): J = layers//2 - 1, H = to the last layer
  (J = 5, H = 7 for ViT-B; J = 1, H = 3 for the 4-layer sandbox model).
  Raises ValueError naming the method for a J or H that is not an int in range for either tower.
  """
  layers = min(config.text.layers, config.vision.layers)
  first = max(layers // 2 - 1, 0) if first_layer is None else first_layer
  if isinstance(first, bool) or not isinstance(first, int) or first < 0:
    raise ValueError(f"{method}: first_layer must be an int >= 0, got {first!r}")
  depth = (layers - first) if depth is None else depth
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
    raise ValueError(f"{method}: depth must be an int >= 1, got {depth!r}")
  for name, tower_layers in (("text", config.text.layers), ("vision", config.vision.layers)):
    if first + depth > tower_layers:
      raise ValueError(f"{method}: prompted layers {first}..{first + depth - 1} (first_layer={first}, "
                       f"depth={depth}) exceed the {name} tower's {tower_layers} layers "
                       f"(0..{tower_layers - 1})")
  return first, depth


def insert_then_replace(layers: Sequence[int], tokens: jax.Array, position: int) -> dict:
  """Token-edit schedule: tokens[0] inserted at `position` before block layers[0], tokens[h] replacing the
  same slice before block layers[h] (h >= 1).

  Args:
    layers: the prompted blocks, in order.
    tokens: [H, n, width] shared by the batch, or [H, batch, n, width] per sequence.
    position: where the tokens stand (1: after SOS / CLS).
  """
  return {layer: [edits_lib.insert(tokens[h], position=position) if h == 0
                  else edits_lib.replace(tokens[h], position=position)]
          for h, layer in enumerate(layers)}


def _check_number(method: str, name: str, value, low: float, high: float | None) -> None:
  if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low or (
      high is not None and not value <= high):
    expected = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{method}: {name} must be a number {expected}, got {value!r}")


# ------------------------------------------------------------------------------------------ the backbone


@dataclasses.dataclass(frozen=True)
class RepresentationBackbone:
  """MMRL's representation tokens, two image heads, regularisers and decoupled inference, shared by `MMRL`
  and `VaMPMMRL` (mixed in before their `PromptLearner` base; they supply `prompted_layers`).

  Attributes:
    n_tokens: K representation tokens.
    rep_dim: d_r, width of the representation space; None: the text width (512 for ViT-B/16, as the recipe).
    class_head_weight: the paper's α, weight of the class head in the loss and in the fused test logits
      (hparam key `alpha` before the rename: still accepted, with a FutureWarning).
    reg_weight: λ, weight of each cosine regulariser (the official default 1.0; per-dataset recipe values
      in experiments/flags/mmrl_vitb16.flags).
    rep_proj_init: "frozen" (copy of the frozen image projection) or "random" (N(0, 1/W_v), official code).
    template: the hand-crafted text input when `prepare_classes` gets no templates.
  """

  n_tokens: int = 5
  rep_dim: int | None = None
  class_head_weight: float = 0.7
  reg_weight: float = 1.0
  rep_proj_init: str = "frozen"
  template: str = "a photo of a {}."
  needs_train_classes: ClassVar[bool] = True
  renamed_hparams: ClassVar[dict[str, str]] = {"alpha": "class_head_weight"}

  prepare_classes = template_prepare_classes

  def learner_class_state(self, clip_params: Params, classnames: Sequence[str],
                          **inputs: Any) -> dict[str, jax.Array]:
    """Adds `engine.train_class_state` ("is_train_class": where the decoupled inference fuses the heads)."""
    state = super().learner_class_state(clip_params, classnames, **inputs)
    train_state = engine.train_class_state(clip_params, self.clip_config, classnames, inputs["templates"],
                                           inputs["train_classnames"])
    return {**state, **train_state}

  def _check_backbone(self) -> None:
    method, config = self.method, self.clip_config
    if config.vision.pool != "cls" or not config.vision.class_token:
      raise ValueError(f"{method}: needs a CLIP image tower with a class token and ln_post + projection "
                       f"head (vision pool 'cls'); got pool {config.vision.pool!r} (SigLIP's "
                       "attention-pooling head has no place for representation tokens)")
    rep_dim = config.text.width if self.rep_dim is None else self.rep_dim
    for name, value in (("n_tokens", self.n_tokens), ("rep_dim", rep_dim)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method}: {name} must be an int >= 1, got {value!r}")
    object.__setattr__(self, "rep_dim", rep_dim)
    _check_number(method, "class_head_weight", self.class_head_weight, 0.0, 1.0)
    _check_number(method, "reg_weight", self.reg_weight, 0.0, None)
    if self.rep_proj_init not in REP_PROJ_INITS:
      raise ValueError(f"{method}: unknown rep_proj_init {self.rep_proj_init!r}; "
                       f"expected one of {REP_PROJ_INITS}")
    engine.as_templates(self.template)

  @property
  def touches_image_tower(self) -> bool:
    return True

  def _init_representation(self, rng: jax.Array, clip_params: Params) -> Params:
    """{"rep_tokens": [K, d_r], "to_text": [H, d_r, W_t], "to_vision": [H, d_r, W_v], "rep_proj": [W_v, D]}.

    As the official code: R ~ N(0, 0.02²); each aligner one PyTorch-default Linear copied to the H layers.
    """
    config, depth = self.clip_config, len(self.prompted_layers)
    k_rep, k_text, k_vision, k_proj = jax.random.split(rng, 4)
    frozen_proj = clip_params["visual"]["proj"]["kernel"]
    if self.rep_proj_init == "frozen":
      rep_proj = jnp.array(frozen_proj, jnp.float32)
    else:
      rep_proj = config.vision.width**-0.5 * jax.random.normal(k_proj, frozen_proj.shape, jnp.float32)
    return {"rep_tokens": 0.02 * jax.random.normal(k_rep, (self.n_tokens, self.rep_dim), jnp.float32),
            "to_text": engine.clone_linear(k_text, self.rep_dim, config.text.width, (depth,)),
            "to_vision": engine.clone_linear(k_vision, self.rep_dim, config.vision.width, (depth,)),
            "rep_proj": {"kernel": rep_proj}}

  def representation_tokens(self, learner_params: Params) -> tuple[jax.Array, jax.Array]:
    """(R_t, R_v): [H, K, W_t] and [H, K, W_v], the shared space mapped into each prompted layer."""
    space = learner_params["rep_tokens"]
    space = jnp.broadcast_to(space, (len(self.prompted_layers), *space.shape))  # [H, K, d_r]
    return (engine.stacked_dense(learner_params["to_text"], space),
            engine.stacked_dense(learner_params["to_vision"], space))

  def vision_edits(self, learner_params: Params) -> dict:
    """Vision schedule: R_v inserted after CLS at block J, replaced at the later prompted blocks."""
    _, vision_tokens = self.representation_tokens(learner_params)
    return insert_then_replace(self.prompted_layers, vision_tokens, position=1)

  def image_heads(self, learner_params: Params, clip_params: Params,
                  images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(class-head, representation-head) normalised image features, each [B, D], from one tower pass."""
    config = self.clip_config
    features, out = clip.image_tower(clip_params, images, config=config,
                                     edits=self.vision_edits(learner_params))
    # CLS stays at 0 and the representation tokens at 1..K: they are inserted right after CLS.
    tokens = out["tokens"][:, 1:1 + self.n_tokens]
    ln_post = LayerNorm(config.vision.ln_eps).apply({"params": clip_params["visual"]["ln_post"]}, tokens)
    pooled = jnp.mean(ln_post, axis=1)  # ln_post per token, then the mean (official code)
    return clip.normalize(features), clip.normalize(pooled @ learner_params["rep_proj"]["kernel"])

  def _regulariser(self, clip_params: Params, class_state: engine.ClassState, images: jax.Array,
                   image: jax.Array, text: jax.Array, labels: jax.Array | None,
                   frozen: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(λ(1 − mean cos(image, frozen image)) + λ(1 − mean cos(text, zero-shot text)), frozen image features).

    image [B, D] class-head features; text [..., C, D]; frozen [B, D] or None (computed here). Rows with
    label -1 (padding) are left out of the image mean.
    """
    if class_state.zeroshot_text_features is None:
      raise ValueError(f"{self.method}: training needs the frozen zero-shot text features for the text "
                       "regulariser: pass templates to prepare_classes (the dataset's hand-crafted template)")
    if frozen is None:
      frozen = self._frozen_image_features(clip_params, images)
    image_cos = jnp.sum(image * frozen, axis=-1)  # [B], both normalised
    if labels is None:
      image_term = jnp.mean(image_cos)
    else:
      valid = (jnp.asarray(labels) >= 0).astype(jnp.float32)
      image_term = jnp.sum(image_cos * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    text_term = jnp.mean(jnp.sum(text * class_state.zeroshot_text_features, axis=-1))
    return self.reg_weight * (1.0 - image_term) + self.reg_weight * (1.0 - text_term), frozen

  def decoupled_logits(self, class_logits: jax.Array, rep_logits: jax.Array,
                       is_train_class: jax.Array | None) -> jax.Array:
    """Test logits [..., C]: α·class + (1 − α)·rep on training classes, class-head logits elsewhere
    (is_train_class [C] bool; None: every class is a training class)."""
    fused = self.class_head_weight * class_logits + (1.0 - self.class_head_weight) * rep_logits
    if is_train_class is None:
      return fused
    return jnp.where(is_train_class, fused, class_logits)

  def _heads_output(self, clip_params: Params, class_state: engine.ClassState, images: jax.Array,
                    heads: tuple[jax.Array, jax.Array], text: jax.Array, *, train: bool,
                    labels: jax.Array | None, kl: jax.Array,
                    frozen: jax.Array | None = None) -> LearnerOutput:
    """The LearnerOutput of both heads against text features [C, D] (shared) or [S, B, C, D] (per sample
    and image). train: logits = class head, aux_logits = representation head, aux_loss = the regularisers;
    test: logits = `decoupled_logits`."""
    image, rep_image = heads
    per_image = text.ndim == 4
    class_logits = engine.logits(clip_params, image, text, per_image=per_image)
    rep_logits = engine.logits(clip_params, rep_image, text, per_image=per_image)
    if not per_image:
      class_logits, rep_logits = class_logits[None], rep_logits[None]
    aux_loss = None
    if train:
      logits = class_logits
      if self.reg_weight > 0:
        aux_loss, frozen = self._regulariser(clip_params, class_state, images, image, text, labels, frozen)
    else:
      is_train_class = class_state.learner_state.get("is_train_class")  # [C] bool
      logits = self.decoupled_logits(class_logits, rep_logits, is_train_class)
    return LearnerOutput(logits=logits, kl=kl, image_features=image, frozen_image_features=frozen,
                         aux_logits=rep_logits, aux_loss=aux_loss,
                         aux_weight=1.0 - float(self.class_head_weight))


@register
@dataclasses.dataclass(frozen=True)
class MMRL(RepresentationBackbone, PromptLearner):
  """MMRL. Params: {"rep_tokens": [K, d_r], "to_text": stacked Linear [H, d_r, W_t], "to_vision": stacked
  Linear [H, d_r, W_v], "rep_proj": {"kernel": [W_v, D]}}.

  Attributes (besides `RepresentationBackbone`'s):
    first_layer: J, the first prompted block (0-based); None: layers//2 - 1 (5 for ViT-B: 1-based layer 6).
    depth: H prompted blocks; None: to the last layer.
  Defaults are the paper recipe: K = 5, d_r = 512 (the text width) for ViT-B/16, layers 6..12, α = 0.7.

  Output (see `RepresentationBackbone._heads_output`): train=True: logits = class head [1, B, C],
  aux_logits = representation head, aux_weight = 1 − α, aux_loss = the λ regularisers; train=False:
  logits = the decoupled test logits.
  """

  method = "mmrl"
  first_layer: int | None = None
  depth: int | None = None

  def __post_init__(self):
    first, depth = prompted_layer_range(self.method, self.clip_config, self.first_layer, self.depth)
    object.__setattr__(self, "first_layer", first)
    object.__setattr__(self, "depth", depth)
    self._check_backbone()

  def _layout(self) -> engine.PromptLayout:
    return engine.PromptLayout(n_ctx=0, template=self.template)

  @property
  def prompted_layers(self) -> range:
    return range(self.first_layer, self.first_layer + self.depth)

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    return self._init_representation(rng, clip_params)

  def text_edits(self, learner_params: Params) -> dict:
    """Text schedule: R_t inserted after SOS at block J, replaced at the later prompted blocks."""
    text_tokens, _ = self.representation_tokens(learner_params)
    return insert_then_replace(self.prompted_layers, text_tokens, position=1)

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    text = engine.text_features(clip_params, self.clip_config, class_state.token_embeddings,
                                class_state.pool_index, edits=self.text_edits(learner_params))  # [C, D]
    heads = self.image_heads(learner_params, clip_params, images)
    return self._heads_output(clip_params, class_state, images, heads, text, train=train, labels=labels,
                              kl=self._zero())
