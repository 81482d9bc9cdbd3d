"""Predictive distributions from Gaussian logits (BayesVLM): probit approximation, Monte Carlo, joint samples.

Logits with mean μ [N, C] and diagonal variance σ² [N, C] (e.g. from `probcosine_logits`):
* probit: softmax(μ / √(1 + π/8·σ²)) — the multi-class extension of MacKay's probit approximation;
* Monte Carlo: (1/S) Σ_s softmax(μ + σ ⊙ ε_s), ε_s ~ N(0, I), drawn per sample from `split(key, S)` so the
  result does not depend on the chunk size (chunks only bound the memory to chunk_size·N·C floats).
For acquisition functions that need samples *shared across inputs* (EPIG), `sample_projection_embeddings`
draws the projection weights from the Kronecker posterior, which correlates all inputs' embeddings.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bayesprompt.bayes import laplace
from bayesprompt.bayes._validate import check_nonnegative

Array = jax.Array


def _check_logits(mean: Array, var: Array) -> None:
  if mean.ndim < 1 or var.shape != mean.shape:
    raise ValueError(f"logit mean {mean.shape} and variance {var.shape} must have the same shape [..., C]")
  check_nonnegative("logits_var", var, "≥ 0 (logit variances)")


def probit_predictive(logits_mean: Array, logits_var: Array, *, log_probs: bool = False) -> Array:
  """softmax(μ/√(1 + π/8·σ²)) over the last axis: [..., C] -> [..., C] (log-probabilities if `log_probs`).

  Limits: exact only in the two-class limit of MacKay's probit argument; each class's logit is shrunk by its
  own variance, independently of the others. With unequal variances across classes it can be far from the
  Monte Carlo predictive E[softmax(μ + σ⊙ε)]: 0.55 off in an outside audit (issue 15), enough to flip the top
  class (tests/test_probcosine.py::PredictiveTest::test_probit_limit_with_unequal_variances shows 0.4). Use
  `mc_predictive` where the variances differ widely between classes.
  Raises ValueError on a concrete negative or NaN variance.
  """
  _check_logits(logits_mean, logits_var)
  scaled = logits_mean * jax.lax.rsqrt(1.0 + (math.pi / 8.0) * logits_var)
  return jax.nn.log_softmax(scaled, axis=-1) if log_probs else jax.nn.softmax(scaled, axis=-1)


def _sample_key_chunks(key: Array, num_samples: int, chunk_size: int) -> tuple[Array, Array]:
  keys = jax.random.split(key, num_samples)
  num_full = num_samples // chunk_size
  return keys[: num_full * chunk_size].reshape(num_full, chunk_size, *keys.shape[1:]), keys[
    num_full * chunk_size :
  ]


def mc_predictive(
  key: Array,
  logits_mean: Array,
  logits_var: Array,
  num_samples: int = 400,
  *,
  chunk_size: int = 50,
  log_probs: bool = False,
) -> Array:
  """Monte Carlo predictive (1/S) Σ_s softmax(μ + σ⊙ε_s); [..., C] -> [..., C].

  Memory: O(chunk_size · size(μ)) besides the inputs. With `log_probs` it returns log of the average,
  computed stably as logsumexp_s(log_softmax) − log S.
  """
  _check_logits(logits_mean, logits_var)
  if num_samples <= 0 or chunk_size <= 0:
    raise ValueError(f"num_samples={num_samples}, chunk_size={chunk_size}; expected positive integers")
  return _mc_predictive_impl(
    key,
    logits_mean,
    logits_var,
    num_samples=num_samples,
    chunk_size=min(chunk_size, num_samples),
    log_probs=log_probs,
  )


@functools.partial(jax.jit, static_argnames=("num_samples", "chunk_size", "log_probs"))
def _mc_predictive_impl(key, logits_mean, logits_var, *, num_samples, chunk_size, log_probs):
  std = jnp.sqrt(logits_var)

  def chunk_log_sum(keys: Array) -> Array:  # log Σ_s softmax(μ + σ ε_s) over one chunk of sample keys
    eps = jax.vmap(lambda k: jax.random.normal(k, logits_mean.shape, logits_mean.dtype))(keys)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits_mean + std * eps, axis=-1), axis=0)

  chunks, rest = _sample_key_chunks(key, num_samples, chunk_size)

  def body(acc, keys):
    return jnp.logaddexp(acc, chunk_log_sum(keys)), None

  acc, _ = jax.lax.scan(body, jnp.full(logits_mean.shape, -jnp.inf, logits_mean.dtype), chunks)
  if rest.shape[0]:
    acc = jnp.logaddexp(acc, chunk_log_sum(rest))
  out = acc - math.log(num_samples)
  return out if log_probs else jnp.exp(out)


def sample_logits(key: Array, logits_mean: Array, logits_var: Array, num_samples: int) -> Array:
  """Independent Gaussian logit samples μ + σ⊙ε: [N, C] -> [N, S, C].

  Inputs are independent of each other here, which is right for per-input scores (entropy, BALD) but not for
  EPIG, whose samples must be shared across pool and target inputs (use `sample_projection_embeddings`).
  """
  _check_logits(logits_mean, logits_var)
  eps = jax.random.normal(key, (logits_mean.shape[0], num_samples) + logits_mean.shape[1:], logits_mean.dtype)
  return logits_mean[:, None] + jnp.sqrt(logits_var)[:, None] * eps


def sample_projection_embeddings(
  key: Array,
  posterior: laplace.KroneckerPosterior,
  features: Array,
  embeddings: Array,
  num_samples: int,
  *,
  add_bias: bool = False,
) -> Array:
  """Embeddings under weight samples W_s = W_MAP + L_A E_s L_Bᵀ from the Kronecker posterior: [S, N, q].

  L_A L_Aᵀ = A'⁻¹ and L_B L_Bᵀ = B'⁻¹ via the stored eigendecompositions; E_s [p, q] standard normal. The
  same W_s acts on every input, so samples are jointly distributed across inputs (what EPIG needs); each
  input's marginal is N(g, (φᵀA'⁻¹φ)·B'⁻¹). Cost: 2·N·p² + 2·S·(p·q² + N·p·q) flops; memory S·(p·q + N·q).

  Args:
    key: PRNG key. posterior: from `laplace.posterior_from_factors`.
    features: [N, d_in] projection inputs φ.
    embeddings: [N, q] the MAP embeddings g = φ @ W_MAP (+ bias, residual).
    num_samples: S. add_bias: φ is augmented with a 1, as the factors were built.
  """
  if embeddings.ndim != 2 or embeddings.shape[1] != posterior.b_eigvals.shape[0]:
    raise ValueError(
      f"embeddings have shape {embeddings.shape}; expected [N, {posterior.b_eigvals.shape[0]}]"
    )
  phi = laplace.check_features(posterior, features, add_bias)
  if phi.shape[0] != embeddings.shape[0]:
    raise ValueError(f"features have {phi.shape[0]} rows but embeddings have {embeddings.shape[0]}")
  da, db = laplace.damped_eigvals(posterior)
  phi_la = (phi @ posterior.a_eigvecs) * jax.lax.rsqrt(da)  # φᵀ L_A  [N, p]
  l_b_t = (posterior.b_eigvecs * jax.lax.rsqrt(db)).T  # L_Bᵀ  [q, q]
  p, q = da.shape[0], db.shape[0]
  noise = jax.random.normal(key, (num_samples, p, q), phi.dtype)
  return embeddings[None] + phi_la @ (noise @ l_b_t)  # φᵀ L_A E_s L_Bᵀ for every s
