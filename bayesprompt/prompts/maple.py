"""Deep multi-modal prompts: MaPLe (Khattak et al., CVPR 2023) and MPL (Huang et al., arXiv 2502.14125).

Both learn a text context (n tokens after SOS) and deep text prompts for text layers 1..J-1 that
*replace* the previous layer's prompt outputs (positions 1..n). The vision side is coupled to the text
side by linear maps W_t -> W_v:

  MaPLe  layer 0: proj(ctx) appended after the patches (before ln_pre, as the official code does);
         layers 1..J-1: the last n vision tokens are *replaced* by deep_proj_i(deep_text_i).
  MPL    layer 0: as MaPLe; layers 1..J-1: *drop* the last n_rm vision prompt outputs, *carry* the rest,
         and append n_add·n new tokens (n_add separate Linear(W_t, W_v) of that layer's text prompt), so
         the vision prompt count grows n, n + (n_add·n - n_rm), ... up to layer J-1 and is carried to the
         end of the tower (1 -> J with the recipe n=1, n_add=2, n_rm=1).

Initialisation follows the official code: deep text prompts N(0, 0.02²); the coupling layers use PyTorch's
default Linear init, and the deep ones are copies of one initial layer (`_get_clones`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import bayesprompt.clip as clip
from bayesprompt.clip import edits as edits_lib
from bayesprompt.prompts import engine
from bayesprompt.prompts.base import LearnerOutput, Params, register
from bayesprompt.prompts.coop import ContextLearner


def _check_depth(method: str, depth, config: clip.CLIPConfig, vision: bool) -> None:
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
    raise ValueError(f"{method}: prompt depth must be an int >= 1, got {depth!r}")
  towers = [("text", config.text.layers)] + ([("vision", config.vision.layers)] if vision else [])
  for name, layers in towers:
    if depth > layers:
      raise ValueError(f"{method}: prompt depth {depth} exceeds the {name} tower's {layers} layers "
                       f"(deep prompts go to layers 0..depth-1); use depth <= {layers}")


@register
@dataclasses.dataclass(frozen=True)
class MaPLe(ContextLearner):
  """MaPLe. Params: {"ctx": [n, W_t], "deep_text": [J-1, n, W_t], "proj": Linear(W_t, W_v),
  "deep_proj": stacked Linear [J-1, W_t, W_v]} (deep_* only when J > 1; proj* only with coupling).

  Attributes (besides ContextLearner's):
    depth: J, prompts at layers 0..J-1 of both towers (1 <= J <= layers); None: the recipe's 9 of 12 layers
      scaled to the tower, round(0.75·layers) (9 for ViT-B, 3 for the 4-layer sandbox model).
    coupling: True: vision prompts coupled to the text prompts (MaPLe); False: text-side deep prompts only
      (the vision tower is untouched — with depth 1 this is shallow text prompting, i.e. CoOp).
  Defaults (paper): n_ctx=2 from "a photo of a" (the phrase's other tokens stay fixed text), J=9 (of 12).
  """

  method = "maple"
  official_ove_pg_trainer = "MaPLe_OVE_PG"
  ctx_init: str | None = "a photo of a"
  depth: int | None = None
  coupling: bool = True
  _default_n_ctx = 2
  _default_phrase_n_ctx = 2

  def __post_init__(self):
    super().__post_init__()
    if self.depth is None:
      layers = min(self.clip_config.text.layers, self.clip_config.vision.layers)
      object.__setattr__(self, "depth", max(1, round(0.75 * layers)))
    if self.class_token_position != "end":
      raise ValueError(f"{self.method}: deep text prompts replace the tokens after SOS; "
                       f"class_token_position must be 'end', got {self.class_token_position!r}")
    _check_depth(self.method, self.depth, self.clip_config, vision=self._vision_prompted)

  @property
  def _vision_prompted(self) -> bool:
    return self.coupling

  @property
  def touches_image_tower(self) -> bool:
    return self._vision_prompted

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    k_ctx, k_deep, k_proj, k_deep_proj = jax.random.split(rng, 4)
    t_width, v_width = self.clip_config.text.width, self.clip_config.vision.width
    n, deep = self.n_ctx, self.depth - 1
    params = {"ctx": self._init_ctx(k_ctx, clip_params)}
    if deep:
      params["deep_text"] = 0.02 * jax.random.normal(k_deep, (deep, n, t_width), jnp.float32)
    if self._vision_prompted:
      params["proj"] = engine.torch_linear_init(k_proj, t_width, v_width)
      if deep:
        params["deep_proj"] = self._init_deep_proj(k_deep_proj, t_width, v_width)
    return params

  def _init_deep_proj(self, rng, t_width, v_width):
    return engine.clone_linear(rng, t_width, v_width, (self.depth - 1,))

  def text_edits(self, learner_params: Params) -> dict:
    """Text schedule: layers 1..J-1 replace positions 1..n with that layer's deep prompt."""
    deep = learner_params.get("deep_text")
    return {i: [edits_lib.replace(deep[i - 1], position=1)] for i in range(1, self.depth)}

  def _deep_vision_tokens(self, learner_params: Params) -> jax.Array:
    """[J-1, n, W_v] the coupled deep vision prompts."""
    return engine.stacked_dense(learner_params["deep_proj"], learner_params["deep_text"])

  def vision_edits(self, learner_params: Params) -> dict:
    """Vision schedule: proj(ctx) appended before ln_pre; layers 1..J-1 replace the last n tokens."""
    n = self.n_ctx
    schedule = {-1: [edits_lib.insert(engine.dense(learner_params["proj"], learner_params["ctx"]))]}
    if self.depth > 1:
      deep = self._deep_vision_tokens(learner_params)
      schedule.update({i: [edits_lib.replace(deep[i - 1], position=-n)] for i in range(1, self.depth)})
    return schedule

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    config = self.clip_config
    prompts = engine.build_prompts(class_state, learner_params["ctx"])  # [C, T, W_t]
    text = engine.text_features(clip_params, config, prompts, class_state.pool_index,
                                edits=self.text_edits(learner_params))
    if self._vision_prompted:
      image = engine.image_features(clip_params, config, images, edits=self.vision_edits(learner_params))
      frozen = None
    else:
      image = frozen = self._frozen_image_features(clip_params, images)
    logits = engine.logits(clip_params, image, text, per_image=False)[None]
    return LearnerOutput(logits=logits, kl=self._zero(), image_features=image, frozen_image_features=frozen)


@register
@dataclasses.dataclass(frozen=True)
class MPL(MaPLe):
  """Modular Prompt Learning. Params as MaPLe's, with "deep_proj" stacked [n_add, J-1, W_t, W_v].

  Attributes (besides MaPLe's; `coupling` must stay True):
    n_add: coupling layers per deep layer; each maps the layer's n text prompts to n vision tokens.
    n_rm: vision prompt outputs dropped (from the end) before each deep layer's new tokens are appended.
    fixed_text: fixed words between the context and the class name.
  Defaults (official config vit_b4_c1_add2_rm1): n_ctx=1, J=9, n_add=2, n_rm=1, prompt
  "[ctx] a photo of a {class}.". The official code initialises the context from the word embedding of
  "X" (pass ctx_init="x" with the CLIP BPE tokenizer); the default here is N(0, 0.02²), which works with
  any vocabulary.
  """

  method = "mpl"
  official_ove_pg_trainer = None  # BP_CLIP has no MPL trainer
  ctx_init: str | None = None
  fixed_text: str = "a photo of a"
  n_add: int = 2
  n_rm: int = 1
  _default_n_ctx = 1
  _default_phrase_n_ctx = 1

  def __post_init__(self):
    if not self.coupling:
      raise ValueError("mpl: the vision prompts are the method; coupling must be True "
                       "(use maple for text-only)")
    super().__post_init__()
    for name in ("n_add", "n_rm"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_add" else 0):
        raise ValueError(f"mpl: {name} must be an int >= {1 if name == 'n_add' else 0}, got {value!r}")
    added = self.n_add * self.n_ctx
    if not self.n_rm < added + 1:
      raise ValueError(f"mpl: n_rm={self.n_rm} removed vision prompts must be fewer than n_add*n_ctx + 1 = "
                       f"{added + 1} (n_add={self.n_add} added per context token, n_ctx={self.n_ctx}); the "
                       "prompt count would shrink layer after layer")
    if self.n_rm > self.n_ctx:
      raise ValueError(f"mpl: n_rm={self.n_rm} exceeds the n_ctx={self.n_ctx} vision prompts present at "
                       "layer 1; it would drop image tokens")

  def _layout(self) -> engine.PromptLayout:
    return engine.PromptLayout(n_ctx=self.n_ctx, ctx_init=self.ctx_init, fixed_text=self.fixed_text,
                               class_position=self.class_token_position)

  def _init_deep_proj(self, rng, t_width, v_width):
    return engine.clone_linear(rng, t_width, v_width, (self.n_add, self.depth - 1))

  def vision_prompt_counts(self) -> list[int]:
    """Vision prompt tokens entering each block 0..layers-1 (after that layer's edits)."""
    counts, current = [], self.n_ctx
    for layer in range(self.clip_config.vision.layers):
      if 1 <= layer < self.depth:
        current += self.n_add * self.n_ctx - self.n_rm
      counts.append(current)
    return counts

  def _deep_vision_tokens(self, learner_params: Params) -> jax.Array:
    """[J-1, n_add·n, W_v]: per layer, the n_add maps of its text prompt, map-major."""
    proj = learner_params["deep_proj"]
    new = jnp.einsum("jnt,ajtv->janv", learner_params["deep_text"], proj["kernel"])  # [J-1, n_add, n, W_v]
    new = new + jnp.swapaxes(proj["bias"], 0, 1)[:, :, None, :]
    return new.reshape(self.depth - 1, self.n_add * self.n_ctx, -1)

  def vision_edits(self, learner_params: Params) -> dict:
    """Vision schedule: proj(ctx) appended before ln_pre; layers 1..J-1 drop the last n_rm prompt outputs
    and append n_add·n new tokens; later layers carry whatever is there."""
    schedule = {-1: [edits_lib.insert(engine.dense(learner_params["proj"], learner_params["ctx"]))]}
    if self.depth > 1:
      new = self._deep_vision_tokens(learner_params)
      for i in range(1, self.depth):
        layer_edits = [edits_lib.drop(position=-self.n_rm, count=self.n_rm)] if self.n_rm else []
        layer_edits.append(edits_lib.insert(new[i - 1]))
        schedule[i] = layer_edits
    return schedule
