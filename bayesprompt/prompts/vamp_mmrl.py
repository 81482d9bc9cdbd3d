"""VaMP on MMRL: VaMP's variational, image-conditioned text prompts on MMRL's representation-token backbone.

VaMP (Cheng & Han, NeurIPS 2025, arXiv 2511.22664) reports its headline numbers on top of MMRL (Guo & Gu,
CVPR 2025). The composition (see `mmrl.py` and `vamp.py` for the two parts):

  vision  MMRL's deterministic representation tokens R_v^i = F_v^i(R), inserted after CLS at block J and
          replaced later (VaMP's "shared deterministic vision prompts" are these), and MMRL's two image heads
          (class token through the frozen projection; mean of the K representation tokens through the
          trainable projection);
  text    per image, sample and prompted layer, K tokens z_i = R_t^i + r_i with R_t^i = F_t^i(R) MMRL's
          deterministic text representation tokens and r_i ~ q(r_i | x) = N(μ_i(x), σ_i(x)²) VaMP's
          image-conditioned posterior (generator Φ_i on the frozen image feature, then the posterior MLP);
          inserted after SOS at block J, replaced later;
  prior   VaMP's class-aware prior p(r_i | o_y) = N(μ̂_i, σ̂_i²) = ψ_i(o_y) on the same residual in training,
          N(0, I) at test time;
  loss    MMRL's α·CE(class head) + (1 − α)·CE(rep head) + λ·(cosine regularisers) (the text regulariser
          averaged over samples and images) + kl_weight · Σ_i KL(q(r_i | x) ‖ p(r_i | o_y));
  test    S samples of r (10); per sample MMRL's decoupled logits (fused on training classes, class head
          elsewhere); the predictive is the mean of the S softmaxes.

Assumptions (the VaMP paper text available to us does not spell out the composition with MMRL):
  * the variational text tokens are a *residual* on MMRL's text representation tokens, not a replacement:
    the shared space R keeps coupling the two towers (MMRL's premise), the posterior mean starts near
    MMRL, and with σ -> 0 and μ = 0 the model is exactly MMRL (tested). KL is invariant to the common
    shift R_t^i, so prior and posterior are written on the residual r_i;
  * VaMP's own separate vision prompts are dropped: MMRL's R_v are the shared deterministic vision prompts;
  * MMRL's heads, regularisers and decoupled inference are kept unchanged, and the KL is added with VaMP's
    weight (1.0);
  * K = M = 5 tokens, layers J.. from MMRL; VaMP's MLP widths, initial log-variance (0) and sample counts.
"""

from __future__ import annotations

import dataclasses

import jax

from bayesprompt.prompts import engine
from bayesprompt.prompts.base import LearnerOutput, Params, register
from bayesprompt.prompts.mmrl import RepresentationBackbone
from bayesprompt.prompts.vamp import VaMP


@register
@dataclasses.dataclass(frozen=True)
class VaMPMMRL(RepresentationBackbone, VaMP):
  """VaMP on MMRL. Params: MMRL's {"rep_tokens", "to_text", "to_vision", "rep_proj"} and VaMP's
  {"generator", "posterior", "prior"} (VaMP's "vision_prompts" are not used).

  Attributes: MMRL's (`RepresentationBackbone`: n_tokens = K = M, rep_dim, class_head_weight (α),
  reg_weight, rep_proj_init,
  template) and VaMP's (first_layer, depth, MLP widths, init_log_var, num_train_samples / num_test_samples,
  class_aware_prior, share_text_prefix, kl_weight).

  Output: train=True: logits = class head [S, B, C], aux_logits = representation head [S, B, C],
  aux_weight = 1 − α, aux_loss = MMRL's regularisers, kl = VaMP's KL; train=False: logits = the decoupled
  test logits per sample.
  """

  method = "vamp_mmrl"

  def __post_init__(self):
    super().__post_init__()  # VaMP's: prompted layers, token and sample counts, template
    self._check_backbone()

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    k_vamp, k_rep = jax.random.split(rng)
    params = super().init(k_vamp, clip_params, class_state)
    del params["vision_prompts"]  # MMRL's representation tokens are the vision side
    return {**params, **self._init_representation(k_rep, clip_params)}

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    self._check_inputs(class_state, images, rng, train, labels)
    frozen = self._frozen_image_features(clip_params, images)  # [B, D]: VaMP's condition, MMRL's regulariser
    heads = self.image_heads(learner_params, clip_params, images)
    mean, log_var = self.posterior(learner_params, frozen)  # residual r: [H, B, K, W_t]
    text_tokens = self.representation_tokens(learner_params)[0][:, None]  # R_t [H, 1, K, W_t]
    z = text_tokens + self.sample_prompts(rng, mean, log_var, train)  # [S, H, B, K, W_t]
    text = self.sampled_text_features(clip_params, class_state, z)  # [S, B, C, D]
    kl = self._kl(learner_params, class_state, mean, log_var, train, labels)
    return self._heads_output(clip_params, class_state, images, heads, text, train=train, labels=labels,
                              kl=kl, frozen=frozen)
