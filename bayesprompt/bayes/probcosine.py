"""ProbCosine: moments of the cosine of two independent diagonal Gaussians (BayesVLM, arXiv 2412.06014).

For g ~ N(μ_g, diag σ²_g) and h ~ N(μ_h, diag σ²_h) independent, with E‖g‖² = Σ(μ²_g + σ²_g):
  E[cos]   ≈ μ_gᵀμ_h / √(E‖g‖²·E‖h‖²)
  Var[cos] ≈ Σ_d[(μ²_{g,d} + σ²_{g,d})σ²_{h,d} + σ²_{g,d}μ²_{h,d}] / (E‖g‖²·E‖h‖²)
The numerator moments are exact (E[gᵀh] = μ_gᵀμ_h; Var[gᵀh] is the sum above); the approximation treats the
normaliser as the constant √(E‖g‖²E‖h‖²). Logits: mean s·E (+ b for SigLIP), variance s²·Var.

Accuracy (tests/test_probcosine.py::test_variance_sweep, `pytest -s` prints it; 2·10⁵ Monte Carlo draws,
D = 16, unit means with cosine c, isotropic σ² = scale/D on both sides):

  c     scale  mean error   Var relative error      The mean is exact to first order (10⁶-draw test at
  0.0   1e-4   -1.0e-05     +0.002                  scale 1e-5 agrees within Monte Carlo error); its error
  0.0   1e+0   -7.1e-04     -0.018                  grows like O(σ²). The variance treats the normaliser as
  0.3   1e-4   -4.0e-06     +0.097                  constant: to first order the true Var[cos] only sees the
  0.3   1e-2   -4.8e-05     +0.103                  component of μ_h orthogonal to μ_g, so at small variance
  0.3   1e+0   -7.4e-04     +0.010                  Var_approx/Var_true → 1/(1 − c²): exact for orthogonal
  0.7   1e-4   -5.9e-06     +0.954                  means, +10% at c = 0.3 (typical CLIP image–text cosines),
  0.7   1e-1   -2.9e-03     +0.772                  ×1.95 at c = 0.7 — an over-estimate in this isotropic
  0.7   1e+0   -3.1e-03     +0.224                  sweep, shrinking as σ grows.

Limits: the over-estimate is not a bound. With anisotropic variances (σ² concentrated on a few coordinates,
as KFAC-Laplace variances are) the approximation can under-estimate: an outside audit (issue 15) measured
approximate/Monte Carlo variance 0.94. Where the variance matters, compare with Monte Carlo
(`predictive.mc_predictive` on the sampled logits, or `predictive.sample_projection_embeddings`).

Memory: no [N, M, D] tensor; everything is a matmul, O(N·M + (N + M)·D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bayesprompt.bayes._validate import check_nonnegative

Array = jax.Array


def _check(mu: Array, var: Array, name: str) -> None:
  if mu.ndim != 2 or var.shape != mu.shape:
    raise ValueError(
      f"{name}: expected mean [N, D] and variance of the same shape; got {mu.shape} and {var.shape}"
    )
  check_nonnegative(f"var_{name}", var, "≥ 0 (diagonal variances)")


def probcosine_moments(mu_g: Array, var_g: Array, mu_h: Array, var_h: Array) -> tuple[Array, Array]:
  """Approximate mean and variance of cos(g_i, h_j) for all pairs.

  Args:
    mu_g: [N, D] means of g; var_g: [N, D] diagonal variances (≥ 0).
    mu_h: [M, D] means of h; var_h: [M, D].

  Returns:
    (mean [N, M], var [N, M]) in the dtype of the inputs.
  """
  _check(mu_g, var_g, "g")
  _check(mu_h, var_h, "h")
  if mu_g.shape[1] != mu_h.shape[1]:
    raise ValueError(f"g has dimension {mu_g.shape[1]} but h has {mu_h.shape[1]}")
  sq_g, sq_h = jnp.square(mu_g), jnp.square(mu_h)
  norm_g = jnp.sum(sq_g + var_g, axis=-1)  # E‖g‖² [N]
  norm_h = jnp.sum(sq_h + var_h, axis=-1)  # E‖h‖² [M]
  inv_g, inv_h = jax.lax.rsqrt(norm_g), jax.lax.rsqrt(norm_h)
  mean = (mu_g * inv_g[:, None]) @ (mu_h * inv_h[:, None]).T
  # Both variance terms in one matmul with inner dimension 2D.
  left = jnp.concatenate([sq_g + var_g, var_g], axis=-1) * (inv_g**2)[:, None]
  right = jnp.concatenate([var_h, sq_h], axis=-1) * (inv_h**2)[:, None]
  return mean, left @ right.T


def probcosine_moments_factored(
  mu_g: Array, quad_g: Array, b_diag_g: Array, mu_h: Array, quad_h: Array, b_diag_h: Array
) -> tuple[Array, Array]:
  """`probcosine_moments` for KFAC-Laplace variances σ²_g = quad_g ⊗ b_diag_g (and likewise h).

  With σ²_{g,d} = α_i·β_d (α = φᵀA'⁻¹φ per input, β = diag(B'⁻¹) shared), the variance numerator is a sum of
  rank-one outer products,
    α_h,j·(μ²_g β_h)_i + α_g,i·α_h,j·(β_g·β_h) + α_g,i·(μ²_h β_g)_j,
  so the only N×M×D work is the mean's matmul: the same cost as deterministic logits plus O(N·M) elementwise.

  Args:
    mu_g: [N, D]; quad_g: [N] (α_g); b_diag_g: [D] (β_g). mu_h: [M, D]; quad_h: [M]; b_diag_h: [D].

  Returns:
    (mean [N, M], var [N, M]), equal to `probcosine_moments` with var_g = quad_g[:, None] * b_diag_g.
  """
  if mu_g.ndim != 2 or mu_h.ndim != 2 or mu_g.shape[1] != mu_h.shape[1]:
    raise ValueError(f"expected mu_g [N, D] and mu_h [M, D]; got {mu_g.shape} and {mu_h.shape}")
  if quad_g.shape != mu_g.shape[:1] or quad_h.shape != mu_h.shape[:1]:
    raise ValueError(f"quad_g {quad_g.shape} / quad_h {quad_h.shape} must be [N] / [M]")
  if b_diag_g.shape != mu_g.shape[1:] or b_diag_h.shape != mu_h.shape[1:]:
    raise ValueError(f"b_diag_g {b_diag_g.shape} / b_diag_h {b_diag_h.shape} must be [D]")
  sq_g, sq_h = jnp.square(mu_g), jnp.square(mu_h)
  norm_g = jnp.sum(sq_g, axis=-1) + quad_g * jnp.sum(b_diag_g)
  norm_h = jnp.sum(sq_h, axis=-1) + quad_h * jnp.sum(b_diag_h)
  inv_g, inv_h = jax.lax.rsqrt(norm_g), jax.lax.rsqrt(norm_h)
  mean = (mu_g * inv_g[:, None]) @ (mu_h * inv_h[:, None]).T
  g_terms = sq_g @ b_diag_h  # Σ_d μ²_g β_h  [N]
  h_terms = sq_h @ b_diag_g  # Σ_d μ²_h β_g  [M]
  cross = jnp.dot(b_diag_g, b_diag_h)
  ag, ah = quad_g * inv_g**2, quad_h * inv_h**2
  var = (inv_g**2 * g_terms)[:, None] * ah[None, :] + ag[:, None] * (ah * cross + inv_h**2 * h_terms)[None, :]
  return mean, var


def probcosine_logits(
  mu_g: Array,
  var_g: Array,
  mu_h: Array,
  var_h: Array,
  logit_scale: Array | float,
  logit_bias: Array | float | None = None,
) -> tuple[Array, Array]:
  """Logit moments: mean s·E[cos] (+ b), variance s²·Var[cos]; s = exp(logit_scale) (CLIP's log-space scale).

  With zero variances this is exactly the deterministic CLIP/SigLIP logits. Shapes as `probcosine_moments`.
  """
  mean, var = probcosine_moments(mu_g, var_g, mu_h, var_h)
  return _scale(mean, var, logit_scale, logit_bias)


def probcosine_logits_factored(
  mu_g: Array,
  quad_g: Array,
  b_diag_g: Array,
  mu_h: Array,
  quad_h: Array,
  b_diag_h: Array,
  logit_scale: Array | float,
  logit_bias: Array | float | None = None,
) -> tuple[Array, Array]:
  """`probcosine_logits` for KFAC-factored variances (see `probcosine_moments_factored`)."""
  mean, var = probcosine_moments_factored(mu_g, quad_g, b_diag_g, mu_h, quad_h, b_diag_h)
  return _scale(mean, var, logit_scale, logit_bias)


def _scale(mean: Array, var: Array, logit_scale, logit_bias) -> tuple[Array, Array]:
  scale = jnp.exp(jnp.asarray(logit_scale, mean.dtype))
  mean = scale * mean
  if logit_bias is not None:
    mean = mean + logit_bias
  return mean, scale**2 * var
