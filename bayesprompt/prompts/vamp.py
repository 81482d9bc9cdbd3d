"""VaMP: variational multi-modal prompt learning (Cheng & Han, NeurIPS 2025, arXiv 2511.22664).

Deep prompts at the layers i = J .. J+H-1 of both towers (MMRL-style placement: inserted at layer J, then
replaced at every later prompted layer):

  text   per image and layer, M prompt tokens z_i sampled from an image-conditioned posterior:
           h_i = Φ_i(f_x)                          generator MLP of the frozen normalised image feature f_x
           (μ_i, log σ_i²) = posterior_i(h_i)      per-token MLP
           z_i = μ_i + σ_i ⊙ ε,  ε ~ N(0, I)       reparameterised, S samples vmapped
         inserted after SOS (the hand-crafted template "a photo of a {}." is the text input);
  vision shared deterministic prompts [H, M, W_v], appended after the patches at layer J and replaced later;
  prior  class-aware p(z_i | o_y) = N(μ̂_i, σ̂_i²) with (μ̂_i, log σ̂_i²) = ψ_i(o_y) from the class prototype
         o_y of the image's label (training); N(0, I) at test time.

`output.kl` = Σ_i mean_{tokens, dims} KL(q(z_i | x) ‖ p(z_i | o_y)), averaged over the batch (closed form
between diagonal Gaussians, no sample needed). Prediction averages the S softmaxes.

Per-image text prompts mean S x B x C text sequences. The first J text blocks see no prompt, so by default
they run once per class and only blocks J.. run per (sample, image, class) (`share_text_prefix`).

Defaults that the paper text available to us did not pin down and that follow MMRL (the deep-prompt
baseline VaMP builds on, REP_LAYERS 6..12, 5 tokens): J = layers//2 - 1 (block 5 of 12), H = to the last
layer, M = 5; generator / prior hidden width D/16 (CoCoOp's meta-net ratio), posterior hidden W_t/4;
log-variances start at 0 (σ = 1: the scale of the N(0, I) test prior, as BPL starts near log-variance 0).
Check these against the official code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from bayesprompt.clip import edits as edits_lib
from bayesprompt.prompts import engine
from bayesprompt.prompts.base import LearnerOutput, Params, PromptLearner, register, template_prepare_classes
from bayesprompt.prompts.mmrl import insert_then_replace, prompted_layer_range
from bayesprompt.prompts.vpt import require_rng


def _init_stacked_mlp(rng: jax.Array, depth: int, fan_in: int, hidden: int, fan_out: int,
                      log_var_bias: tuple[int, float] | None = None) -> Params:
  """Two-layer MLP per prompted layer, stacked [H, ...]; optionally the bias of the output columns
  [start:] set to a log-variance init value."""
  k1, k2 = jax.random.split(rng)
  mlp = {"linear1": engine.torch_linear_init(k1, fan_in, hidden, (depth,)),
         "linear2": engine.torch_linear_init(k2, hidden, fan_out, (depth,))}
  if log_var_bias is not None:
    start, value = log_var_bias
    mlp["linear2"]["bias"] = mlp["linear2"]["bias"].at[..., start:].set(value)
  return mlp


def _stacked_mlp(mlp: Params, x: jax.Array) -> jax.Array:
  """x [H, ..., in] -> [H, ..., out] with a ReLU between the two per-layer linears."""
  return engine.stacked_dense(mlp["linear2"], jax.nn.relu(engine.stacked_dense(mlp["linear1"], x)))


@register
@dataclasses.dataclass(frozen=True)
class VaMP(PromptLearner):
  """VaMP. Params: {"generator": MLP D -> M·W_t, "posterior": MLP W_t -> 2·W_t (per token),
  "prior": MLP D -> 2·M·W_t (with class_aware_prior), "vision_prompts": [H, M, W_v]}, every MLP stacked
  over the H prompted layers.

  Attributes:
    n_tokens: M prompt tokens per layer and tower.
    first_layer: J, the first prompted block (0-based); None: layers//2 - 1.
    depth: H prompted layers; None: to the last layer.
    template: the hand-crafted text input when `prepare_classes` gets no templates.
    generator_hidden / prior_hidden / posterior_hidden: MLP hidden widths (None: D/16, D/16, W_t/4).
    init_log_var: initial log-variance of posterior and prior (bias of their log-variance outputs).
    num_train_samples / num_test_samples: S in training / at test time (paper: 10 at test).
    class_aware_prior: prior from class prototypes in training (else N(0, I) throughout).
    share_text_prefix: run text blocks < J once per class (exact; saves compute).
    kl_weight: the recipe's weight of the KL (Σ_i [CE + KL]: 1.0).
  """

  method = "vamp"
  n_tokens: int = 5
  first_layer: int | None = None
  depth: int | None = None
  template: str = "a photo of a {}."
  generator_hidden: int | None = None
  prior_hidden: int | None = None
  posterior_hidden: int | None = None
  init_log_var: float = 0.0
  num_train_samples: int = 1
  num_test_samples: int = 10
  class_aware_prior: bool = True
  share_text_prefix: bool = True
  needs_class_prototypes: ClassVar[bool] = True
  kl_weight: float = 1.0

  def __post_init__(self):
    first, depth = prompted_layer_range(self.method, self.clip_config, self.first_layer, self.depth)
    object.__setattr__(self, "first_layer", first)
    object.__setattr__(self, "depth", depth)
    for name in ("n_tokens", "num_train_samples", "num_test_samples"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{self.method}: {name} must be an int >= 1, got {value!r}")
    engine.as_templates(self.template)

  def _layout(self) -> engine.PromptLayout:
    return engine.PromptLayout(n_ctx=0, template=self.template)

  # The text input is the first template given to prepare_classes (else `self.template`).
  prepare_classes = template_prepare_classes

  @property
  def touches_image_tower(self) -> bool:
    return True

  def num_samples(self, train: bool) -> int:
    return self.num_train_samples if train else self.num_test_samples

  @property
  def prompted_layers(self) -> range:
    return range(self.first_layer, self.first_layer + self.depth)

  def _widths(self):
    config = self.clip_config
    embed, t_width = config.embed_dim, config.text.width
    return (embed, t_width, config.vision.width, self.generator_hidden or max(embed // 16, 1),
            self.prior_hidden or max(embed // 16, 1), self.posterior_hidden or max(t_width // 4, 1))

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    embed, t_width, v_width, gen_hidden, prior_hidden, post_hidden = self._widths()
    k_gen, k_post, k_prior, k_vis = jax.random.split(rng, 4)
    m, h = self.n_tokens, self.depth
    params = {
        "generator": _init_stacked_mlp(k_gen, h, embed, gen_hidden, m * t_width),
        "posterior": _init_stacked_mlp(k_post, h, t_width, post_hidden, 2 * t_width,
                                       log_var_bias=(t_width, self.init_log_var)),
        "vision_prompts": 0.02 * jax.random.normal(k_vis, (h, m, v_width), jnp.float32),
    }
    if self.class_aware_prior:
      params["prior"] = _init_stacked_mlp(k_prior, h, embed, prior_hidden, 2 * m * t_width,
                                          log_var_bias=None)
      # The prior's log-variance columns are interleaved per token below ([M, 2·W_t]): set them per token.
      bias = params["prior"]["linear2"]["bias"].reshape(h, m, 2 * t_width)
      params["prior"]["linear2"]["bias"] = bias.at[..., t_width:].set(self.init_log_var).reshape(h, -1)
    return params

  def posterior(self, learner_params: Params, image_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, log_var) of q(z_i | x), each [H, B, M, W_t], from normalised frozen image features [B, D]."""
    t_width = self.clip_config.text.width
    h = jnp.broadcast_to(image_features, (self.depth, *image_features.shape))
    tokens = _stacked_mlp(learner_params["generator"], h).reshape(self.depth, -1, self.n_tokens, t_width)
    out = _stacked_mlp(learner_params["posterior"], tokens)  # [H, B, M, 2 W_t]
    return out[..., :t_width], out[..., t_width:]

  def prior(self, learner_params: Params, prototypes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, log_var) of the class-aware prior p(z_i | o_y), each [H, B, M, W_t], from prototypes [B, D]."""
    t_width = self.clip_config.text.width
    o = jnp.broadcast_to(prototypes, (self.depth, *prototypes.shape))
    out = _stacked_mlp(learner_params["prior"], o).reshape(self.depth, -1, self.n_tokens, 2 * t_width)
    return out[..., :t_width], out[..., t_width:]

  def vision_edits(self, learner_params: Params) -> dict:
    """Shared vision prompts: appended after the patches at layer J, replacing the last M tokens later."""
    prompts, m = learner_params["vision_prompts"], self.n_tokens
    schedule = {}
    for h, layer in enumerate(self.prompted_layers):
      edit = edits_lib.insert(prompts[h]) if h == 0 else edits_lib.replace(prompts[h], position=-m)
      schedule[layer] = [edit]
    return schedule

  def text_edits(self, z: jax.Array) -> dict:
    """Text schedule from per-sequence prompts z [H, M_seq, M, W_t]: inserted after SOS at layer J, then
    replaced in place at the later prompted layers."""
    return insert_then_replace(self.prompted_layers, z, position=1)

  def learner_class_state(self, clip_params: Params, classnames: Sequence[str],
                          **inputs: Any) -> dict[str, jax.Array]:
    """Adds "class_prototypes" [C, D] float32 (the class-aware prior's condition) when given."""
    state = super().learner_class_state(clip_params, classnames, **inputs)
    if inputs["class_prototypes"] is None:
      return state
    prototypes = jnp.asarray(inputs["class_prototypes"], jnp.float32)
    expected = (len(engine.clean_classnames(classnames)), self.clip_config.embed_dim)
    if prototypes.shape != expected:
      raise ValueError(f"class_prototypes must be [{expected[0]}, {expected[1]}] (classes x embed_dim), "
                       f"got shape {tuple(prototypes.shape)}")
    return {**state, "class_prototypes": prototypes}

  def _check_inputs(self, class_state, images, rng, train, labels) -> None:
    require_rng(self.method, rng)
    if train and self.class_aware_prior:
      if labels is None or "class_prototypes" not in class_state.learner_state:
        raise ValueError(f"{self.method}: training with the class-aware prior needs labels [B] and class "
                         "prototypes (prepare_classes(..., class_prototypes=[C, D] mean frozen image "
                         "features per class)); set class_aware_prior=False for an N(0, I) prior")
      if jnp.shape(labels) != images.shape[:1]:
        raise ValueError(f"{self.method}: labels must be [{images.shape[0]}] (one per image), "
                         f"got shape {jnp.shape(labels)}")

  def _kl(self, learner_params, class_state, mean, log_var, train, labels):
    if train and self.class_aware_prior:
      prototypes = class_state.learner_state["class_prototypes"]  # [C, D]
      prior_mean, prior_log_var = self.prior(learner_params, prototypes[jnp.asarray(labels)])
      kl = engine.gaussian_kl(mean, log_var, prior_mean, prior_log_var)
    else:
      kl = engine.gaussian_kl(mean, log_var)
    # Σ over layers of the mean over tokens and dims, mean over the batch.
    return jnp.sum(jnp.mean(kl, axis=(2, 3)), axis=0).mean()

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    self._check_inputs(class_state, images, rng, train, labels)
    frozen = self._frozen_image_features(clip_params, images)  # [B, D], the condition f_x
    image = engine.image_features(clip_params, self.clip_config, images,
                                  edits=self.vision_edits(learner_params))
    mean, log_var = self.posterior(learner_params, frozen)  # [H, B, M, W_t]
    z = self.sample_prompts(rng, mean, log_var, train)  # [S, H, B, M, W_t]
    text = self.sampled_text_features(clip_params, class_state, z)  # [S, B, C, D]
    logits = engine.logits(clip_params, image, text, per_image=True)  # [S, B, C]
    kl = self._kl(learner_params, class_state, mean, log_var, train, labels)
    return LearnerOutput(logits=logits, kl=kl, image_features=image, frozen_image_features=frozen)

  def sample_prompts(self, rng: jax.Array, mean: jax.Array, log_var: jax.Array, train: bool) -> jax.Array:
    """z = mean + σ ⊙ ε, [S, H, B, M, W_t] (S = num_samples(train)), from the posterior [H, B, M, W_t]."""
    eps = jax.random.normal(rng, (self.num_samples(train), *mean.shape), jnp.float32)
    return mean + jnp.exp(0.5 * log_var) * eps

  def sampled_text_features(self, clip_params: Params, class_state: engine.ClassState,
                            z: jax.Array, projection_inputs: bool = False) -> jax.Array | dict:
    """Normalised text features [S, B, C, D] of the class prompts with per-image prompts z [S, H, B, M, W_t]
    (the text schedule `text_edits`), S x B x C sequences in one tower call per sample.
    `projection_inputs`: {"embeddings" [S, B, C, D] unnormalised, "pre_projection" [S, B, C, d_t]} instead."""
    config = self.clip_config
    batch, num_classes = z.shape[2], class_state.num_classes
    seq_pool = jnp.broadcast_to(class_state.pool_index, (batch, num_classes)).reshape(-1)  # [B·C]
    if self.share_text_prefix:
      hidden = engine.text_hidden_states(clip_params, config, class_state.token_embeddings,
                                         class_state.pool_index, self.first_layer)  # [C, T, W_t], per class
    else:
      hidden = class_state.token_embeddings

    def sample_text_features(z_sample):  # [H, B, M, W_t] -> [B, C, D]
      tokens = jnp.repeat(z_sample, num_classes, axis=1)  # [H, B·C, M, W_t], image-major like the sequences
      sequences = jnp.broadcast_to(hidden, (batch, *hidden.shape)).reshape(-1, *hidden.shape[1:])
      if self.share_text_prefix:
        feats = engine.text_features_from_hidden(clip_params, config, sequences, seq_pool, self.first_layer,
                                                 self.text_edits(tokens), projection_inputs=projection_inputs)
      else:
        feats = engine.text_features(clip_params, config, sequences, seq_pool, self.text_edits(tokens),
                                     projection_inputs=projection_inputs)
      return jax.tree.map(lambda f: f.reshape(batch, num_classes, -1), feats)

    return jax.vmap(sample_text_features)(z)  # [S, B, C, D]
