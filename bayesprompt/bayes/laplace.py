"""Post-hoc KFAC-GGN Laplace over a CLIP/SigLIP projection layer (BayesVLM, arXiv 2412.06014).

Only the projections are uncertain, so everything works from *cached* features: φ, the projection's
input (`out["pre_projection"]` of the towers, shape [N, d_in]), and g, the embedding it produces
(shape [N, D]). Pure JAX, no Flax.

Conventions (stated once, used everywhere):

* The projection is used as `g = φ @ P (+ bias) (+ residual)` with `P` of shape [d_in, D]: open_clip's
  `visual.proj` / `text_projection` as stored; a torch `nn.Linear` weight [D, d_in] must be transposed.
  A bias is handled by augmenting φ with a trailing 1 (`add_bias=True`), so the uncertain weight is
  `concat([P, bias[None]], 0)` of shape [p, q] = [d_in + 1, D]. SigLIP's image head is `fc2(φ) + residual`:
  the residual is deterministic, so it enters only through g; φ is fc2's input (with its bias).
* vec(P) is the row-major flattening `P.reshape(-1)` (index `a * q + e`). With this convention the GGN of
  one sample is exactly `kron(φ φᵀ, H_g)` (`np.kron(A, B)[a*q+e, b*q+f] = A[a,b] B[e,f]`), and the
  KFAC approximation of the GGN of all N samples is `kron(A, B)`.
* `logit_scale` is the *log* temperature, as CLIP stores it: s = exp(logit_scale). SigLIP adds `logit_bias`.
* A = Σ_i φ_i φ_iᵀ / √N, B = Σ_i H_{g_i} / √N (the official normalisation), N the number of samples.

The GGN of a loss w.r.t. one embedding g against normalised targets Ŷ [C, D] ("class batch" of the other
modality) is H_g = s² J Ŷᵀ Λ Ŷ Jᵀ with J = (I − ĝĝᵀ)/‖g‖ and the logit-space curvature Λ =
diag(p) − ppᵀ (InfoNCE, p = softmax(s Ŷ ĝ)) or diag(σ(z)(1 − σ(z))) (SigLIP, z = s Ŷ ĝ + b). Neither depends
on the label (σ'(z) is even in z, and the CE curvature ignores the label), so the pairing inside a class
batch does not matter for the factors.

Streaming: the per-sample D×D matrices are never formed. Expanding J M J with M = ŶᵀΛŶ,
  Σ_i H_i = s² [Ŷᵀ diag(Σ_i w_i a_i) Ŷ − Σ_i w_i m_i m_iᵀ − Σ_i w_i (u_i v_iᵀ + v_i u_iᵀ)
               + Σ_i w_i (u_iᵀ v_i) u_i u_iᵀ]
with u = ĝ, w = 1/‖g‖², a = diag(Λ), m = Ŷᵀp (InfoNCE only), v = M u. Every term is a matmul over a
chunk of samples: the cost per sample is 6·C·D + 4·D² + 2·d_in² flops for InfoNCE (4·C·D + 2·D² + 2·d_in²
for SigLIP), plus 2·C·D² once per `kfac_update` call.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import math
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayesprompt.bayes._validate import is_concrete

LIKELIHOODS = ("infonce", "siglip")
EVIDENCE_MODES = ("corrected", "faithful")
LAMBDA_SOLVERS = ("optimum", "official_adam")
# The official BayesVLM fit (scripts/hessian_estimation.py, hessians.optimize_prior_precision): Adam on log λ
# from λ = 400, lr 1e-2, 300 steps.
OFFICIAL_ADAM = {"init": 400.0, "lr": 1e-2, "steps": 300}

Array = jax.Array


# ------------------------------------------------------------------------------------------------------------
# Projections (a tiny helper so features and embeddings provably agree).
# ------------------------------------------------------------------------------------------------------------


def augment_features(features: Array) -> Array:
  """Appends a constant-1 column: [N, d_in] -> [N, d_in + 1] (the bias is the last row of the weight)."""
  ones = jnp.ones(features.shape[:-1] + (1,), features.dtype)
  return jnp.concatenate([features, ones], axis=-1)


def linear_projection(
  features: Array, kernel: Array, bias: Array | None = None, residual: Array | None = None
) -> Array:
  """The projection BayesVLM is uncertain about: `features @ kernel (+ bias) (+ residual)`.

  Args:
    features: [N, d_in] pre-projection features φ.
    kernel: [d_in, D] (open_clip layout; transpose a torch `nn.Linear.weight`).
    bias: optional [D].
    residual: optional [N, D] deterministic residual (SigLIP's MAP image head).

  Returns:
    [N, D] embeddings (not normalised).
  """
  if features.shape[-1] != kernel.shape[0]:
    raise ValueError(
      f"features have {features.shape[-1]} dims but kernel has shape {kernel.shape} "
      "(expected [d_in, D]; transpose a torch Linear weight)"
    )
  out = features @ kernel
  if bias is not None:
    out = out + bias
  if residual is not None:
    out = out + residual
  return out


def projection_sq_norm(kernel: Array, bias: Array | None = None) -> Array:
  """‖W‖² of the uncertain weight (kernel plus bias if present), for the evidence's prior term.

  Returns a scalar in the inputs' dtype, at least float32 (bf16 is summed in float32; float64 stays float64).
  """
  kernel = jnp.asarray(kernel)
  dtype = jnp.promote_types(kernel.dtype if bias is None else jnp.result_type(kernel, bias), jnp.float32)
  sq = jnp.sum(jnp.square(kernel.astype(dtype)))
  if bias is not None:
    sq = sq + jnp.sum(jnp.square(jnp.asarray(bias).astype(dtype)))
  return sq


# ------------------------------------------------------------------------------------------------------------
# GGN of one embedding (the reference formula; the streamed sums below never build it per sample).
# ------------------------------------------------------------------------------------------------------------


def _check_nonzero_rows(name: str, rows: Array) -> None:
  """Raises ValueError naming the first zero (or non-finite) row of `rows` [N, D] when it is concrete: the
  curvature normalises each row, and a zero row would make the factors NaN."""
  if not is_concrete(rows) or rows.shape[0] == 0:
    return
  sq_norms = jnp.sum(jnp.square(jnp.asarray(rows, jnp.float32)), axis=-1)
  bad = ~(jnp.isfinite(sq_norms) & (sq_norms > 0))
  if bool(jnp.any(bad)):
    index = int(jnp.argmax(bad))
    raise ValueError(f"{name}[{index}] has norm {float(jnp.sqrt(sq_norms[index]))}; the KFAC curvature "
                     f"normalises every row, so rows must be finite and non-zero")


def _check_likelihood(likelihood: str) -> None:
  if likelihood not in LIKELIHOODS:
    raise ValueError(f"likelihood={likelihood!r}; expected one of {LIKELIHOODS}")


def _normalise(x: Array) -> Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _logit_curvature(
  cos: Array, scale: Array, logit_bias: Array, likelihood: str
) -> tuple[Array, Array | None]:
  """Diagonal `a` and rank-one vector `r` of the logit-space curvature Λ = diag(a) − r rᵀ, per row of cos."""
  logits = scale * cos + logit_bias
  if likelihood == "infonce":
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, probs
  sig = jax.nn.sigmoid(logits)
  return sig * (1.0 - sig), None


def embedding_ggn(
  embedding: Array,
  targets: Array,
  logit_scale: Array | float,
  *,
  likelihood: str = "infonce",
  logit_bias: Array | float = 0.0,
) -> Array:
  """GGN of the contrastive loss w.r.t. one (unnormalised) embedding: H_g = s² J ŶᵀΛŶ Jᵀ.

  Args:
    embedding: [D] the embedding g (not normalised, non-zero).
    targets: [C, D] the other modality's embeddings (normalised here).
    logit_scale: log temperature (s = exp(logit_scale)).
    likelihood: "infonce" (CLIP: softmax over the C targets) or "siglip" (independent sigmoids).
    logit_bias: SigLIP's logit bias (ignored by the InfoNCE curvature, which is shift-invariant).

  Returns:
    [D, D] symmetric PSD matrix.
  """
  _check_likelihood(likelihood)
  dim = embedding.shape[-1]
  norm = jnp.linalg.norm(embedding)
  unit = embedding / norm
  jac = (jnp.eye(dim, dtype=embedding.dtype) - jnp.outer(unit, unit)) / norm
  unit_targets = _normalise(targets)
  scale = jnp.exp(logit_scale)
  a, r = _logit_curvature(unit_targets @ unit, scale, logit_bias, likelihood)
  curvature = jnp.diag(a)
  if r is not None:
    curvature = curvature - jnp.outer(r, r)
  inner = unit_targets.T @ curvature @ unit_targets
  return scale**2 * jac @ inner @ jac.T


# ------------------------------------------------------------------------------------------------------------
# Streaming KFAC factors.
# ------------------------------------------------------------------------------------------------------------


class KFACState(NamedTuple):
  """Running sums of the KFAC factors. Combine chunks (or devices: `jax.lax.psum`) by summing every leaf.

  Attributes:
    a_sum: [p, p] Σ φ φᵀ (φ augmented with a 1 when the projection has a bias).
    b_sum: [q, q] Σ H_g.
    num_data: [] int32 number of samples N summed so far.
  """

  a_sum: Array
  b_sum: Array
  num_data: Array


class KFACFactors(NamedTuple):
  """Finalised factors A = a_sum/√N [p, p], B = b_sum/√N [q, q]; `num_data` = N, float (NaN if unknown)."""

  a: Array
  b: Array
  num_data: Array


def kfac_init(
  feature_dim: int, embed_dim: int, *, add_bias: bool = False, dtype: Any = jnp.float32
) -> KFACState:
  """Zero state for features of `feature_dim` (before augmentation) and embeddings of `embed_dim`."""
  p = feature_dim + int(add_bias)
  return KFACState(
    jnp.zeros((p, p), dtype), jnp.zeros((embed_dim, embed_dim), dtype), jnp.zeros((), jnp.int32)
  )


def kfac_combine(*states: KFACState) -> KFACState:
  """Sum of states (chunks of one data set, or one per device/host)."""
  if not states:
    raise ValueError("kfac_combine needs at least one state")
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *states)


def _ggn_chunk_sums(
  embeddings: Array, unit_targets: Array, scale: Array, logit_bias: Array, likelihood: str, precision: Any
) -> tuple[Array, Array]:
  """For one chunk of embeddings [n, D]: (Σ_i w_i a_i [C], the D×D terms of Σ_i H_i/s² except ŶᵀdiagŶ)."""
  dot = lambda x, y: jnp.matmul(x, y, precision=precision)
  norm_sq = jnp.sum(jnp.square(embeddings), axis=-1)  # [n]
  units = embeddings * jax.lax.rsqrt(norm_sq)[:, None]  # u_i
  weights = 1.0 / norm_sq  # w_i = 1/‖g_i‖²: J = (I − uuᵀ)/‖g‖ contributes two 1/‖g‖ factors
  cos = dot(units, unit_targets.T)  # [n, C]
  a, r = _logit_curvature(cos, scale, logit_bias, likelihood)
  a_cos = a * cos
  target_weights = dot(weights, a)  # [C]: Σ_i w_i a_i
  u_m_u = jnp.sum(a_cos * cos, axis=-1)  # uᵀ Ŷᵀ diag(a) Ŷ u
  if r is None:
    v = dot(a_cos, unit_targets)  # M u = Ŷᵀ (a ⊙ cos)
    terms = jnp.zeros((embeddings.shape[1],) * 2, embeddings.dtype)
  else:
    # One matmul for m = Ŷᵀ p and Ŷᵀ (p ⊙ cos): both [n, C] @ [C, D].
    n = embeddings.shape[0]
    both = dot(jnp.concatenate([r, a_cos], axis=0), unit_targets)
    m, v_diag = both[:n], both[n:]
    r_cos = jnp.sum(r * cos, axis=-1)  # mᵀu = rᵀ Ŷ u
    v = v_diag - m * r_cos[:, None]
    u_m_u = u_m_u - jnp.square(r_cos)
    terms = -dot(m.T, m * weights[:, None])
  # −Σ w (u vᵀ + v uᵀ) + Σ w (uᵀv) u uᵀ = Q + Qᵀ with Q = Σ_i u_i [w_i (½ (uᵀv)_i u_i − v_i)]ᵀ.
  q = dot(units.T, weights[:, None] * (0.5 * u_m_u[:, None] * units - v))
  return target_weights, terms + q + q.T


def kfac_update(
  state: KFACState,
  features: Array,
  embeddings: Array,
  targets: Array,
  logit_scale: Array | float,
  *,
  likelihood: str = "infonce",
  logit_bias: Array | float = 0.0,
  add_bias: bool = False,
  chunk_size: int | None = 512,
  precision: Any = None,
  b_batch_size: int | None = None,
) -> KFACState:
  """Adds N samples scored against one class batch of targets to the running KFAC sums. Jit-able.

  Memory: O(chunk_size · (C + d_in + D) + C·D + d_in² + D²); never N×N, N×C for the whole N, or N×D×D.
  For the paper's protocol (each pair's embedding against the class batch it belongs to) call this once per
  class batch and `kfac_finalize` the summed state.

  Args:
    state: running sums from `kfac_init` / a previous update.
    features: [N, d_in] projection inputs φ (without the bias column; `add_bias` appends it).
    embeddings: [N, D] the projection outputs g (unnormalised, non-zero; includes bias/residual).
    targets: [C, D] the other modality's embeddings of the class batch (normalised here).
    logit_scale: log temperature, s = exp(logit_scale).
    likelihood: "infonce" or "siglip".
    logit_bias: SigLIP's logit bias.
    add_bias: the projection has a bias: φ is augmented with a 1 (A is (d_in+1)×(d_in+1)).
    chunk_size: samples per streamed chunk (None: one chunk). Results do not depend on it beyond rounding.
    precision: `jax.lax.Precision` for the matmuls (None = backend default; on GPUs that may be TF32).
    b_batch_size: None (default): every sample adds to A, B and N. An int reproduces the official
      `kfac_ggn` (AaltoML/BayesVLM, its `la_batch_size`): B sums over whole data batches of that size only,
      so the last N mod b_batch_size samples of the class batch add to A and N but not to B.

  Returns:
    The updated state (sums, N incremented by the number of rows).
  """
  _check_likelihood(likelihood)
  if b_batch_size is not None:
    if isinstance(b_batch_size, bool) or not isinstance(b_batch_size, (int, np.integer)) or b_batch_size <= 0:
      raise ValueError(f"b_batch_size={b_batch_size!r}; expected a positive integer or None")
    kept = np.shape(features)[0] - np.shape(features)[0] % int(b_batch_size)
    kwargs = dict(likelihood=likelihood, logit_bias=logit_bias, add_bias=add_bias, chunk_size=chunk_size,
                  precision=precision)
    state = kfac_update(state, features[:kept], embeddings[:kept], targets, logit_scale, **kwargs)
    if kept == np.shape(features)[0]:
      return state
    # The leftover rows: their outer products in A and their count in N, as the official code does.
    rest = jnp.asarray(features[kept:], state.a_sum.dtype)
    rest = augment_features(rest) if add_bias else rest  # shapes were checked by the call above
    return state._replace(a_sum=state.a_sum + jnp.matmul(rest.T, rest, precision=precision),
                          num_data=state.num_data + rest.shape[0])
  if features.ndim != 2 or embeddings.ndim != 2 or targets.ndim != 2:
    raise ValueError(
      f"expected features [N, d_in], embeddings [N, D], targets [C, D]; got shapes "
      f"{features.shape}, {embeddings.shape}, {targets.shape}"
    )
  num, feat_dim = features.shape
  embed_dim = embeddings.shape[1]
  if embeddings.shape[0] != num:
    raise ValueError(f"features have {num} rows but embeddings have {embeddings.shape[0]}")
  if targets.shape[1] != embed_dim:
    raise ValueError(f"targets have dimension {targets.shape[1]} but embeddings have {embed_dim}")
  p = feat_dim + int(add_bias)
  if state.a_sum.shape != (p, p) or state.b_sum.shape != (embed_dim, embed_dim):
    raise ValueError(
      f"state factors have shapes {state.a_sum.shape}, {state.b_sum.shape}; expected "
      f"({p}, {p}) (d_in={feat_dim}, add_bias={add_bias}) and ({embed_dim}, {embed_dim})"
    )
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f"chunk_size={chunk_size}; expected a positive integer or None")
  if num == 0:
    return state
  for name, rows in (("embeddings", embeddings), ("targets", targets)):
    _check_nonzero_rows(name, rows)
  return _kfac_update_impl(
    state,
    features,
    embeddings,
    targets,
    logit_scale,
    logit_bias,
    likelihood=likelihood,
    add_bias=add_bias,
    chunk_size=chunk_size,
    precision=precision,
  )


@functools.partial(jax.jit, static_argnames=("likelihood", "add_bias", "chunk_size", "precision"))
def _kfac_update_impl(
  state,
  features,
  embeddings,
  targets,
  logit_scale,
  logit_bias,
  *,
  likelihood,
  add_bias,
  chunk_size,
  precision,
):
  num, embed_dim = embeddings.shape
  dtype = state.b_sum.dtype
  features = features.astype(dtype)
  embeddings = embeddings.astype(dtype)
  unit_targets = _normalise(targets.astype(dtype))
  scale = jnp.exp(jnp.asarray(logit_scale, dtype))
  bias = jnp.asarray(logit_bias, dtype)
  if add_bias:
    features = augment_features(features)
  p = features.shape[1]

  def chunk_sums(phi: Array, emb: Array) -> tuple[Array, Array, Array]:
    target_weights, terms = _ggn_chunk_sums(emb, unit_targets, scale, bias, likelihood, precision)
    return jnp.matmul(phi.T, phi, precision=precision), target_weights, terms

  chunk = num if chunk_size is None else min(chunk_size, num)
  num_full = num // chunk
  full = num_full * chunk
  a_sum, target_weights, terms = chunk_sums(features[:chunk], embeddings[:chunk])
  if num_full > 1:

    def body(carry, xs):
      out = chunk_sums(*xs)
      return jax.tree.map(jnp.add, carry, out), None

    rest = (
      features[chunk:full].reshape(num_full - 1, chunk, p),
      embeddings[chunk:full].reshape(num_full - 1, chunk, embed_dim),
    )
    (a_sum, target_weights, terms), _ = jax.lax.scan(body, (a_sum, target_weights, terms), rest)
  if full < num:
    out = chunk_sums(features[full:], embeddings[full:])
    a_sum, target_weights, terms = jax.tree.map(jnp.add, (a_sum, target_weights, terms), out)
  weighted = jnp.matmul(unit_targets.T * target_weights[None, :], unit_targets, precision=precision)
  b_sum = scale**2 * (weighted + terms)
  return KFACState(state.a_sum + a_sum, state.b_sum + b_sum, state.num_data + num)


def kfac_finalize(state: KFACState) -> KFACFactors:
  """A = a_sum/√N, B = b_sum/√N (the official normalisation). Raises if no data was added."""
  num = state.num_data
  if not isinstance(num, jax.core.Tracer) and int(num) <= 0:
    raise ValueError("kfac_finalize: the state holds no data (num_data=0)")
  num = num.astype(state.a_sum.dtype)
  inv_sqrt = jax.lax.rsqrt(num)
  return KFACFactors(state.a_sum * inv_sqrt, state.b_sum * inv_sqrt, num)


def kfac_factors(
  features: Array,
  embeddings: Array,
  targets: Array,
  logit_scale: Array | float,
  *,
  likelihood: str = "infonce",
  logit_bias: Array | float = 0.0,
  add_bias: bool = False,
  chunk_size: int | None = 512,
  precision: Any = None,
) -> tuple[Array, Array]:
  """KFAC factors (A [p, p], B [q, q]) of N samples against one class batch of targets.

  A = Σ φφᵀ/√N, B = Σ H_g/√N; see `kfac_update` for the arguments and memory bound.
  """
  dtype = jnp.result_type(embeddings.dtype, jnp.float32)  # bfloat16 inputs accumulate in float32
  state = kfac_init(features.shape[-1], embeddings.shape[-1], add_bias=add_bias, dtype=dtype)
  state = kfac_update(
    state,
    features,
    embeddings,
    targets,
    logit_scale,
    likelihood=likelihood,
    logit_bias=logit_bias,
    add_bias=add_bias,
    chunk_size=chunk_size,
    precision=precision,
  )
  factors = kfac_finalize(state)
  return factors.a, factors.b


RANK_ONE_PRODUCTS = ("outer", "inner")


def rank_one_update(
  factors: KFACFactors, features: Array, *, scale: float | Array = 1.0, add_bias: bool = False,
  product: str = "outer",
) -> KFACFactors:
  """Online update of A with newly labelled inputs: A ← A + scale · Σ_j φ_j φ_jᵀ (outer products).

  The official active-learning code (AaltoML/BayesVLM `epig.py`: `A_new = a @ a.T` on a 1-D activation `a`)
  computes the *inner* product ‖φ‖², a scalar that broadcasting adds to every entry of A;
  `product="inner"` reproduces that: A ← A + scale · Σ_j ‖φ_j‖² 𝟙𝟙ᵀ. The KFAC factor of a new sample is its
  outer product (the default). `scale` plays the role of the official `hessian_update_scale`;
  `scale = 1/√N` adds the sample exactly as the batch normalisation would. B and `num_data` are left
  unchanged (the official code also rescales A and B by √n/√(n+1) and adds the new sample's B term; that is
  not reproduced, see DEVIATIONS.md).

  Args:
    factors: finalised factors, A of shape [p, p].
    features: [d_in] or [k, d_in] new inputs (without the bias column; `add_bias` appends it).
    scale: non-negative multiplier.
    add_bias: augment φ with a 1, as the factors were built.
    product: "outer" (default, the KFAC term) or "inner" (the official code's).
  """
  if product not in RANK_ONE_PRODUCTS:
    raise ValueError(f"product={product!r}; expected one of {RANK_ONE_PRODUCTS}")
  features = jnp.atleast_2d(jnp.asarray(features, factors.a.dtype))
  if add_bias:
    features = augment_features(features)
  if features.shape[-1] != factors.a.shape[0]:
    raise ValueError(
      f"features of dimension {features.shape[-1]} (add_bias={add_bias}) do not match A of shape "
      f"{factors.a.shape}"
    )
  if not isinstance(scale, jax.core.Tracer) and float(scale) < 0:
    raise ValueError(
      f"scale={scale}; expected >= 0 (a negative update would break positive semi-definiteness)"
    )
  if product == "inner":
    return factors._replace(a=factors.a + scale * jnp.sum(features * features))
  return factors._replace(a=factors.a + scale * features.T @ features)


# ------------------------------------------------------------------------------------------------------------
# Kronecker posterior.
# ------------------------------------------------------------------------------------------------------------


class KroneckerPosterior(NamedTuple):
  """Posterior N(W_MAP, (√n·A + √λ·I)⁻¹ ⊗ (√n·B + √λ·I)⁻¹) stored through the eigendecompositions of A, B.

  Changing n or λ only changes the damped eigenvalues √n·e + √λ (`posterior._replace(prior_precision=...)`).

  Attributes:
    a_eigvals: [p] eigenvalues of A (clipped at 0), a_eigvecs: [p, p] (columns).
    b_eigvals: [q], b_eigvecs: [q, q].
    pseudo_data_count: [] n, the GGN multiplier.
    prior_precision: [] λ.
  """

  a_eigvals: Array
  a_eigvecs: Array
  b_eigvals: Array
  b_eigvecs: Array
  pseudo_data_count: Array
  prior_precision: Array


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  arr = np.asarray(value, dtype=np.float64)
  if arr.shape != () or not np.isfinite(arr) or arr <= 0:
    raise ValueError(f"{name}={value}; expected a finite positive scalar")


def _psd_eigh(name: str, matrix: Array, psd_tol: float) -> tuple[Array, Array]:
  matrix = jnp.asarray(matrix)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
    raise ValueError(f"factor {name} has shape {matrix.shape}; expected a non-empty square matrix")
  if not jnp.issubdtype(matrix.dtype, jnp.floating):
    raise TypeError(f"factor {name} has dtype {matrix.dtype}; expected a floating dtype")
  eigvals, eigvecs = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
  if not isinstance(matrix, jax.core.Tracer):
    host = np.asarray(matrix, np.float64)
    if not np.all(np.isfinite(host)):
      raise ValueError(f"factor {name} has non-finite entries")
    asym = np.max(np.abs(host - host.T))
    size = max(np.max(np.abs(host)), np.finfo(np.float32).tiny)
    if asym > 1e-3 * size:
      raise ValueError(f"factor {name} is not symmetric (max |M − Mᵀ| = {asym:.3g} vs max |M| = {size:.3g})")
    lowest, highest = float(eigvals[0]), float(np.max(np.abs(np.asarray(eigvals))))
    if lowest < -psd_tol * max(highest, 1.0):
      raise ValueError(
        f"factor {name} is not positive semi-definite: smallest eigenvalue {lowest:.4g} "
        f"(largest |eigenvalue| {highest:.4g}, tolerance {psd_tol:g})"
      )
  return jnp.maximum(eigvals, 0.0), eigvecs


def check_factor_shapes(
  a: Array, b: Array, *, feature_dim: int, embed_dim: int, add_bias: bool = False
) -> None:
  """Raises ValueError unless A is [d_in (+1), d_in (+1)] and B is [D, D] for a projection d_in → D.

  Use it when factors come from a file, before pairing them with a model (e.g. image factors loaded for the
  text tower, or factors of a model with another width).
  """
  p = feature_dim + int(add_bias)
  a_shape, b_shape = tuple(jnp.shape(a)), tuple(jnp.shape(b))
  if a_shape != (p, p):
    raise ValueError(
      f"factor A has shape {a_shape}, but the projection takes {feature_dim} input features"
      f"{' plus a bias' if add_bias else ''}: expected ({p}, {p})"
    )
  if b_shape != (embed_dim, embed_dim):
    raise ValueError(
      f"factor B has shape {b_shape}, but the projection outputs {embed_dim}-dimensional embeddings: "
      f"expected ({embed_dim}, {embed_dim})"
    )


def posterior_from_factors(
  a: Array,
  b: Array,
  *,
  pseudo_data_count: float | Array = 1.0,
  prior_precision: float | Array = 1.0,
  psd_tol: float = 1e-4,
) -> KroneckerPosterior:
  """Eigendecomposes A [p, p] and B [q, q] (symmetrised; tiny negative eigenvalues from rounding clipped).

  Raises ValueError for non-square or non-PSD factors (smallest eigenvalue < −psd_tol·max(|eig|, 1)), and for
  n ≤ 0 or λ ≤ 0. Validation needs concrete arrays; under jit only the eigendecomposition runs.
  """
  _check_positive("pseudo_data_count", pseudo_data_count)
  _check_positive("prior_precision", prior_precision)
  a_eigvals, a_eigvecs = _psd_eigh("A", a, psd_tol)
  b_eigvals, b_eigvecs = _psd_eigh("B", b, psd_tol)
  dtype = a_eigvals.dtype
  return KroneckerPosterior(
    a_eigvals,
    a_eigvecs,
    b_eigvals,
    b_eigvecs,
    jnp.asarray(pseudo_data_count, dtype),
    jnp.asarray(prior_precision, dtype),
  )


def damped_eigvals(posterior: KroneckerPosterior) -> tuple[Array, Array]:
  """Eigenvalues of A' = √n·A + √λ·I [p] and B' = √n·B + √λ·I [q]."""
  sqrt_n = jnp.sqrt(posterior.pseudo_data_count)
  sqrt_lam = jnp.sqrt(posterior.prior_precision)
  return sqrt_n * posterior.a_eigvals + sqrt_lam, sqrt_n * posterior.b_eigvals + sqrt_lam


def log_determinants(posterior: KroneckerPosterior) -> tuple[Array, Array]:
  """(log|A'|, log|B'|) of the damped factors."""
  da, db = damped_eigvals(posterior)
  return jnp.sum(jnp.log(da)), jnp.sum(jnp.log(db))


def covariance_factors(posterior: KroneckerPosterior) -> tuple[Array, Array]:
  """Dense A'⁻¹ [p, p] and B'⁻¹ [q, q]; the weight covariance is kron(A'⁻¹, B'⁻¹) (row-major vec)."""
  da, db = damped_eigvals(posterior)
  a_inv = (posterior.a_eigvecs / da) @ posterior.a_eigvecs.T
  b_inv = (posterior.b_eigvecs / db) @ posterior.b_eigvecs.T
  return a_inv, b_inv


def check_features(posterior: KroneckerPosterior, features: Array, add_bias: bool) -> Array:
  """`features` [N, d_in] checked against the posterior's A factor and returned as [N, p] in its dtype (p =
  d_in, or d_in + 1 with a ones column appended when `add_bias`); ValueError naming the shapes otherwise.
  Shared by the Laplace and predictive functions."""
  features = jnp.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"features have shape {features.shape}; expected [N, d_in]")
  if add_bias:
    features = augment_features(features)
  p = posterior.a_eigvals.shape[0]
  if features.shape[1] != p:
    raise ValueError(
      f"features of dimension {features.shape[1]} (add_bias={add_bias}) do not match the posterior's "
      f"A factor of size {p}"
    )
  return features.astype(posterior.a_eigvecs.dtype)


def embedding_variance_factors(
  posterior: KroneckerPosterior, features: Array, *, add_bias: bool = False
) -> tuple[Array, Array]:
  """Cov(g) = (φᵀA'⁻¹φ)·B'⁻¹: returns (φᵀA'⁻¹φ [N], diag(B'⁻¹) [q]); the variance is their outer product.

  Costs one [N, p] @ [p, p] matmul; keeps the rank-one structure that `probcosine_moments_factored` exploits.
  """
  features = check_features(posterior, features, add_bias)
  da, db = damped_eigvals(posterior)
  # φᵀA'⁻¹φ = ‖φᵀ V diag(da)^-½‖²: whitening the small [p, p] matrix first lets the square-and-sum fuse.
  quad = jnp.sum(jnp.square(features @ (posterior.a_eigvecs * jax.lax.rsqrt(da))), axis=-1)
  b_diag = jnp.square(posterior.b_eigvecs) @ (1.0 / db)
  return quad, b_diag


def embedding_variance(posterior: KroneckerPosterior, features: Array, *, add_bias: bool = False) -> Array:
  """Diagonal of Cov(g) = (φᵀA'⁻¹φ)·B'⁻¹ for each input: [N, q]."""
  quad, b_diag = embedding_variance_factors(posterior, features, add_bias=add_bias)
  return quad[:, None] * b_diag[None, :]


# ------------------------------------------------------------------------------------------------------------
# Laplace evidence and the prior precision.
# ------------------------------------------------------------------------------------------------------------


def log_evidence(
  posterior: KroneckerPosterior,
  weight_sq_norm: Array | float,
  log_prior_precision: Array | float | None = None,
  *,
  mode: str = "corrected",
  num_params: int | None = None,
) -> Array:
  """Laplace log-evidence as a function of log λ, up to λ-independent terms. Jit- and grad-able in log λ.

  corrected: −½λ‖W‖² + ½·P·log λ − ½·(q·log|A'| + p·log|B'|)  (log|A'⊗B'| = q·log|A'| + p·log|B'|)
  faithful:  −½λ‖W‖² + ½·P·log λ −    (p·log|A'| + q·log|B'|)  (official code: no ½, multipliers swapped)
  A' = √n·A + √λ·I is p×p, B' is q×q, P = p·q (the official count of projection parameters).
  Their difference is exactly corrected − faithful = ½(2p − q)·log|A'| + ½(2q − p)·log|B'|.

  Args:
    posterior: eigendecomposed factors and n (its λ is used when `log_prior_precision` is None).
    weight_sq_norm: ‖W_MAP‖² of the projection (kernel and bias), see `projection_sq_norm`.
    log_prior_precision: log λ (scalar); None takes log(posterior.prior_precision).
    mode: "corrected" or "faithful".
    num_params: P; defaults to p·q.
  """
  if mode not in EVIDENCE_MODES:
    raise ValueError(f"mode={mode!r}; expected one of {EVIDENCE_MODES}")
  p, q = posterior.a_eigvals.shape[0], posterior.b_eigvals.shape[0]
  num_params = p * q if num_params is None else num_params
  if log_prior_precision is None:
    log_prior_precision = jnp.log(posterior.prior_precision)
  log_lam = jnp.asarray(log_prior_precision, posterior.a_eigvals.dtype)
  lam = jnp.exp(log_lam)
  logdet_a, logdet_b = log_determinants(posterior._replace(prior_precision=lam))
  log_prior = -0.5 * lam * weight_sq_norm + 0.5 * num_params * log_lam
  if mode == "corrected":
    return log_prior - 0.5 * (q * logdet_a + p * logdet_b)
  return log_prior - (p * logdet_a + q * logdet_b)


def fit_prior_precision(
  posterior: KroneckerPosterior,
  weight_sq_norm: Array | float,
  *,
  mode: str = "corrected",
  num_params: int | None = None,
  bounds: tuple[float, float] = (1e-10, 1e12),
  num_iters: int = 100,
  solver: str = "optimum",
) -> Array:
  """λ maximising `log_evidence` over log λ ∈ log(bounds), by bisection on its derivative.

  solver="optimum" (default) solves to the maximiser as below; solver="official_adam" reproduces the official
  BayesVLM fit instead: Adam (β = 0.9, 0.999, ε = 1e-8, maximising) on log λ from λ = 400, lr 1e-2, 300
  steps (`OFFICIAL_ADAM`), which on CLIP-sized factors stops 7-22x short of the optimum (DEVIATIONS.md).

  The evidence is concave in t = log λ (−½e^t‖W‖² is concave, ½·P·t linear, and each −log(√n·e + e^{t/2}) is
  concave), so its derivative is monotone and bisection finds the unique maximiser to float precision — robust
  where the official 300-500 Adam steps may stop short. When the maximiser lies outside `bounds` the nearer
  bound
  is returned. Jit-able given concrete validation arguments.

  Returns:
    [] the fitted λ (use `posterior._replace(prior_precision=lam)`).
  """
  if mode not in EVIDENCE_MODES:
    raise ValueError(f"mode={mode!r}; expected one of {EVIDENCE_MODES}")
  if solver not in LAMBDA_SOLVERS:
    raise ValueError(f"solver={solver!r}; expected one of {LAMBDA_SOLVERS}")
  _check_positive("weight_sq_norm", weight_sq_norm)
  if solver == "official_adam":
    return _official_adam_log_prior_precision(
      posterior, jnp.asarray(weight_sq_norm, posterior.a_eigvals.dtype), mode, num_params)
  lo, hi = bounds
  if not (0 < lo < hi and math.isfinite(hi)):
    raise ValueError(f"bounds={bounds}; expected 0 < low < high < inf")
  return _fit_log_prior_precision(
    posterior,
    jnp.asarray(weight_sq_norm, posterior.a_eigvals.dtype),
    math.log(lo),
    math.log(hi),
    mode,
    num_params,
    num_iters,
  )


@functools.partial(jax.jit, static_argnames=("mode", "num_params"))
def _official_adam_log_prior_precision(posterior, weight_sq_norm, mode, num_params):
  def negative_evidence(t):
    return -log_evidence(posterior, weight_sq_norm, t, mode=mode, num_params=num_params)

  # torch.optim.Adam's update with its defaults (β = 0.9, 0.999, ε = 1e-8), written out: bayes/ stays free of
  # optimizer libraries.
  beta1, beta2, lr = 0.9, 0.999, OFFICIAL_ADAM["lr"]
  t = jnp.log(jnp.asarray(OFFICIAL_ADAM["init"], posterior.a_eigvals.dtype))

  def body(step, carry):
    t, m, v = carry
    grad = jax.grad(negative_evidence)(t)
    m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad**2
    count = (step + 1).astype(t.dtype)
    m_hat, v_hat = m / (1 - beta1**count), v / (1 - beta2**count)
    return t - lr * m_hat / (jnp.sqrt(v_hat) + 1e-8), m, v

  zero = jnp.zeros_like(t)
  t, _, _ = jax.lax.fori_loop(0, OFFICIAL_ADAM["steps"], body, (t, zero, zero))
  return jnp.exp(t)


def _fit_log_prior_precision(posterior, weight_sq_norm, log_lo, log_hi, mode, num_params, num_iters):
  grad = jax.grad(lambda t: log_evidence(posterior, weight_sq_norm, t, mode=mode, num_params=num_params))

  def body(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    rising = grad(mid) > 0
    return jnp.where(rising, mid, lo), jnp.where(rising, hi, mid)

  dtype = posterior.a_eigvals.dtype
  lo, hi = jax.lax.fori_loop(0, num_iters, body, (jnp.asarray(log_lo, dtype), jnp.asarray(log_hi, dtype)))
  return jnp.exp(0.5 * (lo + hi))


# ------------------------------------------------------------------------------------------------------------
# Saving, loading and importing factors.
# ------------------------------------------------------------------------------------------------------------


def save_factors(
  directory: str | pathlib.Path, factors: Mapping[str, KFACFactors], info: Mapping[str, Any] | None = None
) -> pathlib.Path:
  """Writes factors (e.g. {"img": ..., "txt": ...}) and JSON metadata (n, λ, model name) with orbax.

  Every leaf is written as a host NumPy array: orbax's save is collective and writes NumPy arrays from
  process 0 only, so every process of a multi-host run can call this (a process-local jax.Array could not be
  saved there), and host arrays restore on any number of devices (a replicated global array's sharding would
  not).
  """
  import orbax.checkpoint as ocp  # Imported lazily: orbax is slow to import and only needed here.

  directory = pathlib.Path(directory).absolute()
  tree = {
    name: {"a": np.asarray(f.a), "b": np.asarray(f.b), "num_data": np.asarray(f.num_data, np.float32)}
    for name, f in factors.items()
  }
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(
    directory,
    ocp.args.Composite(factors=ocp.args.StandardSave(tree), info=ocp.args.JsonSave(dict(info or {}))),
    force=True,
  )
  return directory


def load_factors(directory: str | pathlib.Path) -> tuple[dict[str, KFACFactors], dict[str, Any]]:
  """Reads what `save_factors` wrote: ({name: KFACFactors}, info)."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"no factor checkpoint at {directory}")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = checkpointer.restore(
    directory, ocp.args.Composite(factors=ocp.args.StandardRestore(), info=ocp.args.JsonRestore())
  )
  factors = {
    name: KFACFactors(jnp.asarray(t["a"]), jnp.asarray(t["b"]), jnp.asarray(t["num_data"]))
    for name, t in restored["factors"].items()
  }
  return factors, dict(restored["info"] or {})


_OFFICIAL_TAGS = ("img", "txt")


# torch's legacy storage class names (still written by torch.save) -> NumPy dtypes.
_TORCH_STORAGE_DTYPES = {
  "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
  "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 on a NumPy storage: the strided view at `offset`, copied."""
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)


def read_torch_tensor(path: str | pathlib.Path) -> np.ndarray:
  """One tensor saved by `torch.save` (the zip format of torch >= 1.6, as the official factor files), read
  without torch and without running pickled code.

  The archive's `data.pkl` is unpickled with a restricted unpickler that resolves only the globals of a plain
  tensor (`torch._utils._rebuild_tensor_v2`, torch's `*Storage` types, `collections.OrderedDict`) and refuses
  every other one; storages are read from `data/<key>` in the archive's byte order.

  Raises:
    ValueError: not a torch zip archive, or it holds something other than one tensor of a known dtype.
    pickle.UnpicklingError: the pickle names any other global (e.g. a code-running payload).
  """
  path = pathlib.Path(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a torch.save zip archive (the legacy non-zip format is not supported)")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    has_order = prefix + "byteorder" in names
    byteorder = archive.read(prefix + "byteorder").decode().strip() if has_order else "little"
    if byteorder not in ("little", "big"):
      raise ValueError(f"{path}: unknown byte order {byteorder!r}")

    class _TensorUnpickler(pickle.Unpickler):
      def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
          return _rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
          return _TORCH_STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
          return collections.OrderedDict
        raise pickle.UnpicklingError(f"{path}: refusing the pickled global {module}.{name} "
                                     "(only plain tensors are read)")

      def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
          raise pickle.UnpicklingError(f"{path}: unknown persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        dtype = np.dtype(dtype).newbyteorder("<" if byteorder == "little" else ">")
        return np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype, count=int(numel))

    tensor = _TensorUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
  if not isinstance(tensor, np.ndarray):
    raise ValueError(f"{path}: expected one tensor, got {type(tensor).__name__}")
  return tensor.astype(tensor.dtype.newbyteorder("="))


def import_official_factors(directory: str | pathlib.Path) -> tuple[dict[str, KFACFactors], dict[str, Any]]:
  """Imports the official BayesVLM repository's factor files.

  Reads `A_img[_analytic].pt`, `B_img[_analytic].pt`, `A_txt[_analytic].pt`, `B_txt[_analytic].pt` (torch
  tensors, already divided by √N; A over the projection input, B over the embedding, as here) and
  `prior_precision[_analytic].json` (keys `lambda_img`, `n_img`, `lambda_txt`, `n_txt`). The .pt files are
  read by `read_torch_tensor`: no torch needed, and no pickled code runs. N is not stored in those files:
  `num_data` is NaN.

  Returns:
    ({"img": KFACFactors, "txt": KFACFactors}, info dict from the json, {} if absent).
  """
  directory = pathlib.Path(directory)

  def find(stem: str) -> pathlib.Path:
    for name in (f"{stem}_analytic.pt", f"{stem}.pt"):
      if (directory / name).is_file():
        return directory / name
    raise FileNotFoundError(f"neither {stem}_analytic.pt nor {stem}.pt in {directory}")

  def load(stem: str) -> Array:
    return jnp.asarray(read_torch_tensor(find(stem)).astype(np.float32))

  factors = {
    tag: KFACFactors(load(f"A_{tag}"), load(f"B_{tag}"), jnp.asarray(jnp.nan, jnp.float32))
    for tag in _OFFICIAL_TAGS
  }
  info: dict[str, Any] = {}
  for name in ("prior_precision_analytic.json", "prior_precision.json"):
    if (directory / name).is_file():
      info = json.loads((directory / name).read_text())
      break
  return factors, info
