"""OVE-PG objective (Kim, Ko, Park — arXiv 2504.14123) in the learner-independent loss slot.

Wraps `bayesprompt.bayes.ove.ove_pg_loss` (the pure loss on [n, C] logits) for a learner's LearnerOutput:
Monte Carlo samples of the learner (S > 1 for VPT / VaMP) are averaged, the frozen zero-shot CLIP logits
`teacher_logits` [B, C] feed the λ₁ teacher term, and a variational learner's KL is added with its recipe
weight. A second head (MMRL's representation head, `output.aux_logits`) gets the same loss with its own keys
and the same teacher, the two weighted (1 - w, w) by `output.aux_weight`; `output.aux_loss` (a learner's
already weighted extra terms) is added as is. Padded rows (label -1) are masked out of every mean, as in CE:
under jit a batch with padded rows at its end gives the loss and gradient of the batch without them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from bayesprompt.bayes import ove
from bayesprompt.objectives import ce

# One home for the option lists: the pure loss defines them.
MODES = ove.MODES
OMEGA_SOURCES = ove.OMEGA_SOURCES
# BP_CLIP's OVE-PG trainers, by how their faithful loss is computed (`PromptLearner.official_ove_pg_trainer`).
TILED_KAPPA_TRAINERS = ("CoOp_OVE_PG", "CoCoOp_OVE_PG", "MaPLe_OVE_PG", "APEX_OVE_PG")
LOGSUMEXP_TRAINERS = ("VPT_OVE_PG", "VPT_CoCoOp_OVE_PG")


def official_vpt_ove_pg_loss(rng: jax.Array, logits: jax.Array, teacher_logits: jax.Array,
                             labels: jax.Array, *, prior_precision: float, teacher_weight: float,
                             num_samples: int, row_mask: jax.Array) -> tuple[jax.Array, dict]:
  """The OVE-PG loss of BP_CLIP's VPT_OVE_PG and VPT_CoCoOp_OVE_PG trainers (mode="faithful" for VPT).

  Unlike the CoOp/CoCoOp/MaPLe/APEX trainers these broadcast κ correctly (`kappa_c.unsqueeze(-1).expand`:
  κ = +½ on every true-class pair) and combine the L prompt samples by logsumexp of the per-example OVE
  log-likelihood, not by averaging losses. ω is the official "PG mean" of the frozen OVE logits (as in every
  BP_CLIP trainer). For each of the M draws m (the trainer's Gibbs-sample loop):
    ψ'_{l,i,h} = (α·ψ_{l,i,h} + ½)/(ω_{i,h} + α) + ε_{m,l,i,h}/√(ω_{i,h} + α),
    nll_m = −mean_i [logsumexp_l Σ_h log σ(ψ'_{l,i,h}) − log L];
  loss = mean_m nll_m + λ₁·mean_{l,i,c}(f_{l,i,c} − f⁰_{i,c})².

  Args:
    rng: key; ε[m] = normal(split(rng, M)[m], [L, n, C−1]) (pairs h in increasing class order, c ≠ y_i).
    logits: [L, n, C] the learner's samples; teacher_logits [n, C] frozen zero-shot logits; labels [n] int.
    prior_precision, teacher_weight: α and λ₁ (static floats). num_samples: M.
    row_mask: [n] bool; padded rows are left out of the means over i.

  Returns:
    (loss, {"nll", "teacher_reg", "omega_mean", "ove_nll"}), scalars. Memory O(M·L·n·C): plain autodiff (the
    official trainer holds L·n·C·(C−1) floats).
  """
  num_mc, n, num_classes = logits.shape
  safe_labels = jnp.where(row_mask, labels, 0)
  psi = jax.vmap(lambda f: ove.one_vs_each_differences(f, safe_labels))(logits)  # [L, n, C−1]
  psi0 = jax.lax.stop_gradient(ove.one_vs_each_differences(teacher_logits, safe_labels))
  omega = jax.lax.stop_gradient(ove.official_pg_mean(psi0))  # [n, C−1]
  precision = omega + prior_precision
  mean = (prior_precision * psi + 0.5) / precision
  eps = jax.vmap(lambda key: jax.random.normal(key, psi.shape, psi.dtype))(jax.random.split(rng, num_samples))
  sample = mean + eps * jax.lax.rsqrt(precision)  # [M, L, n, C−1]
  log_lik = jnp.sum(jax.nn.log_sigmoid(sample), axis=-1)  # [M, L, n]
  score = jax.nn.logsumexp(log_lik, axis=1) - jnp.log(num_mc)  # [M, n]
  nll = -jnp.mean(jax.vmap(lambda s: ce.masked_mean(s, row_mask))(score))
  teacher_reg = ce.masked_mean(jnp.mean(jnp.square(logits - teacher_logits), axis=(0, 2)), row_mask)
  plain_log_lik = jnp.sum(jax.nn.log_sigmoid(jax.lax.stop_gradient(psi)), -1)  # [L, n]
  ove_nll = -ce.masked_mean(jnp.mean(plain_log_lik, 0), row_mask)
  omega_mean = ce.masked_mean(jnp.mean(omega, axis=-1), row_mask)
  loss = nll + teacher_weight * teacher_reg
  return loss, {"nll": nll, "teacher_reg": teacher_reg, "omega_mean": omega_mean, "ove_nll": ove_nll}


@dataclasses.dataclass(frozen=True)
class OvePG:
  """Attributes (paper recipe defaults): prior_precision α 1.0, teacher_weight λ₁ 0.2, num_samples M 1,
  omega_source "prior_mean", mode "corrected" (or "faithful"), kl_weight (None: the learner's recipe weight).
  `renamed_hparams`: the old key `alpha` still sets prior_precision, with a FutureWarning.

  mode="faithful" reproduces the official OVE-PG trainer *of the learner in use* (`official_trainer`, passed
  by the train step from `learner.official_ove_pg_trainer`):
    CoOp_OVE_PG, CoCoOp_OVE_PG, MaPLe_OVE_PG, APEX_OVE_PG: `ove.ove_pg_loss(mode="faithful")` (mis-tiled κ,
      the official ω) on each learner sample, averaged (these learners have one sample);
    VPT_OVE_PG, VPT_CoCoOp_OVE_PG: `official_vpt_ove_pg_loss` (κ = +½, the official ω, logsumexp over the L
      samples);
    None (MPL, VaMP, MMRL, VaMP-MMRL: BP_CLIP has no OVE-PG trainer for them): refused with a ValueError.
  """

  prior_precision: float = 1.0
  renamed_hparams: ClassVar[dict[str, str]] = {"alpha": "prior_precision"}
  teacher_weight: float = 0.2
  num_samples: int = 1
  omega_source: str = "prior_mean"
  mode: str = "corrected"
  kl_weight: float | None = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown OVE-PG mode {self.mode!r}; expected one of {MODES}")
    if self.omega_source not in OMEGA_SOURCES:
      raise ValueError(f"unknown omega_source {self.omega_source!r}; expected one of {OMEGA_SOURCES}")
    if not self.prior_precision >= 0:
      raise ValueError(f"prior_precision (α) must be >= 0, got {self.prior_precision}")
    if not self.teacher_weight >= 0:
      raise ValueError(f"teacher_weight (λ₁) must be >= 0, got {self.teacher_weight}")
    if int(self.num_samples) != self.num_samples or self.num_samples < 1:
      raise ValueError(f"num_samples (M) must be an integer >= 1, got {self.num_samples}")

  @property
  def needs_teacher(self) -> bool:
    return self.teacher_weight > 0 or self.mode == "faithful" or self.omega_source != "posterior_gibbs"

  def __call__(self, output, labels: jax.Array, rng: jax.Array, teacher_logits: jax.Array | None = None, *,
               default_sample_reduction: str = "mean_loss", default_kl_weight: float = 0.0,
               official_trainer: str | None = None):
    del default_sample_reduction  # OVE-PG averages its loss over the learner's samples
    logits = output.logits  # [S, B, C]
    keys = jax.random.split(rng, logits.shape[0])
    valid = labels >= 0  # -1 marks padding
    if self.mode == "faithful":
      if official_trainer not in TILED_KAPPA_TRAINERS + LOGSUMEXP_TRAINERS:
        raise ValueError(
            "OVE-PG mode='faithful' reproduces the official BP_CLIP trainer of the learner in use, and there "
            f"is none for this learner (official_trainer={official_trainer!r}; BP_CLIP has "
            f"{TILED_KAPPA_TRAINERS + LOGSUMEXP_TRAINERS}); use mode='corrected'")
      if official_trainer in LOGSUMEXP_TRAINERS:
        if getattr(output, "aux_logits", None) is not None:
          raise ValueError(f"{official_trainer} has no second head; got output.aux_logits")
        loss, aux = official_vpt_ove_pg_loss(rng, logits, teacher_logits, labels,
                                             prior_precision=self.prior_precision,
                                             teacher_weight=self.teacher_weight, num_samples=self.num_samples,
                                             row_mask=valid)
        kl_weight = default_kl_weight if self.kl_weight is None else self.kl_weight
        loss = ce.add_aux_loss(loss + kl_weight * output.kl, output, aux)
        accuracy = ce.masked_mean((jnp.argmax(jnp.mean(logits, 0), -1) == labels).astype(jnp.float32), valid)
        return loss, {**aux, "loss": loss, "kl": output.kl, "train_accuracy": accuracy}

    def one_sample(key, sample_logits):
      return ove.ove_pg_loss(key, sample_logits, teacher_logits, labels,
                             prior_precision=self.prior_precision,
                             teacher_weight=self.teacher_weight, num_samples=self.num_samples,
                             omega_source=self.omega_source, mode=self.mode, row_mask=valid)

    losses, aux = jax.vmap(one_sample)(keys, logits)
    likelihood, head_metrics = jnp.mean(losses), {}
    if getattr(output, "aux_logits", None) is not None:
      # The second head gets the same OVE-PG loss (its own keys, the same teacher), weighted by aux_weight.
      aux_keys = jax.random.split(jax.random.fold_in(rng, 1), output.aux_logits.shape[0])
      aux_losses, _ = jax.vmap(one_sample)(aux_keys, output.aux_logits)
      likelihood = ce.combine_heads(likelihood, jnp.mean(aux_losses), output.aux_weight, head_metrics,
                                    "ove_pg")
    kl_weight = default_kl_weight if self.kl_weight is None else self.kl_weight
    loss = ce.add_aux_loss(likelihood + kl_weight * output.kl, output, head_metrics)
    accuracy = ce.masked_mean((jnp.argmax(jnp.mean(logits, axis=0), -1) == labels).astype(jnp.float32), valid)
    metrics = {"loss": loss, "kl": output.kl, "train_accuracy": accuracy}
    metrics.update({k: jnp.mean(v) for k, v in aux.items() if jnp.ndim(v) <= 1})
    metrics.update(head_metrics)
    return loss, metrics
