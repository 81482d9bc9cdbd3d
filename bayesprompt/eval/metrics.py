"""Classification metrics as pure jnp functions of (probabilities or logits, labels).

Shapes: probs / logits float [N, C], labels int [N] in [0, C). Every function is jit- and vmap-able (shape
checks are static; label values are not checked inside jit). Conventions, stated once:
  - accuracy: mean of argmax == label (ties: the first maximal class, as jnp.argmax).
  - ECE (Guo et al. 2017; BayesVLM): confidence = max_c p_c; 20 equal-width bins on [0, 1], bin b holding
    confidences in (b/B, (b+1)/B] (bin 0 also takes 0); ECE = sum_b (n_b / N) |acc_b - conf_b| (L1).
  - NLL: mean -log p_y (natural log). From logits via log-softmax (stable); from probabilities as given
    (a zero probability on the true class gives inf, honestly).
  - Brier: mean over examples of sum_c (p_c - onehot_c)^2 (the multi-class Brier score, in [0, 2]).
  - harmonic mean: 2ab / (a + b), 0 when a + b = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_NUM_BINS = 20


def _check(scores: jax.Array, labels: jax.Array, what: str) -> None:
  if scores.ndim != 2:
    raise ValueError(f"{what} must be [N, C], got shape {scores.shape}")
  if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
    raise ValueError(
      f"labels must be [N] with N = {scores.shape[0]} (from {what} {scores.shape}), got {labels.shape}"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  if scores.shape[0] == 0:
    raise ValueError(f"{what} is empty: metrics of zero examples are undefined")


def accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy in [0, 1] from probabilities or logits [N, C] (argmax is the same for both)."""
  scores, labels = jnp.asarray(scores), jnp.asarray(labels)
  _check(scores, labels, "scores")
  return jnp.mean(jnp.argmax(scores, axis=-1) == labels)


def harmonic_mean(a: jax.Array | float, b: jax.Array | float) -> jax.Array:
  """2ab / (a + b), the base-to-new summary; 0 where a + b == 0."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  total = a + b
  return jnp.where(total > 0, 2 * a * b / jnp.where(total > 0, total, 1.0), 0.0)


def nll_from_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of the labels under softmax(logits)."""
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check(logits, labels, "logits")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def nll(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of the labels under `probs` (rows summing to 1)."""
  probs, labels = jnp.asarray(probs), jnp.asarray(labels)
  _check(probs, labels, "probs")
  return -jnp.mean(jnp.log(jnp.take_along_axis(probs.astype(jnp.float32), labels[:, None], axis=-1)))


def brier(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over examples of sum_c (p_c - 1[c = y])^2."""
  probs, labels = jnp.asarray(probs), jnp.asarray(labels)
  _check(probs, labels, "probs")
  onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=jnp.float32)
  return jnp.mean(jnp.sum((probs.astype(jnp.float32) - onehot) ** 2, axis=-1))


def _bin_index(confidence: jax.Array, num_bins: int) -> jax.Array:
  # (b/B, (b+1)/B] -> b; ceil(conf·B) - 1, with 0 joining bin 0 and rounding kept inside [0, B).
  return jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)


def reliability_diagram(
  probs: jax.Array, labels: jax.Array, num_bins: int = DEFAULT_NUM_BINS
) -> dict[str, jax.Array]:
  """Per-bin statistics of a reliability diagram (and of ECE).

  Returns a dict of [num_bins] arrays: "count" (examples per bin), "confidence" (mean max-probability,
  0 for empty bins), "accuracy" (fraction correct, 0 for empty bins), and "edges" [num_bins + 1].
  """
  probs, labels = jnp.asarray(probs), jnp.asarray(labels)
  _check(probs, labels, "probs")
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
  confidence = jnp.max(probs, axis=-1).astype(jnp.float32)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  bins = _bin_index(confidence, num_bins)
  count = jnp.zeros(num_bins, jnp.float32).at[bins].add(1.0)
  conf_sum = jnp.zeros(num_bins, jnp.float32).at[bins].add(confidence)
  correct_sum = jnp.zeros(num_bins, jnp.float32).at[bins].add(correct)
  safe = jnp.maximum(count, 1.0)
  return {
    "count": count,
    "confidence": conf_sum / safe,
    "accuracy": correct_sum / safe,
    "edges": jnp.linspace(0.0, 1.0, num_bins + 1),
  }


def ece(probs: jax.Array, labels: jax.Array, num_bins: int = DEFAULT_NUM_BINS) -> jax.Array:
  """Expected calibration error: sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins."""
  diagram = reliability_diagram(probs, labels, num_bins)
  n = jnp.sum(diagram["count"])
  return jnp.sum(diagram["count"] / n * jnp.abs(diagram["accuracy"] - diagram["confidence"]))


def classification_metrics(
  logits: jax.Array, labels: jax.Array, num_bins: int = DEFAULT_NUM_BINS
) -> dict[str, jax.Array]:
  """accuracy, nll, ece, brier of softmax(logits) -- the set every experiment reports."""
  logits = jnp.asarray(logits, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  return {
    "accuracy": accuracy(logits, labels),
    "nll": nll_from_logits(logits, labels),
    "ece": ece(probs, labels, num_bins),
    "brier": brier(probs, labels),
  }


def probability_metrics(probs: jax.Array, labels: jax.Array) -> dict[str, float]:
  """The evaluation record of predictive probabilities float [N, C] against labels int [N]: accuracy, nll (of
  probabilities clipped at 1e-12, so a confident miss costs 27.6 nats rather than inf), ece, brier as floats,
  and num_examples. (`classification_metrics` is the same set from logits.)"""
  probs, labels = jnp.asarray(probs), jnp.asarray(labels)
  return {"accuracy": float(accuracy(probs, labels)),
          "nll": float(nll(jnp.clip(probs, 1e-12, 1.0), labels)),
          "ece": float(ece(probs, labels)),
          "brier": float(brier(probs, labels)),
          "num_examples": int(labels.shape[0])}
