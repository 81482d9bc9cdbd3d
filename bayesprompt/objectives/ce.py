"""Cross-entropy objective for prompt learners (the loss slot OVE-PG and ELBO terms also plug into).

An objective is a pure function `objective(output, labels, rng, teacher_logits) -> (loss, metrics)` where
`output` is a learner's LearnerOutput (logits [S, B, C] over S Monte Carlo samples, a raw KL term) and
`teacher_logits` [B, C] the frozen zero-shot CLIP logits (None unless `objective.needs_teacher`).
Padded rows (label -1) are masked out of every mean.

Learners with a second head (MMRL: `output.aux_logits`, weight `output.aux_weight`) and extra, already
weighted loss terms (`output.aux_loss`) go through `combine_heads` and `add_aux_loss`, which every objective
shares; without them an objective computes exactly what it computed before these fields existed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SAMPLE_REDUCTIONS = ("mean_loss", "log_mean_prob")


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` [B] over rows where `mask` [B] is True (0 if none)."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def per_example_nll(logits: jax.Array, labels: jax.Array, sample_reduction: str) -> jax.Array:
  """−log p(y|x) per example [B] from logits [S, B, C].

  sample_reduction:
    "mean_loss":     mean_s CE(logits_s)              (VaMP's ELBO: expected log-likelihood)
    "log_mean_prob": −log mean_s softmax(logits_s)_y  (Bayesian Prompt Learning's predictive likelihood)
  """
  if sample_reduction not in SAMPLE_REDUCTIONS:
    raise ValueError(f"unknown sample_reduction {sample_reduction!r}; expected one of {SAMPLE_REDUCTIONS}")
  safe_labels = jnp.maximum(labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [S, B, C]
  log_p_y = jnp.take_along_axis(log_probs, safe_labels[None, :, None], axis=-1)[..., 0]  # [S, B]
  if sample_reduction == "mean_loss":
    return -jnp.mean(log_p_y, axis=0)
  return -(jax.nn.logsumexp(log_p_y, axis=0) - jnp.log(log_p_y.shape[0]))


def combine_heads(main: jax.Array, aux: jax.Array, aux_weight: float, metrics: dict, name: str) -> jax.Array:
  """(1 - w)·main + w·aux: a likelihood term of the main head and of the second head (`aux_logits`).

  Args:
    main, aux: [] the objective's likelihood term on `output.logits` and on `output.aux_logits`.
    aux_weight: w in [0, 1], `output.aux_weight` (a static float).
    metrics: receives f"{name}_main" and f"{name}_aux".
    name: metric prefix.
  """
  weight = float(aux_weight)
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"aux_weight must be in [0, 1] (the weight of the second head), got {weight}")
  metrics.update({f"{name}_main": main, f"{name}_aux": aux})
  return (1.0 - weight) * main + weight * aux


def add_aux_loss(loss: jax.Array, output, metrics: dict) -> jax.Array:
  """loss + output.aux_loss (the learner's already weighted extra terms), recorded as metrics["aux_loss"]."""
  aux_loss = getattr(output, "aux_loss", None)
  if aux_loss is None:
    return loss
  metrics["aux_loss"] = aux_loss
  return loss + aux_loss


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """CE (+ kl_weight · KL for variational learners; a second head and extra terms, see `combine_heads`).

  Attributes:
    sample_reduction: how Monte Carlo samples combine (see `per_example_nll`); None = the learner's choice.
    kl_weight: weight of the learner's KL term; None = the learner's recipe weight.
  """

  sample_reduction: str | None = None
  kl_weight: float | None = None
  needs_teacher: bool = dataclasses.field(default=False, init=False)

  def __call__(self, output, labels: jax.Array, rng: jax.Array | None = None,
               teacher_logits: jax.Array | None = None, *, default_sample_reduction: str = "mean_loss",
               default_kl_weight: float = 0.0):
    del rng, teacher_logits
    reduction = self.sample_reduction or default_sample_reduction
    kl_weight = default_kl_weight if self.kl_weight is None else self.kl_weight
    valid = labels >= 0
    metrics = {}
    nll = masked_mean(per_example_nll(output.logits, labels, reduction), valid)
    if getattr(output, "aux_logits", None) is not None:
      aux_nll = masked_mean(per_example_nll(output.aux_logits, labels, reduction), valid)
      nll = combine_heads(nll, aux_nll, output.aux_weight, metrics, "nll")
    loss = add_aux_loss(nll + kl_weight * output.kl, output, metrics)
    correct = jnp.argmax(jnp.mean(output.logits, axis=0), -1) == labels
    accuracy = masked_mean(correct.astype(jnp.float32), valid)
    return loss, {"loss": loss, "nll": nll, "kl": output.kl, "train_accuracy": accuracy, **metrics}
