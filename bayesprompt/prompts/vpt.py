"""Bayesian Prompt Learning / VPT (Derakhshani et al., ICCV 2023; saic-fi/Bayesian-Prompt-Learning).

A latent residual r ~ q = N(μ, diag exp(ℓ)) is added to every context token:
  conditioning="coop"    μ, ℓ free vectors [W_t] (official "coopvpt": μ = 0, ℓ ~ U(0, 1) at init);
                         the text tower runs on L x C prompts.
  conditioning="cocoop"  (μ, ℓ) = two MLPs Linear(D, D/2)-ELU-Linear(D/2, D/2)-ELU-Linear(D/2, W_t) on the
                         normalised image feature (official "cocoopvpt"); L x B x C prompts.
L reparameterised samples (vmapped), logits [L, B, C]. Training loss (the objective's job):
-log mean_l p(y | x, r_l) + 0.001·KL(q ‖ N(0, I)); test: log-mean-exp over the samples.

`output.kl` follows the official reduction: the elementwise KL averaged over the W_t latent dimensions
(and over the batch for the image-conditioned variant), so `kl_weight=0.001` reproduces the recipe.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from bayesprompt.prompts import engine
from bayesprompt.prompts.base import LearnerOutput, Params, register
from bayesprompt.prompts.coop import ContextLearner

CONDITIONINGS = ("coop", "cocoop")


def _init_inference_block(rng: jax.Array, fan_in: int, hidden: int, fan_out: int) -> Params:
  k1, k2, k3 = jax.random.split(rng, 3)
  return {"linear1": engine.torch_linear_init(k1, fan_in, hidden),
          "linear2": engine.torch_linear_init(k2, hidden, hidden),
          "linear3": engine.torch_linear_init(k3, hidden, fan_out)}


def _inference_block(block: Params, x: jax.Array) -> jax.Array:
  x = jax.nn.elu(engine.dense(block["linear1"], x))
  x = jax.nn.elu(engine.dense(block["linear2"], x))
  return engine.dense(block["linear3"], x)


def require_rng(method: str, rng) -> jax.Array:
  if rng is None:
    raise ValueError(f"{method} samples its prompts: pass a PRNG key as rng")
  return rng


@register
@dataclasses.dataclass(frozen=True)
class VPT(ContextLearner):
  """BPL / VPT. Params: {"ctx": [n, W_t], "posterior": {"mean": [W_t], "log_var": [W_t]}} (coop) or
  {"ctx", "meta_net": {"mean": MLP, "log_var": MLP}} (cocoop).

  Attributes (besides ContextLearner's):
    conditioning: "coop" (free posterior) or "cocoop" (posterior from an MLP on the image feature).
    num_train_samples: the paper's L, samples per step in training (hparam key `num_mc_samples` before the
      rename, the name VaMP never used: still accepted, with a FutureWarning).
    num_test_samples: samples at test time; None: L (as the official code).
    kl_weight: the recipe's 0.001.
  Defaults (official vit_b16_c4_ep10_batch1_ctxv1): n_ctx=4 from "a photo of a", L=10, coop.
  """

  method = "vpt"
  ctx_init: str | None = "a photo of a"
  conditioning: str = "coop"
  num_train_samples: int = 10
  num_test_samples: int | None = None
  renamed_hparams: ClassVar[dict[str, str]] = {"num_mc_samples": "num_train_samples"}
  # Bayesian Prompt Learning's loss is the predictive likelihood −log mean_l p(y|x, r_l).
  sample_reduction: ClassVar[str] = "log_mean_prob"
  kl_weight: float = 0.001
  _default_n_ctx = 4

  def __post_init__(self):
    super().__post_init__()
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"vpt: unknown conditioning {self.conditioning!r}; expected one of {CONDITIONINGS}")
    for name in ("num_train_samples", "num_test_samples"):
      value = getattr(self, name)
      if value is None and name == "num_test_samples":
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"vpt: {name} must be an int >= 1, got {value!r}")

  @property
  def official_ove_pg_trainer(self) -> str:  # BP_CLIP's VPT_OVE_PG ("coopvpt") / VPT_CoCoOp_OVE_PG
    return "VPT_OVE_PG" if self.conditioning == "coop" else "VPT_CoCoOp_OVE_PG"

  def num_samples(self, train: bool) -> int:
    if train or self.num_test_samples is None:
      return self.num_train_samples
    return self.num_test_samples

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    k_ctx, k_mean, k_var = jax.random.split(rng, 3)
    width, embed = self.clip_config.text.width, self.clip_config.embed_dim
    params = {"ctx": self._init_ctx(k_ctx, clip_params)}
    if self.conditioning == "coop":
      params["posterior"] = {"mean": jnp.zeros((width,), jnp.float32),
                             "log_var": jax.random.uniform(k_var, (width,), jnp.float32)}
    else:
      hidden = max(embed // 2, 1)
      params["meta_net"] = {"mean": _init_inference_block(k_mean, embed, hidden, width),
                            "log_var": _init_inference_block(k_var, embed, hidden, width)}
    return params

  def posterior(self, learner_params: Params, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, log_var) of q(r): [W_t] each (coop) or [B, W_t] each (cocoop)."""
    if self.conditioning == "coop":
      return learner_params["posterior"]["mean"], learner_params["posterior"]["log_var"]
    meta = learner_params["meta_net"]
    return _inference_block(meta["mean"], image), _inference_block(meta["log_var"], image)

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    require_rng(self.method, rng)
    config = self.clip_config
    num_samples = self.num_samples(train)
    image = self._frozen_image_features(clip_params, images)  # [B, D]
    mean, log_var = self.posterior(learner_params, image)
    eps = jax.random.normal(rng, (num_samples, *mean.shape), jnp.float32)
    residual = mean + jnp.exp(0.5 * log_var) * eps  # [L, W] or [L, B, W]
    ctx = learner_params["ctx"] + residual[..., None, :]  # [L, n, W] or [L, B, n, W]

    def sample_text_features(ctx_sample):
      prompts = engine.build_prompts(class_state, ctx_sample)  # [C, T, W] or [B, C, T, W]
      return engine.text_features(clip_params, config, prompts, class_state.pool_index)

    text = jax.vmap(sample_text_features)(ctx)  # [L, C, D] or [L, B, C, D]
    logits = engine.logits(clip_params, image, text, per_image=self.conditioning == "cocoop")
    kl = jnp.mean(engine.gaussian_kl(mean, log_var))
    return LearnerOutput(logits=logits, kl=kl, image_features=image, frozen_image_features=image)
