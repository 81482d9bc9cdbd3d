"""BayesVLM on a concrete CLIP / SigLIP model: which weights are uncertain, posteriors, zero-shot predictive.

Glue between the model (`bayesprompt.clip`) and the pure primitives (`laplace`, `probcosine`, `predictive`):
* `projection_weights(params, config, tower)` — the uncertain weight of a tower's projection, in the
  `laplace` convention (kernel [d_in, D], optional bias [D]): CLIP's `visual.proj` / `text.proj`; SigLIP's
  image head `fc2` (with bias, plus the deterministic residual) and its biased text head.
* `tower_posterior(...)` — KFAC factors → Kronecker posterior with n (pseudo-data count) and λ (given or
  fitted by the Laplace evidence), after checking the factors' shapes against the model.
* `zero_shot_predictive(...)` — ProbCosine logit moments of every (image, class prompt) pair with both
  projections uncertain, then the probit or Monte Carlo predictive: log-probabilities [N, C].
* `classification_metrics(log_probs, labels)` — accuracy, NLPD, ECE (20 bins), Brier from log-probabilities.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesprompt import clip
from bayesprompt.bayes import laplace, predictive, probcosine
from bayesprompt.eval import metrics as metrics_lib

TOWERS = ("img", "txt")
PREDICTIVES = ("probit", "mc")


def likelihood_of(params: Any) -> str:
  """"siglip" for a model with a logit bias (sigmoid loss), else "infonce"."""
  return "siglip" if "logit_bias" in params else "infonce"


def logit_bias_of(params: Any) -> float:
  return float(np.asarray(params["logit_bias"])) if "logit_bias" in params else 0.0


def _check_tower(tower: str) -> None:
  if tower not in TOWERS:
    raise ValueError(f"tower={tower!r}; expected one of {TOWERS}")


def projection_weights(params: Any, config: clip.CLIPConfig, tower: str) -> tuple[jax.Array, jax.Array | None]:
  """(kernel [d_in, D], bias [D] or None) of the projection BayesVLM is uncertain about."""
  _check_tower(tower)
  if tower == "img":
    if config.vision.pool == "cls":
      return params["visual"]["proj"]["kernel"], None
    fc2 = params["visual"]["head"]["fc2"]
    return fc2["kernel"], fc2["bias"]
  proj = params["text"]["proj"]
  return proj["kernel"], (proj["bias"] if config.text.proj_bias else None)


def projection_has_bias(config: clip.CLIPConfig, tower: str) -> bool:
  """Whether the tower's uncertain projection has a bias (φ is then augmented with a 1 in the factors)."""
  _check_tower(tower)
  return config.vision.pool != "cls" if tower == "img" else bool(config.text.proj_bias)


def projection_dims(params: Any, config: clip.CLIPConfig, tower: str) -> tuple[int, int]:
  """(d_in, D) of the tower's projection."""
  kernel, _ = projection_weights(params, config, tower)
  return int(kernel.shape[0]), int(kernel.shape[1])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["posterior"], meta_fields=["add_bias"])
@dataclasses.dataclass(frozen=True)
class TowerPosterior:
  """A tower's Kronecker posterior with how its factors were built (`add_bias`, static under jit)."""

  posterior: laplace.KroneckerPosterior
  add_bias: bool


def tower_posterior(
  factors: laplace.KFACFactors,
  params: Any,
  config: clip.CLIPConfig,
  tower: str,
  *,
  pseudo_data_count: float,
  prior_precision: float | str = "fit",
  evidence_mode: str = "corrected",
  lambda_solver: str = "optimum",
) -> tuple[TowerPosterior, float]:
  """The posterior of one tower's projection from its KFAC factors.

  Args:
    factors: A [p, p], B [q, q] (from `estimate_hessian` / `laplace.load_factors`).
    pseudo_data_count: n > 0, the GGN multiplier (10 in the paper's zero-shot runs).
    prior_precision: λ > 0, or "fit" to maximise the Laplace evidence (`laplace.fit_prior_precision`).
    evidence_mode: "corrected" or "faithful" (the official code's evidence), used when fitting.
    lambda_solver: "optimum" or "official_adam" (the official 300-step Adam), used when fitting.

  Returns:
    (TowerPosterior, λ as a float).

  Raises:
    ValueError: factors whose shapes do not fit this model's projection, non-PSD factors, n ≤ 0, λ ≤ 0.
  """
  d_in, embed_dim = projection_dims(params, config, tower)
  add_bias = projection_has_bias(config, tower)
  try:
    laplace.check_factor_shapes(factors.a, factors.b, feature_dim=d_in, embed_dim=embed_dim, add_bias=add_bias)
  except ValueError as err:
    raise ValueError(f"{tower} factors do not fit the model ({d_in} -> {embed_dim} projection): {err}") from err
  if isinstance(prior_precision, str):
    if prior_precision != "fit":
      raise ValueError(f"prior_precision={prior_precision!r}; expected a positive number or 'fit'")
    posterior = laplace.posterior_from_factors(factors.a, factors.b, pseudo_data_count=pseudo_data_count)
    kernel, bias = projection_weights(params, config, tower)
    lam = laplace.fit_prior_precision(posterior, laplace.projection_sq_norm(kernel, bias), mode=evidence_mode,
                                       solver=lambda_solver)
  else:
    lam = float(prior_precision)
    if not np.isfinite(lam) or lam <= 0:
      raise ValueError(f"prior_precision={prior_precision}; expected a finite positive number (λ > 0)")
    posterior = laplace.posterior_from_factors(factors.a, factors.b, pseudo_data_count=pseudo_data_count)
  posterior = posterior._replace(prior_precision=jnp.asarray(lam, posterior.a_eigvals.dtype))
  return TowerPosterior(posterior, add_bias), float(lam)


@jax.jit
def logit_moments(
  image_post: TowerPosterior | None,
  text_post: TowerPosterior | None,
  image: dict[str, Any],
  text: dict[str, Any],
  logit_scale: float,
  logit_bias: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """ProbCosine logit mean and variance [N, C] of images against class prompts.

  Args:
    image_post / text_post: the towers' posteriors (None: that projection is deterministic).
    image: {"pre_projection" [N, d_v], "embeddings" [N, D]}; text: the same for the C prompts [C, ...].
    logit_scale: log temperature; logit_bias: SigLIP's bias (None for CLIP).
  """

  def factored(post: TowerPosterior | None, feats: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    emb = jnp.asarray(feats["embeddings"], jnp.float32)
    if post is None:
      return jnp.zeros(emb.shape[:1], emb.dtype), jnp.zeros(emb.shape[1:], emb.dtype)
    return laplace.embedding_variance_factors(post.posterior, feats["pre_projection"], add_bias=post.add_bias)

  quad_i, b_i = factored(image_post, image)
  quad_t, b_t = factored(text_post, text)
  return probcosine.probcosine_logits_factored(
    jnp.asarray(image["embeddings"], jnp.float32),
    quad_i,
    b_i,
    jnp.asarray(text["embeddings"], jnp.float32),
    quad_t,
    b_t,
    logit_scale,
    logit_bias,
  )


@functools.partial(jax.jit, static_argnames=("method", "num_samples"))
def zero_shot_predictive(
  image_post: TowerPosterior | None,
  text_post: TowerPosterior | None,
  image: dict[str, Any],
  text: dict[str, Any],
  logit_scale: float,
  logit_bias: float | None = None,
  *,
  method: str = "probit",
  key: jax.Array | None = None,
  num_samples: int = 400,
) -> jax.Array:
  """BayesVLM predictive log-probabilities [N, C] ("probit" or "mc" with `num_samples` draws)."""
  if method not in PREDICTIVES:
    raise ValueError(f"predictive method {method!r}; expected one of {PREDICTIVES}")
  if num_samples <= 0:
    raise ValueError(f"num_samples={num_samples}; expected a positive integer")
  mean, var = logit_moments(image_post, text_post, image, text, logit_scale, logit_bias)
  if method == "probit":
    return predictive.probit_predictive(mean, var, log_probs=True)
  key = jax.random.key(0) if key is None else key
  return predictive.mc_predictive(key, mean, var, num_samples, log_probs=True)


@jax.jit
def map_log_probs(image: dict[str, Any], text: dict[str, Any], logit_scale: float, logit_bias: float | None = None):
  """Deterministic CLIP log-probabilities [N, C]: log_softmax(s·cos(g, t) (+ b))."""
  logits = jnp.exp(logit_scale) * clip.normalize(jnp.asarray(image["embeddings"])) @ clip.normalize(
    jnp.asarray(text["embeddings"])
  ).T
  if logit_bias is not None:
    logits = logits + logit_bias
  return jax.nn.log_softmax(logits, axis=-1)


def classification_metrics(log_probs: jax.Array, labels: jax.Array) -> dict[str, float]:
  """accuracy, nlpd (mean −log p(y)), ece (20 equal-width bins), brier of predictive log-probs [N, C]."""
  log_probs = jnp.asarray(log_probs, jnp.float32)
  labels = jnp.asarray(labels)
  if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
    raise ValueError(f"log_probs {log_probs.shape} and labels {labels.shape} must be [N, C] and [N]")
  return {k: float(v) for k, v in _metrics(log_probs, labels).items()}


@jax.jit
def _metrics(log_probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  probs = jnp.exp(log_probs)
  return {
    "accuracy": metrics_lib.accuracy(log_probs, labels),
    "nlpd": -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)),
    "ece": metrics_lib.ece(probs, labels),
    "brier": metrics_lib.brier(probs, labels),
  }
