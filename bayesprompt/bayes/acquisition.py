"""Acquisition functions and targeted nearest-neighbour selection for active learning (BayesVLM).

Sampled predictive probabilities have shape [N, K, C]: N inputs, K posterior samples, C classes. For EPIG the
k-th sample of every input must come from the same posterior draw
(e.g. `predictive.sample_projection_embeddings`).
All entropies are in nats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr

from bayesprompt.bayes._validate import check_nonnegative, is_concrete

Array = jax.Array


def entropy(probs: Array, axis: int = -1) -> Array:
  """Shannon entropy −Σ p log p along `axis` (0·log 0 = 0)."""
  return jnp.sum(entr(probs), axis=axis)


def _check_samples(probs: Array, name: str) -> None:
  if probs.ndim != 3:
    raise ValueError(f"{name} has shape {probs.shape}; expected sampled probabilities [N, K, C]")
  if probs.shape[0] == 0:
    raise ValueError(f"{name} is empty (no inputs)")
  if probs.shape[1] == 0 or probs.shape[2] == 0:
    raise ValueError(f"{name} has shape {probs.shape}; needs at least one sample and one class")
  check_probabilities(probs, name)


def check_probabilities(probs: Array, name: str, atol: float = 1e-3) -> None:
  """Raises ValueError unless `probs` [..., C] (when concrete) is ≥ 0 and sums to 1 over C within `atol`
  (float32 softmax outputs sum to 1 within ~1e-6; 1e-3 only catches what is not a distribution)."""
  check_nonnegative(name, probs, "≥ 0 (probabilities)")
  if not is_concrete(probs):
    return
  sums = jnp.sum(jnp.asarray(probs), axis=-1)
  worst = float(jnp.max(jnp.abs(sums - 1.0)))
  if not worst <= atol:
    index = np.unravel_index(int(jnp.argmax(jnp.abs(sums - 1.0))), sums.shape)
    where = ", ".join(map(str, index))
    raise ValueError(f"{name} must sum to 1 over the last axis (classes); {name}[{where}]"
                     f" sums to {float(sums[index])}")


def predictive_entropy(probs: Array) -> Array:
  """H[(1/K) Σ_k p_k]: [N, K, C] -> [N] (for [N, C] predictive probabilities use `entropy`)."""
  _check_samples(probs, "probs")
  return entropy(jnp.mean(probs, axis=1))


def bald(probs: Array) -> Array:
  """BALD = H[E_θ p] − E_θ H[p] (mutual information between y and θ): [N, K, C] -> [N], ≥ 0."""
  _check_samples(probs, "probs")
  return entropy(jnp.mean(probs, axis=1)) - jnp.mean(entropy(probs), axis=1)


def epig_chunks(
  num_pool: int,
  num_targets: int,
  num_classes: int,
  num_target_classes: int,
  *,
  pool_chunk: int | None = None,
  target_chunk: int | None = None,
  max_working_bytes: int = 2**28,
  itemsize: int = 4,
) -> tuple[int, int]:
  """The (pool_chunk, target_chunk) `epig` uses: given ones validated, None ones fit `max_working_bytes`."""
  for name, value in (("pool_chunk", pool_chunk), ("target_chunk", target_chunk)):
    if value is not None and (not isinstance(value, int) or value <= 0):
      raise ValueError(f"{name}={value!r}; expected a positive integer or None")
  if max_working_bytes <= 0:
    raise ValueError(f"max_working_bytes={max_working_bytes}; expected a positive integer")
  per_pair = 3 * num_classes * num_target_classes * itemsize  # bytes of working set per (pool, target) pair
  if target_chunk is None:
    target_chunk = max(1, min(256, max_working_bytes // per_pair))
  target_chunk = min(target_chunk, num_targets)
  if pool_chunk is None:
    pool_chunk = max(1, max_working_bytes // (per_pair * target_chunk))
  return min(pool_chunk, num_pool), target_chunk


def epig(
  pool_probs: Array,
  target_probs: Array,
  *,
  pool_chunk: int | None = None,
  target_chunk: int | None = None,
  max_working_bytes: int = 2**28,
) -> Array:
  """Expected predictive information gain EPIG(x) = E_{x*}[I(y; y* | x, x*)] from K joint samples.

  EPIG(x) = H[p̄(y|x)] + mean_{x*} H[p̄(y*|x*)] − mean_{x*} H[(1/K) Σ_k p_k(y|x) p_k(y*|x*)ᵀ],
  p̄ = (1/K) Σ_k p_k. The joint over (y, y*) is a [C, C*] matmul over the K samples per pair.

  Memory bound: besides the inputs (and one zero-padded copy of them), the peak working set is
  ≈ 3 · pool_chunk · target_chunk · C · C* floats (the joint, its entropy terms and the matmul output) plus
  O(pool_chunk · K · C + target_chunk · K · C*), independent of N and N*. Chunks left as None are chosen so
  that this stays within `max_working_bytes` (256 MiB by default): target_chunk ≤ 256, pool_chunk the largest
  that fits (at least 1 each). Cost: 2·N·N*·K·C·C* flops and N·N*·C·C* logarithms.

  Args:
    pool_probs: [N, K, C] sampled probabilities of the pool (candidate) inputs.
    target_probs: [N*, K, C*] sampled probabilities of the target inputs, sample k from the same draw.
    pool_chunk, target_chunk: chunk sizes bounding the memory (None: derived from `max_working_bytes`).
    max_working_bytes: the working-set budget used to choose chunks that are None.

  Returns:
    [N] EPIG scores (≥ 0 up to rounding; 0 when all samples agree).
  """
  _check_samples(pool_probs, "pool_probs")
  _check_samples(target_probs, "target_probs")
  num_pool, num_samples, num_classes = pool_probs.shape
  num_targets, target_samples, num_target_classes = target_probs.shape
  if target_samples != num_samples:
    raise ValueError(
      f"pool has {num_samples} samples but targets have {target_samples}; they must be the same draws"
    )
  dtype = jnp.result_type(pool_probs.dtype, target_probs.dtype, jnp.float32)
  pool_chunk, target_chunk = epig_chunks(
    num_pool,
    num_targets,
    num_classes,
    num_target_classes,
    pool_chunk=pool_chunk,
    target_chunk=target_chunk,
    max_working_bytes=max_working_bytes,
    itemsize=jnp.dtype(dtype).itemsize,
  )
  pool_probs = pool_probs.astype(dtype)
  target_probs = target_probs.astype(dtype)

  marginal_pool = entropy(jnp.mean(pool_probs, axis=1))  # [N]
  marginal_targets = jnp.mean(entropy(jnp.mean(target_probs, axis=1)))  # []

  # Zero-padded targets give an all-zero joint whose entropy is 0, so padding adds nothing to the sum.
  padded_targets = -(-num_targets // target_chunk) * target_chunk
  targets = jnp.pad(target_probs, ((0, padded_targets - num_targets), (0, 0), (0, 0)))
  # [T, K, C*] -> chunks of [K, tc * C*] so the joint of a pool chunk is one matmul.
  targets = targets.reshape(-1, target_chunk, num_samples, num_target_classes).transpose(0, 2, 1, 3)
  targets = targets.reshape(-1, num_samples, target_chunk * num_target_classes) / num_samples

  def joint_entropy_sum(pool_block: Array) -> Array:  # [pc, K, C] -> [pc]: Σ_{x*} H[joint(x, x*)]
    pc = pool_block.shape[0]
    left = pool_block.transpose(0, 2, 1).reshape(pc * num_classes, num_samples)

    def body(total, target_block):
      joint = (left @ target_block).reshape(pc, num_classes, target_chunk, num_target_classes)
      return total + jnp.sum(entr(joint), axis=(1, 3)).sum(axis=-1), None

    total, _ = jax.lax.scan(body, jnp.zeros((pc,), dtype), targets)
    return total

  padded_pool = -(-num_pool // pool_chunk) * pool_chunk
  pool = jnp.pad(pool_probs, ((0, padded_pool - num_pool), (0, 0), (0, 0)))
  joint = jax.lax.map(joint_entropy_sum, pool.reshape(-1, pool_chunk, num_samples, num_classes))
  joint = joint.reshape(-1)[:num_pool] / num_targets
  return marginal_pool + marginal_targets - joint


# ------------------------------------------------------------------------------------------------------------
# Targeted kNN: for each query (a chosen test point), its k nearest pool points.
# ------------------------------------------------------------------------------------------------------------


def _check_knn(query_mean, query_var, pool_mean, pool_var, k, pool_chunk) -> None:
  for name, mean, var in (("query", query_mean, query_var), ("pool", pool_mean, pool_var)):
    if mean.ndim != 2 or var.shape != mean.shape:
      raise ValueError(
        f"{name}: expected mean [N, D] and variance of the same shape; got {mean.shape}, {var.shape}"
      )
  if query_mean.shape[1] != pool_mean.shape[1]:
    raise ValueError(f"queries have dimension {query_mean.shape[1]} but the pool has {pool_mean.shape[1]}")
  if pool_mean.shape[0] == 0:
    raise ValueError("the pool is empty: nothing to select from")
  if query_mean.shape[0] == 0:
    raise ValueError("no queries given")
  if not isinstance(k, int) or k <= 0:
    raise ValueError(f"k={k!r}; expected a positive integer")
  if k > pool_mean.shape[0]:
    raise ValueError(f"k={k} is larger than the pool ({pool_mean.shape[0]} points)")
  if pool_chunk <= 0:
    raise ValueError(f"pool_chunk={pool_chunk}; expected a positive integer")


def _chunked_top_k(
  query_feats: Array, pool_feats: Array, pool_offsets: Array, score_fn, k: int, pool_chunk: int
) -> tuple[Array, Array]:
  """Largest `score_fn(query_feats, pool_block, offsets_block)` [Q, pc] over the pool, streamed in chunks."""
  num_pool = pool_feats.shape[0]
  pool_chunk = min(pool_chunk, num_pool)
  padded = -(-num_pool // pool_chunk) * pool_chunk
  pad = padded - num_pool
  pool_feats = jnp.pad(pool_feats, ((0, pad), (0, 0))).reshape(-1, pool_chunk, pool_feats.shape[1])
  pool_offsets = jnp.pad(pool_offsets, (0, pad)).reshape(-1, pool_chunk)
  index = jnp.arange(padded, dtype=jnp.int32).reshape(-1, pool_chunk)
  num_queries = query_feats.shape[0]
  dtype = query_feats.dtype
  init = (jnp.full((num_queries, k), -jnp.inf, dtype), jnp.full((num_queries, k), -1, jnp.int32))

  def body(carry, block):
    feats, offsets, idx = block
    scores = score_fn(query_feats, feats, offsets)
    scores = jnp.where(idx[None, :] < num_pool, scores, -jnp.inf)  # padded pool rows never win
    all_scores = jnp.concatenate([carry[0], scores], axis=1)
    all_idx = jnp.concatenate([carry[1], jnp.broadcast_to(idx, scores.shape)], axis=1)
    best, pos = jax.lax.top_k(all_scores, k)
    return (best, jnp.take_along_axis(all_idx, pos, axis=1)), None

  (best, best_idx), _ = jax.lax.scan(body, init, (pool_feats, pool_offsets, index))
  return best, best_idx


def knn_expected_cosine(
  query_mean: Array, query_var: Array, pool_mean: Array, pool_var: Array, k: int, *, pool_chunk: int = 4096
) -> tuple[Array, Array]:
  """k pool points with the largest expected cosine μ_qᵀμ_p / √(E‖q‖²·E‖p‖²) to each query.

  Memory: O(Q · (pool_chunk + k)) besides the inputs.

  Args:
    query_mean, query_var: [Q, D] embedding means and diagonal variances of the queries.
    pool_mean, pool_var: [P, D] of the pool.
    k: neighbours per query, 1 ≤ k ≤ P.

  Returns:
    (expected cosines [Q, k] in decreasing order, pool indices [Q, k] int32).
  """
  _check_knn(query_mean, query_var, pool_mean, pool_var, k, pool_chunk)
  query = query_mean * jax.lax.rsqrt(jnp.sum(jnp.square(query_mean) + query_var, axis=-1))[:, None]
  pool = pool_mean * jax.lax.rsqrt(jnp.sum(jnp.square(pool_mean) + pool_var, axis=-1))[:, None]
  zeros = jnp.zeros((pool.shape[0],), pool.dtype)
  return _chunked_top_k(query, pool, zeros, lambda q, p, _: q @ p.T, k, pool_chunk)


def wasserstein_sq_distances(query_mean: Array, query_var: Array, pool_mean: Array, pool_var: Array) -> Array:
  """Squared 2-Wasserstein distances between diagonal Gaussians, ‖μ₁−μ₂‖² + Σ(σ₁−σ₂)²: [Q, P] (dense)."""
  query = jnp.concatenate([query_mean, jnp.sqrt(query_var)], axis=-1)
  pool = jnp.concatenate([pool_mean, jnp.sqrt(pool_var)], axis=-1)
  sq = jnp.sum(jnp.square(query), -1)[:, None] + jnp.sum(jnp.square(pool), -1)[None, :] - 2.0 * query @ pool.T
  return jnp.maximum(sq, 0.0)


def knn_wasserstein(
  query_mean: Array, query_var: Array, pool_mean: Array, pool_var: Array, k: int, *, pool_chunk: int = 4096
) -> tuple[Array, Array]:
  """k pool points with the smallest diagonal squared 2-Wasserstein distance to each query.

  W₂² = ‖μ_q − μ_p‖² + Σ_d(σ_q,d − σ_p,d)² is the squared Euclidean distance between [μ, σ] vectors, so each
  pool chunk costs one [Q, 2D] @ [2D, pool_chunk] matmul. Memory: O(Q · (pool_chunk + k)).

  Returns:
    (squared distances [Q, k] in increasing order, pool indices [Q, k] int32).
  """
  _check_knn(query_mean, query_var, pool_mean, pool_var, k, pool_chunk)
  query = jnp.concatenate([query_mean, jnp.sqrt(query_var)], axis=-1)
  pool = jnp.concatenate([pool_mean, jnp.sqrt(pool_var)], axis=-1)
  query_sq = jnp.sum(jnp.square(query), -1)
  pool_sq = jnp.sum(jnp.square(pool), -1)

  def neg_dist(q, p, p_sq):
    return -jnp.maximum(query_sq[:, None] + p_sq[None, :] - 2.0 * q @ p.T, 0.0)

  neg, idx = _chunked_top_k(query, pool, pool_sq, neg_dist, k, pool_chunk)
  return -neg, idx
