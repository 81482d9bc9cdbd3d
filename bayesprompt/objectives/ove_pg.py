"""OVE-PG objective (Kim, Ko, Park — arXiv 2504.14123) in the learner-independent loss slot.

Wraps `bayesprompt.bayes.ove.ove_pg_loss` (the pure loss on [n, C] logits) for a learner's LearnerOutput:
Monte Carlo samples of the learner (S > 1 for VPT / VaMP) are averaged, the frozen zero-shot CLIP logits
`teacher_logits` [B, C] feed the λ₁ teacher term, and a variational learner's KL is added with its recipe
weight. A second head (MMRL's representation head, `output.aux_logits`) gets the same loss with its own keys
and the same teacher, the two weighted (1 - w, w) by `output.aux_weight`; `output.aux_loss` (a learner's
already weighted extra terms) is added as is. Training batches carry no padding (the train pipeline drops the
remainder); padded rows (label -1) are rejected rather than silently mis-scored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bayesprompt.bayes import ove
from bayesprompt.objectives import ce

# One home for the option lists: the pure loss defines them.
MODES = ove.MODES
OMEGA_SOURCES = ove.OMEGA_SOURCES


@dataclasses.dataclass(frozen=True)
class OvePG:
  """Attributes (paper recipe defaults): alpha prior precision 1.0, teacher_weight λ₁ 0.2, num_samples M 1,
  omega_source "prior_mean", mode "corrected" (or "faithful": the official code's behaviour), kl_weight
  (None: the learner's recipe weight)."""

  alpha: float = 1.0
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
    if not self.alpha >= 0:
      raise ValueError(f"alpha (prior precision) must be >= 0, got {self.alpha}")
    if not self.teacher_weight >= 0:
      raise ValueError(f"teacher_weight (λ₁) must be >= 0, got {self.teacher_weight}")
    if int(self.num_samples) != self.num_samples or self.num_samples < 1:
      raise ValueError(f"num_samples (M) must be an integer >= 1, got {self.num_samples}")

  @property
  def needs_teacher(self) -> bool:
    return self.teacher_weight > 0 or self.mode == "faithful" or self.omega_source != "posterior_gibbs"

  def __call__(self, output, labels: jax.Array, rng: jax.Array, teacher_logits: jax.Array | None = None, *,
               default_sample_reduction: str = "mean_loss", default_kl_weight: float = 0.0):
    del default_sample_reduction  # OVE-PG averages its loss over the learner's samples
    logits = output.logits  # [S, B, C]
    keys = jax.random.split(rng, logits.shape[0])

    def one_sample(key, sample_logits):
      return ove.ove_pg_loss(key, sample_logits, teacher_logits, labels, alpha=self.alpha,
                             teacher_weight=self.teacher_weight, num_samples=self.num_samples,
                             omega_source=self.omega_source, mode=self.mode)

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
    accuracy = jnp.mean((jnp.argmax(jnp.mean(logits, axis=0), -1) == labels).astype(jnp.float32))
    metrics = {"loss": loss, "kl": output.kl, "train_accuracy": accuracy}
    metrics.update({k: jnp.mean(v) for k, v in aux.items() if jnp.ndim(v) <= 1})
    metrics.update(head_metrics)
    return loss, metrics
