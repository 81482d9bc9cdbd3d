"""Post-hoc Laplace over a prompt learner's trainable parameters, with the linearised (GLM) predictive.

Pure functions over (params, apply function, data); only jax / numpy. The model is

  apply_fn(params, inputs, key, context) -> logits [B, C]      (softmax likelihood, labels [B] int)

`inputs` is any pytree whose leaves share the leading batch axis B (images, or cached frozen image features);
`key` is a PRNG key the function may ignore (deterministic learners) or use for its own Monte Carlo draw
(VPT / VaMP sample their prompts: one draw per call); `context` is any pytree of constants the function
reads (the frozen CLIP, the class list), passed as a traced argument so that jit never bakes large arrays into
the program as constants. θ is the flattened params (`ravel_pytree`), P entries.

The posterior is N(θ*, (G + λI)⁻¹) with G the generalised Gauss-Newton matrix of the summed cross-entropy
over the N fitting examples, G = Σ_i J_iᵀ Λ_i J_i, J_i = ∂f(x_i)/∂θ [C, P], Λ_i = diag(p_i) − p_i p_iᵀ:
* "full": G as a dense [P, P] matrix from forward-mode Jacobians (P tangents per chunk of data; for CoOp the
  Jacobian of the logits only costs P forwards of the text tower over the C class prompts, because the image
  side does not depend on θ). Stored through its eigendecomposition, so refitting λ is O(P).
* "diag": the diagonal of G, estimated without Jacobians: for each example draw y_i ~ Cat(p_i) and take the
  per-example gradient g_i = J_iᵀ(p_i − e_{y_i}); E[g_i g_iᵀ] = J_iᵀ Λ_i J_i, so Σ_i g_i² is an unbiased
  estimate of diag(G) whose noise falls like 1/√N (`num_label_samples` draws per example average it further).
  One per-example gradient per example: about one training epoch.
Stochastic learners: G is averaged over `num_model_samples` draws of the learner's own noise (E_ε[G(ε)]).
* `fit_shared_text` (fast path, same G as "full"): for logits s·f·t(θ)ᵀ + b whose class text features t [C, D]
  do not depend on the image (CoOp), the text Jacobian T′ [C, D, P] is computed once per class list, one class
  at a time (D vjps or P jvps per class, whichever is fewer), and G and the exact predictive moments follow
  by einsums over the image features (see the last section). `rank=r` takes each class's Jacobian only along
  the r directions of the image features its GGN block weighs most (`feature_subspace`): r vjps per class,
  the GGN of f_n projected per class (exact at r = D; sandbox CoOp, r = 8: 0.9 of a training epoch, G within
  15% (Frobenius), predictive within the Monte Carlo noise of the exact one; benchmarks/RESULTS.md).

The prior is N(θ₀, λ⁻¹I); λ maximises the Laplace evidence
  log Z(λ) = log p(D | θ*) − ½λ‖θ* − θ₀‖² + ½P·log λ − ½ Σ_k log(g_k + λ)
(g_k: eigenvalues of G, or its diagonal), which is concave in log λ, so bisection on its derivative finds the
maximiser. For a linear-Gaussian model this is the exact log marginal likelihood (tests check that).
`prior_groups="leaves"` ("diag" only): one λ_g per params leaf, prior N(θ₀, diag(λ_{g(k)})⁻¹). With a diagonal
G the evidence separates over groups, each term concave in log λ_g, so all the λ_g are bisected at once. Why:
a learner whose leaves live on different scales (VaMP: 0.02-scale vision prompts next to MLP weights and
biases) gets from one shared λ the prior variance of its largest-scale leaf everywhere, a posterior far wider
than its small leaves can bear.

Linearised predictive, f_lin(x) = f(θ*, x) + J(x)(θ − θ*), θ ~ N(θ*, Σ):
* `glm_logit_moments`: exact mean f(θ*, x) [B, C], covariance J Σ Jᵀ [B, C, C] from the explicit Jacobian
  (P forward tangents), for the probit approximation softmax(μ/√(1 + π/8·σ²)) or exact joint samples.
* `glm_logit_samples`: S samples f(θ*, x; ε_s) + J_s δ_s with δ_s ~ N(0, Σ) by one jvp each (vmap-ed over
  s; no Jacobian, any P); for stochastic learners each sample also uses the learner's own draw ε_s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Array = jax.Array
ApplyFn = Callable[[Any, Any, Array, Any], Array]
KINDS = ("full", "diag")
PREDICTIVES = ("probit", "mc")
PRIOR_GROUPS = ("one", "leaves")


class PromptLaplace(NamedTuple):
  """Laplace posterior N(mean, (G + λI)⁻¹) over flattened params (a pytree: jit / vmap friendly).

  Attributes:
    mean: [P] θ* (float32), the trained params flattened with `ravel_pytree`.
    prior_mean: [P] θ₀.
    ggn_eigvals: [P] eigenvalues of G ("full") or its diagonal ("diag"), clipped at 0.
    ggn_eigvecs: [P, P] eigenvectors of G (columns) for "full"; None for "diag".
    prior_precision: [] λ > 0, or [P] per-entry λ ("diag" only; `fit_prior_precision_groups`).
  """

  mean: Array
  prior_mean: Array
  ggn_eigvals: Array
  ggn_eigvecs: Array | None
  prior_precision: Array

  @property
  def kind(self) -> str:
    return "diag" if self.ggn_eigvecs is None else "full"

  @property
  def num_params(self) -> int:
    return int(self.mean.shape[0])


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {KINDS}")


def _batch_size(inputs: Any) -> int:
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("inputs has no arrays: expected a pytree of arrays with a leading batch axis")
  sizes = {int(np.shape(leaf)[0]) for leaf in leaves}
  if len(sizes) != 1:
    raise ValueError(f"inputs' leaves disagree on the batch size: {sorted(sizes)}")
  return sizes.pop()


def _chunks(inputs: Any, labels: Array | None, chunk_size: int | None):
  """Yields (start, inputs chunk, labels chunk) slices of at most chunk_size examples."""
  total = _batch_size(inputs)
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f"chunk_size={chunk_size}; expected a positive integer or None")
  step = total if chunk_size is None else chunk_size
  for start in range(0, total, step):
    piece = jax.tree.map(lambda x, s=start: x[s:s + step], inputs)
    yield start, piece, None if labels is None else labels[start:start + step]


def _check_labels(labels: Array, inputs: Any) -> Array:
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != _batch_size(inputs):
    raise ValueError(f"labels have shape {labels.shape}; expected [{_batch_size(inputs)}] (one per input)")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels have dtype {labels.dtype}; expected integer class indices")
  return labels.astype(jnp.int32)


# ------------------------------------------------------------------------------------------------------------
# Jacobians and the GGN.
# ------------------------------------------------------------------------------------------------------------


def flat_apply(apply_fn: ApplyFn, params: Any) -> tuple[Array, Callable[[Array, Any, Array, Any], Array]]:
  """(θ* [P] float32, f(θ, inputs, key, context)) with f taking the flattened params (traceable: call it inside jit
  with a stable `apply_fn`, which the jitted functions here take as a static argument)."""
  flat, unravel = ravel_pytree(params)
  if flat.size == 0:
    raise ValueError("params have no entries: nothing to put a Laplace posterior on")
  if not jnp.issubdtype(flat.dtype, jnp.floating):
    raise TypeError(f"params flatten to dtype {flat.dtype}; expected floating-point parameters")
  return flat, lambda theta, inputs, key, context: apply_fn(unravel(theta), inputs, key, context)


@functools.partial(jax.jit, static_argnames=("apply_fn", "tangent_chunk"))
def logits_and_jacobian(apply_fn: ApplyFn, params: Any, inputs: Any, key: Array, context: Any = None, *,
                        tangent_chunk: int | None = None) -> tuple[Array, Array]:
  """f(θ, inputs) [B, C] and its Jacobian ∂f/∂θ [B, C, P] (θ = flattened params) by forward mode: P tangents,
  `tangent_chunk` at a time under lax.map (None: all at once)."""
  theta, fn = flat_apply(apply_fn, params)
  logits, linear = jax.linearize(lambda t: fn(t, inputs, key, context), theta)
  num = theta.shape[0]
  eye = jnp.eye(num, dtype=theta.dtype)
  if tangent_chunk is None or tangent_chunk >= num:
    jac = jax.vmap(linear, out_axes=-1)(eye)
  else:
    pad = (-num) % tangent_chunk
    basis = jnp.concatenate([eye, jnp.zeros((pad, num), theta.dtype)]).reshape(-1, tangent_chunk, num)
    cols = jax.lax.map(jax.vmap(linear, out_axes=-1), basis)  # [K, B, C, chunk]
    jac = jnp.moveaxis(cols, 0, -2).reshape(*logits.shape, -1)[..., :num]
  return logits, jac


def ggn_from_jacobian(logits: Array, jac: Array) -> Array:
  """Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i [P, P] from logits [B, C] and Jacobians [B, C, P]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  jp = jnp.einsum("bcp,bc->bp", jac, probs)  # J_iᵀ p_i
  flat = jac.reshape(-1, jac.shape[-1])
  return (flat * probs.reshape(-1, 1)).T @ flat - jp.T @ jp


def _model_keys(key: Array, num_model_samples: int) -> Array:
  if num_model_samples <= 0:
    raise ValueError(f"num_model_samples={num_model_samples}; expected a positive integer")
  return jax.random.split(key, num_model_samples)


def ggn_full(apply_fn: ApplyFn, params: Any, inputs: Any, key: Array | None = None, context: Any = None, *,
             chunk_size: int | None = None, num_model_samples: int = 1,
             tangent_chunk: int | None = None) -> tuple[Array, Array]:
  """Dense GGN of the summed cross-entropy [P, P] (averaged over the learner's own draws) and the logits
  [N, C] at θ* (the first draw), from forward-mode Jacobians over chunks of `chunk_size` inputs."""
  theta, _ = flat_apply(apply_fn, params)
  keys = _model_keys(jax.random.key(0) if key is None else key, num_model_samples)
  ggn = jnp.zeros((theta.size, theta.size), jnp.float32)
  logits_out = []
  for _, piece, _ in _chunks(inputs, None, chunk_size):
    for s in range(num_model_samples):
      logits, jac = logits_and_jacobian(apply_fn, params, piece, keys[s], context, tangent_chunk=tangent_chunk)
      ggn = ggn + ggn_from_jacobian(logits, jac) / num_model_samples
      if s == 0:
        logits_out.append(logits)
  return ggn, jnp.concatenate(logits_out)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_label_samples"))
def _sampled_diagonal(apply_fn, params, inputs, key, context, *, num_label_samples):
  """(Σ_i mean_m g_im² [P] with g_im = ∇_θ CE(f(θ, x_i), y_im), y_im ~ Cat(p_i), one example at a time; the
  examples' logits f(θ, x_i) [B, C] of the same forward passes)."""
  theta, fn = flat_apply(apply_fn, params)
  batch = _batch_size(inputs)
  model_key, label_key = jax.random.split(key)
  example_keys = jax.random.split(model_key, batch)
  label_keys = jax.random.split(label_key, batch)

  def one(example, model_k, label_k):
    single = jax.tree.map(lambda x: x[None], example)
    logits, vjp = jax.vjp(lambda t: fn(t, single, model_k, context)[0], theta)
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    labels = jax.random.categorical(label_k, jnp.log(probs), shape=(num_label_samples,))
    residuals = probs[None] - jax.nn.one_hot(labels, probs.shape[0])  # [M, C], covariance Λ_i
    # One label draw after the other: cotangents vmap-ed inside the vmap over examples can come out wrong on
    # jax 0.10.2 (see shared_text_jacobian).
    grads = jax.lax.map(lambda r: vjp(r.astype(logits.dtype))[0], residuals)  # [M, P]
    return jnp.mean(jnp.square(grads), axis=0), logits

  squares, logits = jax.vmap(one)(inputs, example_keys, label_keys)
  return jnp.sum(squares, axis=0), logits


def ggn_diagonal(apply_fn: ApplyFn, params: Any, inputs: Any, key: Array, context: Any = None, *,
                 chunk_size: int | None = 64, num_label_samples: int = 1) -> Array:
  """Unbiased estimate of diag(G) [P] from sampled-label per-example gradients (see the module docstring).

  For a stochastic learner each example also gets its own draw of the learner's noise, so the estimate is
  unbiased for E_ε[diag G(ε)]."""
  return _diagonal_and_logits(apply_fn, params, inputs, key, context, chunk_size=chunk_size,
                              num_label_samples=num_label_samples)[0]


def _diagonal_and_logits(apply_fn, params, inputs, key, context, *, chunk_size, num_label_samples):
  """`ggn_diagonal` and the logits [N, C] of its forward passes (each example with its own draw of a stochastic
  learner's noise): `fit` needs both, and a second forward pass over the data cost 0.2 of a VaMP epoch."""
  if num_label_samples <= 0:
    raise ValueError(f"num_label_samples={num_label_samples}; expected a positive integer")
  theta, _ = flat_apply(apply_fn, params)
  total, logits = jnp.zeros_like(theta), []
  for start, piece, _ in _chunks(inputs, None, chunk_size):
    squares, piece_logits = _sampled_diagonal(apply_fn, params, piece, jax.random.fold_in(key, start), context,
                                              num_label_samples=num_label_samples)
    total = total + squares
    logits.append(piece_logits)
  return total, jnp.concatenate(logits)


# ------------------------------------------------------------------------------------------------------------
# Posterior, evidence, prior precision.
# ------------------------------------------------------------------------------------------------------------


def posterior_from_ggn(mean: Array, ggn: Array, *, prior_precision: float | Array = 1.0,
                       prior_mean: Array | None = None, psd_tol: float = 1e-4) -> PromptLaplace:
  """The posterior from θ* [P] and G: [P, P] (full) or [P] (its diagonal, "diag"); λ: [] or, with a diagonal G,
  [P] (one precision per entry).

  Raises ValueError for shapes that do not match, non-finite entries, a G that is not PSD (smallest
  eigenvalue < −psd_tol·max|eig|) or λ ≤ 0."""
  mean = jnp.asarray(mean, jnp.float32)
  if mean.ndim != 1:
    raise ValueError(f"mean has shape {mean.shape}; expected flat params [P]")
  num = mean.shape[0]
  ggn = jnp.asarray(ggn, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(ggn))):
    raise ValueError("the GGN has non-finite entries")
  if ggn.shape == (num, num):
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (ggn + ggn.T))
  elif ggn.shape == (num,):
    eigvals, eigvecs = ggn, None
  else:
    raise ValueError(f"ggn has shape {ggn.shape}; expected [{num}, {num}] (full) or [{num}] (diagonal)")
  lowest, scale = float(jnp.min(eigvals)), float(jnp.max(jnp.abs(eigvals)))
  if lowest < -psd_tol * max(scale, 1e-30):
    raise ValueError(f"the GGN is not positive semi-definite: smallest eigenvalue {lowest:.4g} "
                     f"(largest |eigenvalue| {scale:.4g})")
  prior_mean = jnp.zeros_like(mean) if prior_mean is None else jnp.asarray(prior_mean, jnp.float32)
  if prior_mean.shape != mean.shape:
    raise ValueError(f"prior_mean has shape {prior_mean.shape}; expected {mean.shape}")
  lam = np.asarray(prior_precision, np.float32)
  if lam.ndim == 1 and eigvecs is not None:
    raise ValueError("a per-entry prior_precision [P] needs a diagonal GGN: G + diag(λ) does not share G's "
                     "eigenvectors")
  if lam.shape not in ((), (num,)):
    raise ValueError(f"prior_precision has shape {lam.shape}; expected a scalar or [{num}]")
  if not (np.all(np.isfinite(lam)) and np.all(lam > 0)):
    bad = lam if lam.ndim == 0 else lam[~(np.isfinite(lam) & (lam > 0))][:3]
    raise ValueError(f"prior_precision={bad}; expected a finite λ > 0")
  return PromptLaplace(mean, prior_mean, jnp.maximum(eigvals, 0.0), eigvecs, jnp.asarray(lam))


def log_marginal_likelihood(posterior: PromptLaplace, log_likelihood: Array | float,
                            log_prior_precision: Array | float | None = None) -> Array:
  """Laplace log evidence log p(D|θ*) − ½λ‖θ*−θ₀‖² + ½P·log λ − ½Σ_k log(g_k + λ) at log λ (default: the
  posterior's λ); a per-entry log λ [P] ("diag") gives −½Σ_k λ_k(θ*_k−θ₀_k)² + ½Σ_k log λ_k − ½Σ_k log(g_k + λ_k).
  Jit- and grad-able in log λ."""
  if log_prior_precision is None:
    log_prior_precision = jnp.log(posterior.prior_precision)
  log_lam = jnp.asarray(log_prior_precision, jnp.float32)
  lam = jnp.exp(log_lam)
  if log_lam.ndim == 1:
    sq_entries = jnp.square(posterior.mean - posterior.prior_mean)
    return (log_likelihood - 0.5 * jnp.sum(lam * sq_entries) + 0.5 * jnp.sum(log_lam)
            - 0.5 * jnp.sum(jnp.log(posterior.ggn_eigvals + lam)))
  sq = jnp.sum(jnp.square(posterior.mean - posterior.prior_mean))
  return (log_likelihood - 0.5 * lam * sq + 0.5 * posterior.mean.shape[0] * log_lam
          - 0.5 * jnp.sum(jnp.log(posterior.ggn_eigvals + lam)))


def fit_prior_precision(posterior: PromptLaplace, *, bounds: tuple[float, float] = (1e-8, 1e10),
                        num_iters: int = 80) -> PromptLaplace:
  """The posterior with λ maximising `log_marginal_likelihood` (concave in log λ: bisection on its
  derivative). A maximiser outside `bounds` returns the nearer bound."""
  lo, hi = _check_bounds(bounds)
  # One group holding every entry: Σ_k g_k/(g_k + λ) and ‖θ* − θ₀‖² do not depend on the basis, so the
  # per-group derivative is the full GGN's too.
  lam = _bisect_group_log_lambdas(posterior, jnp.zeros(posterior.mean.shape, jnp.int32), lo, hi, 1, num_iters)
  return posterior._replace(prior_precision=lam[0])


def _check_bounds(bounds: tuple[float, float]) -> tuple[Array, Array]:
  lo, hi = bounds
  if not (0 < lo < hi and math.isfinite(hi)):
    raise ValueError(f"bounds={bounds}; expected 0 < low < high < inf")
  return jnp.float32(math.log(lo)), jnp.float32(math.log(hi))


def leaf_groups(params: Any) -> tuple[np.ndarray, list[str]]:
  """The group of every flat entry of `params` (in `ravel_pytree` order), one group per leaf: (ids [P] int32,
  the leaves' path names)."""
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [jax.tree_util.keystr(path) for path, _ in with_paths]
  sizes = [int(np.size(leaf)) for _, leaf in with_paths]
  return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes), names


@functools.partial(jax.jit, static_argnames=("num_groups", "num_iters"))
def _bisect_group_log_lambdas(posterior, group_ids, log_lo, log_hi, num_groups, num_iters):
  sq = jnp.square(posterior.mean - posterior.prior_mean)
  eig = posterior.ggn_eigvals

  # ∂ log Z / ∂ log λ_g [G]: Σ_{k∈g} ½·g_k/(g_k + λ_g) − ½λ_g(θ*_k − θ₀_k)² (g_k: G's diagonal, or with one
  # group its eigenvalues)
  def grad(log_lam):
    lam = jnp.exp(log_lam)[group_ids]
    return jax.ops.segment_sum(0.5 * eig / (eig + lam) - 0.5 * lam * sq, group_ids, num_groups)

  def body(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    rising = grad(mid) > 0
    return jnp.where(rising, mid, lo), jnp.where(rising, hi, mid)

  start = (jnp.full((num_groups,), log_lo), jnp.full((num_groups,), log_hi))
  lo, hi = jax.lax.fori_loop(0, num_iters, body, start)
  return jnp.exp(0.5 * (lo + hi))


def fit_prior_precision_groups(posterior: PromptLaplace, group_ids: Array | np.ndarray, *,
                               bounds: tuple[float, float] = (1e-8, 1e10),
                               num_iters: int = 80) -> tuple[PromptLaplace, np.ndarray]:
  """One λ_g per group (group_ids [P] in 0..G−1, e.g. `leaf_groups`), each maximising the evidence; "diag"
  posteriors only (with a diagonal G the evidence is a sum of per-group terms, each concave in log λ_g).
  Returns (the posterior with the per-entry λ [P], λ per group [G]). A group whose θ* equals θ₀ gets the upper
  bound (its evidence rises with λ without end: a point mass at the prior); a group with zero curvature
  everywhere (parameters the fitting logits never read, e.g. VaMP's prior network) gets the lower bound (its
  evidence falls with λ: a flat prior), which is harmless only if the predictive never reads them either."""
  if posterior.ggn_eigvecs is not None:
    raise ValueError("per-group prior precisions need a diagonal GGN (kind='diag'): G + diag(λ) does not "
                     "share G's eigenvectors")
  ids = np.asarray(group_ids)
  if ids.shape != posterior.mean.shape or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
    raise ValueError(f"group_ids have shape {ids.shape} and dtype {ids.dtype}; expected non-negative integers "
                     f"of shape {posterior.mean.shape}")
  lo, hi = _check_bounds(bounds)
  num_groups = int(ids.max()) + 1
  lams = _bisect_group_log_lambdas(posterior, jnp.asarray(ids, jnp.int32), lo, hi, num_groups, num_iters)
  return posterior._replace(prior_precision=lams[jnp.asarray(ids)]), np.asarray(lams)


def log_likelihood(logits: Array, labels: Array) -> Array:
  """Σ_i log softmax(logits_i)[y_i] of logits [N, C], labels [N]."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1))


def fit(apply_fn: ApplyFn, params: Any, inputs: Any, labels: Array, key: Array, context: Any = None, *,
        kind: str = "full",
        prior_precision: float | str = "fit", prior_mean: Any = None, chunk_size: int | None = None,
        num_model_samples: int = 1, num_label_samples: int = 1,
        tangent_chunk: int | None = None, prior_groups: str = "one") -> tuple[PromptLaplace, dict[str, Any]]:
  """Laplace over `params` from the fitting data (inputs, labels [N]).

  Args:
    kind: "full" (dense GGN, Jacobians) or "diag" (sampled-label diagonal).
    prior_precision: λ > 0, or "fit" (maximise the evidence).
    prior_groups: "one" (one λ) or "leaves" (one fitted λ per params leaf; kind "diag" and "fit" only):
      info["prior_precision"] is then {leaf path: λ}.
    prior_mean: params pytree θ₀ (None: zeros, the prior of the weight decay the learners train with).
    chunk_size: examples per Jacobian / gradient batch (None: all; "diag" defaults to 64 when None).
    num_model_samples: draws of a stochastic learner's noise averaged into the full GGN.
  Returns:
    (posterior, {"prior_precision", "log_likelihood", "log_marginal_likelihood"}).
  """
  _check_kind(kind)
  labels = _check_labels(labels, inputs)
  _check_prior_precision(prior_precision)
  _check_prior_groups(prior_groups, kind, prior_precision)
  if kind == "full":
    ggn, logits = ggn_full(apply_fn, params, inputs, key, context, chunk_size=chunk_size,
                           num_model_samples=num_model_samples, tangent_chunk=tangent_chunk)
  else:
    ggn, logits = _diagonal_and_logits(apply_fn, params, inputs, key, context, chunk_size=chunk_size or 64,
                                       num_label_samples=num_label_samples)
  return _posterior_and_info(params, ggn, logits, labels, kind, prior_precision, prior_mean, prior_groups)


def _check_prior_groups(prior_groups: str, kind: str, prior_precision: float | str) -> None:
  if prior_groups not in PRIOR_GROUPS:
    raise ValueError(f"prior_groups={prior_groups!r}; expected one of {PRIOR_GROUPS}")
  if prior_groups == "leaves" and (kind != "diag" or prior_precision != "fit"):
    raise ValueError(f"prior_groups='leaves' needs kind='diag' and prior_precision='fit' (got kind={kind!r}, "
                     f"prior_precision={prior_precision!r}): a per-leaf λ is fitted, and G + diag(λ) shares "
                     "eigenvectors with G only when G is diagonal")


def _check_prior_precision(prior_precision: float | str) -> None:
  if isinstance(prior_precision, str) and prior_precision != "fit":
    raise ValueError(f"prior_precision={prior_precision!r}; expected a positive number or 'fit'")


def _posterior_and_info(params: Any, ggn: Array, logits: Array, labels: Array, kind: str,
                        prior_precision: float | str, prior_mean: Any,
                        prior_groups: str = "one") -> tuple[PromptLaplace, dict[str, Any]]:
  """The posterior from G ([P, P] or [P]) and the fitting logits [N, C]: λ fixed or fitted, and its info."""
  theta = ravel_pytree(params)[0]
  flat_prior = None if prior_mean is None else ravel_pytree(prior_mean)[0]
  lam0 = 1.0 if prior_precision == "fit" else prior_precision
  posterior = posterior_from_ggn(theta, ggn, prior_precision=lam0, prior_mean=flat_prior)
  group_lams = None
  if prior_groups == "leaves":
    group_ids, names = leaf_groups(params)
    posterior, lams = fit_prior_precision_groups(posterior, group_ids)
    group_lams = {name: float(lam) for name, lam in zip(names, lams, strict=True)}
  elif prior_precision == "fit":
    posterior = fit_prior_precision(posterior)
  loglik = log_likelihood(logits, labels)
  info = {"prior_precision": group_lams or float(posterior.prior_precision), "log_likelihood": float(loglik),
          "log_marginal_likelihood": float(log_marginal_likelihood(posterior, loglik)),
          "num_params": posterior.num_params, "kind": kind}
  return posterior, info


# ------------------------------------------------------------------------------------------------------------
# Linearised predictive.
# ------------------------------------------------------------------------------------------------------------


def _posterior_scale(posterior: PromptLaplace) -> Array:
  """(g + λ)^-½ [P]: Σ = V diag(scale²) Vᵀ (full) or diag(scale²)."""
  return jax.lax.rsqrt(posterior.ggn_eigvals + posterior.prior_precision)


def covariance(posterior: PromptLaplace) -> Array:
  """The dense posterior covariance Σ [P, P] (for tests and small P)."""
  scale = _posterior_scale(posterior)
  if posterior.ggn_eigvecs is None:
    return jnp.diag(jnp.square(scale))
  return (posterior.ggn_eigvecs * jnp.square(scale)) @ posterior.ggn_eigvecs.T


def sample_perturbations(posterior: PromptLaplace, key: Array, num_samples: int) -> Array:
  """δ_s ~ N(0, Σ): [S, P]."""
  eps = jax.random.normal(key, (num_samples, posterior.mean.shape[0]), jnp.float32)
  scaled = eps * _posterior_scale(posterior)
  return scaled if posterior.ggn_eigvecs is None else scaled @ posterior.ggn_eigvecs.T


def _at_mean(params: Any, posterior: PromptLaplace) -> Any:
  """The params pytree holding the posterior mean (traceable)."""
  flat, unravel = ravel_pytree(params)
  if flat.shape != posterior.mean.shape:
    raise ValueError(f"params flatten to {flat.shape[0]} entries but the posterior has {posterior.mean.shape[0]}")
  return unravel(posterior.mean)


@functools.partial(jax.jit, static_argnames=("apply_fn", "tangent_chunk"))
def _glm_moments(apply_fn, params, posterior, inputs, key, context, tangent_chunk):
  logits, jac = logits_and_jacobian(apply_fn, _at_mean(params, posterior), inputs, key, context,
                                    tangent_chunk=tangent_chunk)
  scale = _posterior_scale(posterior)
  # J Σ Jᵀ = (J L)(J L)ᵀ with L = V diag(scale) (or diag(scale)).
  jl = (jac if posterior.ggn_eigvecs is None else jac @ posterior.ggn_eigvecs) * scale
  return logits, jnp.einsum("bcp,bdp->bcd", jl, jl), jl


def glm_logit_moments(apply_fn: ApplyFn, params: Any, posterior: PromptLaplace, inputs: Any,
                      key: Array | None = None, context: Any = None, *,
                      tangent_chunk: int | None = None) -> tuple[Array, Array]:
  """Mean f(θ*, x) [B, C] and covariance J Σ Jᵀ [B, C, C] of the linearised logits (explicit Jacobian).

  `params` only gives the pytree structure (the posterior's mean is the linearisation point)."""
  mean, cov, _ = _glm_moments(apply_fn, params, posterior, inputs, jax.random.key(0) if key is None else key,
                              context, tangent_chunk)
  return mean, cov


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_samples", "sample_chunk"))
def _glm_samples(apply_fn, params, posterior, inputs, key, context, num_samples, sample_chunk=None):
  _, fn = flat_apply(apply_fn, params)
  model_key, param_key = jax.random.split(key)
  deltas = sample_perturbations(posterior, param_key, num_samples)
  model_keys = jax.random.split(model_key, num_samples)

  def one(pair):  # f(θ*; ε_s) + J_s δ_s by one jvp
    delta, model_k = pair
    primal, tangent = jax.jvp(lambda t: fn(t, inputs, model_k, context), (posterior.mean,), (delta,))
    return primal + tangent

  if sample_chunk is None or sample_chunk >= num_samples:
    return jax.vmap(one)((deltas, model_keys))
  return jax.lax.map(one, (deltas, model_keys), batch_size=sample_chunk)


def glm_logit_samples(apply_fn: ApplyFn, params: Any, posterior: PromptLaplace, inputs: Any, key: Array,
                      num_samples: int, context: Any = None, *, sample_chunk: int | None = None) -> Array:
  """Samples of the linearised logits [S, B, C], one jvp each (vmap-ed), no Jacobian: any number of params.

  A stochastic learner's own noise is drawn afresh for every sample (its key is split from `key`).
  sample_chunk: samples vmap-ed at once (memory: a sample costs one forward of the batch; None: all)."""
  if num_samples <= 0:
    raise ValueError(f"num_samples={num_samples}; expected a positive integer")
  if sample_chunk is not None and sample_chunk <= 0:
    raise ValueError(f"sample_chunk={sample_chunk}; expected a positive integer or None")
  return _glm_samples(apply_fn, params, posterior, inputs, key, context, num_samples, sample_chunk)


def probit_from_moments(mean: Array, cov: Array) -> Array:
  """Probit predictive softmax(μ/√(1 + π/8·σ²)) [B, C] from logit mean [B, C] and covariance [B, C, C]."""
  return probit_from_variances(mean, jnp.diagonal(cov, axis1=-2, axis2=-1))


def probit_from_variances(mean: Array, var: Array) -> Array:
  """softmax(μ/√(1 + π/8·σ²)) [B, C] from logit means and variances [B, C]."""
  return jax.nn.softmax(mean * jax.lax.rsqrt(1.0 + (math.pi / 8.0) * var), axis=-1)


def mean_softmax(logit_samples: Array) -> Array:
  """(1/S) Σ_s softmax(logits_s) [B, C] from [S, B, C], computed as exp(logsumexp − log S)."""
  log_probs = jax.nn.log_softmax(logit_samples.astype(jnp.float32), axis=-1)
  return jnp.exp(jax.nn.logsumexp(log_probs, axis=0) - math.log(logit_samples.shape[0]))


@functools.partial(jax.jit, static_argnames=("num_samples", "chunk_size"))
def mc_from_moments(key: Array, mean: Array, cov_root: Array, num_samples: int, chunk_size: int = 100) -> Array:
  """Monte Carlo predictive with exact joint logits: (1/S) Σ_s softmax(μ + R ε_s), R [B, C, P] a root of the
  covariance (R Rᵀ = J Σ Jᵀ), ε_s ~ N(0, I_P). Samples vmap-ed in chunks of `chunk_size`."""
  chunk = min(chunk_size, num_samples)
  num_chunks = -(-num_samples // chunk)
  keys = jax.random.split(key, num_chunks * chunk).reshape(num_chunks, chunk)
  valid = (jnp.arange(num_chunks * chunk) < num_samples).reshape(num_chunks, chunk)

  def one(k):
    eps = jax.random.normal(k, cov_root.shape[-1:], jnp.float32)
    return jax.nn.softmax(mean + cov_root @ eps, axis=-1)

  def body(total, xs):
    ks, mask = xs
    probs = jax.vmap(one)(ks)
    return total + jnp.sum(probs * mask[:, None, None], axis=0), None

  total, _ = jax.lax.scan(body, jnp.zeros(mean.shape, jnp.float32), (keys, valid))
  return total / num_samples


def glm_predictive(apply_fn: ApplyFn, params: Any, posterior: PromptLaplace, inputs: Any, key: Array,
                   context: Any = None, *,
                   method: str = "probit", num_samples: int = 100, use_jacobian: bool | None = None,
                   tangent_chunk: int | None = None, sample_chunk: int | None = None) -> Array:
  """Linearised predictive probabilities [B, C].

  With the Jacobian (default for a full posterior): probit from the exact logit variances, or MC with exact
  joint draws. Without it (default for "diag"): `num_samples` jvp samples; "mc" averages their softmax,
  "probit" applies the probit to their empirical mean and variance."""
  if method not in PREDICTIVES:
    raise ValueError(f"method={method!r}; expected one of {PREDICTIVES}")
  use_jacobian = posterior.kind == "full" if use_jacobian is None else use_jacobian
  if use_jacobian:
    mean, cov, root = _glm_moments(apply_fn, params, posterior, inputs, key, context, tangent_chunk)
    if method == "probit":
      return probit_from_moments(mean, cov)
    return mc_from_moments(jax.random.fold_in(key, 1), mean, root, num_samples)
  samples = glm_logit_samples(apply_fn, params, posterior, inputs, key, num_samples, context,
                              sample_chunk=sample_chunk)
  if method == "mc":
    return mean_softmax(samples)
  return probit_from_variances(jnp.mean(samples, axis=0), jnp.var(samples, axis=0))


# ------------------------------------------------------------------------------------------------------------
# Fast path: learners whose class text features do not depend on the image.
# ------------------------------------------------------------------------------------------------------------
#
# CoOp-like models: logits_n = s·f_n·t(θ)ᵀ + b with f_n [D] the (frozen, normalised) image feature and
# t(θ) [C, D] the class text features, row c a function of class c's prompt only. The Jacobian factors as
# J_n = s·(f_nᵀ T′_c)_c with T′ = ∂t/∂θ [C, D, P], computed once for all images: per class, D vjps (reverse)
# or P jvps (forward), whichever is fewer, vmap-ed over the classes. Then, with p_n = softmax(logits_n),
#   G = s² Σ_c T′_cᵀ F_c T′_c − V ᵀV,   F_c = Σ_n p_nc f_n f_nᵀ [D, D],   V_n = s·Σ_c p_nc T′_cᵀ f_n [P],
# and the logit covariance of image n is s²·f_nᵀ (T′_c Σ T′_c′ᵀ) f_n: its variances from K_c = T′_c Σ T′_cᵀ
# [C, D, D], its exact joint draws from text perturbations T′δ_s [S, C, D] shared by all images.

TextFn = Callable[[Any, Array, Any, Any], Array]
# `feature_subspace`: extra directions and power iterations of the randomised eigensolver (exact eigh when
# rank + oversampling ≥ D/2).
SUBSPACE_OVERSAMPLING = 8
SUBSPACE_ITERATIONS = 3
JACOBIAN_MODES = ("auto", "rev", "fwd")


def _num_classes(class_context: Any) -> int:
  leaves = jax.tree.leaves(class_context)
  if not leaves:
    raise ValueError("class_context has no arrays: expected a pytree of arrays with a leading class axis")
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"class_context's leaves disagree on the leading class axis: sizes {sorted(sizes)}")
  return sizes.pop()


@functools.partial(jax.jit, static_argnames=("text_fn", "mode", "class_chunk"))
def shared_text_jacobian(text_fn: TextFn, params: Any, key: Array, context: Any, class_context: Any, *,
                         mode: str = "auto", class_chunk: int | None = None,
                         basis: Array | None = None) -> tuple[Array, Array]:
  """Class text features t [C, D] (float32) and their Jacobian T′ = ∂t/∂θ [C, D, P] w.r.t. the flat params.

  With `basis` U [C, D, r] (orthonormal columns per class, e.g. from `feature_subspace`) it returns the
  projected Jacobian U_cᵀT′_c [C, r, P] instead, from r vjps per class (mode is then "rev").

  Args:
    text_fn: (params, key, context, class_context) -> [C', D], row c a function of params and of class c's
      entries of `class_context` only (it is called once per class, with a class context of one class).
    class_context: pytree whose leaves all have the leading class axis C (e.g. a class list's token
      embeddings and EOT positions); constants without it travel in `context`.
    mode: "rev" (D vjps per class), "fwd" (P jvps per class) or "auto" (the fewer of the two).
    class_chunk: classes vmap-ed at once under lax.map (None: all).
  """
  if mode not in JACOBIAN_MODES:
    raise ValueError(f"mode={mode!r}; expected one of {JACOBIAN_MODES}")
  theta, unravel = ravel_pytree(params)
  num_classes = _num_classes(class_context)
  one_class = jax.tree.map(lambda x: x[:, None], class_context)  # [C, 1, ...]: each call sees one class
  if basis is not None and (basis.ndim != 3 or basis.shape[0] != num_classes):
    raise ValueError(f"basis has shape {basis.shape}; expected [C={num_classes}, D, rank]")

  def row(inputs):
    single, class_basis = inputs
    fn = lambda t: text_fn(unravel(t), key, context, single)[0].astype(jnp.float32)  # noqa: E731
    dim = jax.eval_shape(fn, theta).shape[0]
    # The cotangents (tangents) go one after the other (lax.map), each pullback still batched over the classes:
    # vmap-ing them inside the vmap over classes gives wrong rows on jax 0.10.2 (CPU) for some tower sizes,
    # e.g. rows ≥ 73 of 128 for a 1-layer width-64 text tower (tests/test_prompt_laplace.py::
    # test_shared_text_jacobian_rows_equal_single_class_gradients); sequential is right, and no slower here.
    if class_basis is not None:  # r cotangents: this class's basis vectors
      out, pullback = jax.vjp(fn, theta)
      return out, jax.lax.map(lambda e: pullback(e)[0], class_basis.T.astype(jnp.float32))
    if mode == "rev" or (mode == "auto" and dim <= theta.shape[0]):
      out, pullback = jax.vjp(fn, theta)
      return out, jax.lax.map(lambda e: pullback(e)[0], jnp.eye(dim, dtype=jnp.float32))
    out, push = jax.linearize(fn, theta)
    return out, jax.lax.map(push, jnp.eye(theta.shape[0], dtype=theta.dtype)).T

  text, jac = jax.lax.map(row, (one_class, basis), batch_size=min(class_chunk or num_classes, num_classes))
  return text, jac


@functools.partial(jax.jit, static_argnames=("rank", "chunk_size"))
def feature_subspace(text: Array, features: Array, scale: Array | float, bias: Array | float = 0.0, *,
                     rank: int, chunk_size: int = 1024) -> tuple[Array, Array]:
  """Per-class subspaces of the image features that the GGN weighs most: the top-`rank` eigenvectors of
  F_c = Σ_n p_nc f_n f_nᵀ (the matrix the exact GGN contracts T′_c with; p at the posterior mean).

  Args:
    text: [C, D] class text features; features: [N, D] image features; scale, bias: the logits' affine map.
    rank: r ≤ D, eigenvectors kept per class.
  Returns:
    (basis U [C, D, r] with orthonormal columns, captured [C]: the share of trace(F_c) the r directions keep,
    1 when r = D).
  """
  dim = features.shape[1]
  if not 0 < rank <= dim:
    raise ValueError(f"rank={rank}; expected 1 <= rank <= D={dim}")
  num = features.shape[0]
  step = min(chunk_size, num)
  pad = (-num) % step
  feats = jnp.concatenate([features.astype(jnp.float32), jnp.zeros((pad, dim), jnp.float32)])
  valid = (jnp.arange(num + pad) < num).astype(jnp.float32)

  def body(weighted_outer, xs):
    f, mask = xs
    probs = jax.nn.softmax(_shared_logits(text, f, scale, bias), axis=-1) * mask[:, None]
    return weighted_outer + jnp.einsum("nc,nd,ne->cde", probs, f, f), None

  weighted_outer, _ = jax.lax.scan(body, jnp.zeros((text.shape[0], dim, dim), jnp.float32),
                                   (feats.reshape(-1, step, dim), valid.reshape(-1, step)))
  trace = jnp.maximum(jnp.trace(weighted_outer, axis1=1, axis2=2), jnp.finfo(jnp.float32).tiny)
  width = rank + SUBSPACE_OVERSAMPLING
  if width >= dim // 2:  # a full eigendecomposition is as cheap
    eigvals, eigvecs = jnp.linalg.eigh(weighted_outer)  # ascending
    return eigvecs[:, :, dim - rank:], jnp.sum(eigvals[:, dim - rank:], axis=-1) / trace
  # Randomised subspace iteration (Halko et al. 2011, alg. 4.4) then Rayleigh-Ritz: `width` directions, a few
  # matrix products and QRs per class instead of a D x D eigendecomposition (0.07 of the 0.3 CPU-s of a rank-8
  # fit on the sandbox CoOp went to the 32 eigendecompositions of 128 x 128).
  start = jax.random.normal(jax.random.key(0), (dim, width), jnp.float32)
  basis = jnp.linalg.qr(weighted_outer @ start)[0]
  for _ in range(SUBSPACE_ITERATIONS):
    basis = jnp.linalg.qr(weighted_outer @ basis)[0]
  ritz_values, ritz_vectors = jnp.linalg.eigh(jnp.einsum("cdk,cde,cel->ckl", basis, weighted_outer, basis))
  return basis @ ritz_vectors[:, :, width - rank:], jnp.sum(ritz_values[:, width - rank:], axis=-1) / trace


def _shared_logits(text: Array, features: Array, scale: Array, bias: Array | float) -> Array:
  return (scale * features.astype(jnp.float32) @ text.T + bias).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def ggn_shared_text(text: Array, text_jac: Array, features: Array, scale: Array | float,
                    bias: Array | float = 0.0, *, chunk_size: int = 1024,
                    basis: Array | None = None) -> tuple[Array, Array]:
  """G [P, P] of the summed cross-entropy of logits s·f_n·tᵀ + b, and those logits [N, C].

  Args:
    text: [C, D], text_jac: [C, D, P] from `shared_text_jacobian`; features: [N, D] image features;
    scale: s (e.g. exp(logit_scale)); bias: b; chunk_size: images per accumulation step.
    basis: U [C, D, r] with text_jac the projected U_cᵀT′_c [C, r, P] (`shared_text_jacobian(basis=U)`): the
      GGN of the Jacobian with each image feature replaced by its projection U_cU_cᵀf_n for class c (exact when
      r = D; PSD for every r). The logits stay exact.
  """
  num = features.shape[0]
  pad = (-num) % min(chunk_size, num)
  step = min(chunk_size, num)
  feats = jnp.concatenate([features.astype(jnp.float32), jnp.zeros((pad, features.shape[1]), jnp.float32)])
  valid = (jnp.arange(num + pad) < num).astype(jnp.float32)
  flat_jac = text_jac.reshape(-1, text_jac.shape[-1])  # [C·D, P]

  def body(carry, xs):
    weighted_outer, vtv = carry
    f, mask = xs
    logits = _shared_logits(text, f, scale, bias)
    probs = jax.nn.softmax(logits, axis=-1) * mask[:, None]  # padded rows contribute nothing
    if basis is None:
      weighted_outer = weighted_outer + jnp.einsum("nc,nd,ne->cde", probs, f, f)
      v = (probs[:, :, None] * f[:, None, :]).reshape(f.shape[0], -1) @ flat_jac  # [n, P] = Σ_c p_nc T′_cᵀ f_n
    else:  # per-class coordinates U_cᵀ f_n [n, C, r]
      projected = jnp.einsum("nd,cdr->ncr", f, basis.astype(jnp.float32))
      weighted_outer = weighted_outer + jnp.einsum("nc,ncr,ncs->crs", probs, projected, projected)
      v = (probs[:, :, None] * projected).reshape(f.shape[0], -1) @ flat_jac
    return (weighted_outer, vtv + v.T @ v), logits

  num_classes, dim, params = text_jac.shape
  if basis is not None and basis.shape != (num_classes, features.shape[1], dim):
    raise ValueError(f"basis has shape {basis.shape}; expected [C, D, r] = "
                     f"{(num_classes, features.shape[1], dim)} for text_jac {text_jac.shape}")
  init = (jnp.zeros((num_classes, dim, dim), jnp.float32), jnp.zeros((params, params), jnp.float32))
  (weighted_outer, vtv), logits = jax.lax.scan(body, init, (feats.reshape(-1, step, feats.shape[1]),
                                                           valid.reshape(-1, step)))
  first = jnp.einsum("cdp,cdq->pq", text_jac, jnp.einsum("cde,ceq->cdq", weighted_outer, text_jac))
  ggn = jnp.square(scale) * (first - vtv)
  return ggn, logits.reshape(-1, num_classes)[:num]


def fit_shared_text(text_fn: TextFn, params: Any, features: Array, labels: Array, key: Array, context: Any,
                    class_context: Any, scale: Array | float, bias: Array | float = 0.0, *,
                    prior_precision: float | str = "fit", prior_mean: Any = None, mode: str = "auto",
                    class_chunk: int | None = None, chunk_size: int = 1024,
                    rank: int | None = None) -> tuple[PromptLaplace, dict[str, Any]]:
  """`fit(kind="full")` for logits s·f_n·t(θ)ᵀ + b (image features [N, D], labels [N]): the same posterior,
  with the text Jacobian computed once for all images (see the section comment). Returns (posterior, info).

  rank: None (or ≥ D): the exact GGN (D vjps per class). r < D: the low-rank GGN, r vjps per class: each
    class's Jacobian is taken only along the r directions of the image features that its GGN block weighs
    most (`feature_subspace`), so the fit costs about r/D of the exact one; info["subspace_captured"] is the
    smallest share of a class's weighted feature energy those directions keep (1 = exact).
  """
  _check_prior_precision(prior_precision)
  labels = _check_labels(labels, features)
  if features.ndim != 2:
    raise ValueError(f"features have shape {features.shape}; expected image features [N, D]")
  dim = features.shape[1]
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1):
    raise ValueError(f"rank={rank!r}; expected None (exact) or a positive integer")
  basis, captured = None, None
  if rank is not None and rank < dim:
    text = _text_at(text_fn, params, key, context, class_context)
    _check_text_dim(text, features)
    basis, captured = feature_subspace(text, features, scale, bias, rank=int(rank), chunk_size=chunk_size)
  # Separate programs: one jit over the whole pipeline measured 0.27 CPU-s against 0.17 for the parts (rank 8,
  # sandbox CoOp).
  text, text_jac = shared_text_jacobian(text_fn, params, key, context, class_context, mode=mode,
                                        class_chunk=class_chunk, basis=basis)
  _check_text_dim(text, features)
  ggn, logits = ggn_shared_text(text, text_jac, features, scale, bias, chunk_size=chunk_size, basis=basis)
  posterior, info = _posterior_and_info(params, ggn, logits, labels, "full", prior_precision, prior_mean)
  info["subspace_rank"] = dim if basis is None else int(rank)
  info["subspace_captured"] = 1.0 if captured is None else float(jnp.min(captured))
  return posterior, info


@functools.partial(jax.jit, static_argnames=("text_fn",))
def _text_at(text_fn: TextFn, params: Any, key: Array, context: Any, class_context: Any) -> Array:
  return text_fn(params, key, context, class_context).astype(jnp.float32)


def _check_text_dim(text: Array, features: Array) -> None:
  if text.shape[1] != features.shape[1]:
    raise ValueError(f"text features have dimension {text.shape[1]} but the image features "
                     f"{features.shape[1]}")


def _posterior_root(posterior: PromptLaplace) -> Array:
  """L with Σ = L Lᵀ: V diag(scale) [P, P] (full) or diag(scale) as its [P] diagonal (diag)."""
  scale = _posterior_scale(posterior)
  return scale if posterior.ggn_eigvecs is None else posterior.ggn_eigvecs * scale


@jax.jit
def shared_text_logit_moments(posterior: PromptLaplace, text: Array, text_jac: Array, features: Array,
                              scale: Array | float, bias: Array | float = 0.0) -> tuple[Array, Array]:
  """Mean [N, C] and variances [N, C] of the linearised logits s·f_n·(t + T′δ)ᵀ + b, δ ~ N(0, Σ)."""
  root = _posterior_root(posterior)
  jl = text_jac * root if root.ndim == 1 else text_jac @ root  # T′_c L [C, D, P]
  kernel = jnp.einsum("cdp,cep->cde", jl, jl)  # T′_c Σ T′_cᵀ
  feats = features.astype(jnp.float32)
  var = jnp.square(scale) * jnp.einsum("nd,cde,ne->nc", feats, kernel, feats)
  return _shared_logits(text, feats, scale, bias), var


@functools.partial(jax.jit, static_argnames=("num_samples",))
def shared_text_logit_samples(posterior: PromptLaplace, text: Array, text_jac: Array, features: Array,
                              key: Array, num_samples: int, scale: Array | float,
                              bias: Array | float = 0.0) -> Array:
  """Exact joint draws of the linearised logits [S, N, C]: one text perturbation T′δ_s [C, D] per draw,
  shared by all images."""
  deltas = sample_perturbations(posterior, key, num_samples)  # [S, P]
  perturbed = text[None] + jnp.einsum("cdp,sp->scd", text_jac, deltas)
  return jax.vmap(lambda t: _shared_logits(t, features, scale, bias))(perturbed)


def shared_text_predictive(posterior: PromptLaplace, text: Array, text_jac: Array, features: Array,
                           key: Array,
                           scale: Array | float, bias: Array | float = 0.0, *, method: str = "probit",
                           num_samples: int = 100) -> Array:
  """`glm_predictive` with the explicit Jacobian for logits s·f_n·t(θ)ᵀ + b: probabilities [N, C]."""
  if method not in PREDICTIVES:
    raise ValueError(f"method={method!r}; expected one of {PREDICTIVES}")
  if method == "probit":
    return probit_from_variances(*shared_text_logit_moments(posterior, text, text_jac, features, scale, bias))
  if num_samples <= 0:
    raise ValueError(f"num_samples={num_samples}; expected a positive integer")
  return mean_softmax(shared_text_logit_samples(posterior, text, text_jac, features, key, num_samples, scale,
                                                bias))
