"""Active learning with BayesVLM (arXiv 2412.06014 §5): acquisition, targeted kNN, online updates, fine-tuning.

All of it works on cached image features (`features.extract_split_features`) and fixed class-prompt text
features. The uncertain image projection is a weight W [p, D] (p = d_in, or d_in + 1 with a bias) acting on
φ (augmented with a 1 when there is a bias); an embedding is g = φ W + offset, where `offset` holds what the
projection does not own (SigLIP's residual), computed once from the MAP embeddings so that fine-tuning W
moves g exactly as the model would.

Selection (`select`): an ordered list of pool indices, of which every prefix is a valid selection of that
size, so one selection serves a whole learning curve.
  * direct:    score the pool with the acquisition function, take the best.
  * targeted:  score the *targets* (unlabelled test-domain inputs), and for the best ones in order take their
               k nearest pool points (expected cosine or diagonal 2-Wasserstein between embedding
               distributions), skipping points already taken.
  * online:    the budget is spent in `rounds`; after each round the new labels give a gradient step on W,
               a KFAC update of A with their outer products φφᵀ (`laplace.rank_one_update`), and λ is
               re-fitted, before the pool is scored again.
Acquisition functions: random, entropy (of the probit predictive), BALD (K independent logit samples),
EPIG (K joint samples of both projections, shared by pool and targets so the joint predictive is right).

Data parallel (`mesh`): EPIG, the one acquisition whose cost grows with pool × targets (N·N*·K·C·C*
flops), is scored with the pool split over the mesh's "data" axis (`bayes.distributed.epig_sharded`); the
joint posterior draw stays on one device, so the scores equal the single-device ones up to float rounding.
Random, entropy and BALD cost O(N·K·C) and stay on one device: splitting them would need the pool padded to
a multiple of the device count, which changes their random draws.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesprompt.bayes import acquisition, laplace, predictive
from bayesprompt.bayes import distributed as bayes_distributed
from bayesprompt.bayesvlm import vlm

ACQUISITIONS = ("random", "entropy", "bald", "epig")
SELECTIONS = ("direct", "targeted")
KNN_METRICS = ("cosine", "wasserstein")


class ImageHead(NamedTuple):
  """The image projection being learned: g = aug(φ) @ weight + offset.

  Attributes:
    weight: [p, D] kernel (with the bias as its last row when add_bias).
    add_bias: φ is augmented with a trailing 1.
  """

  weight: jax.Array
  add_bias: bool


def head_from_params(params: Any, config: Any) -> ImageHead:
  kernel, bias = vlm.projection_weights(params, config, "img")
  weight = kernel if bias is None else jnp.concatenate([kernel, bias[None]], axis=0)
  return ImageHead(jnp.asarray(weight, jnp.float32), bias is not None)


def _aug(phi: jax.Array, add_bias: bool) -> jax.Array:
  phi = jnp.asarray(phi, jnp.float32)
  return laplace.augment_features(phi) if add_bias else phi


def embedding_offset(head: ImageHead, phi: np.ndarray, embeddings: np.ndarray) -> jax.Array:
  """What the head does not produce: embeddings − aug(φ) @ W ([N, D]; ≈ 0 for CLIP, the residual for SigLIP)."""
  return jnp.asarray(embeddings, jnp.float32) - _aug(phi, head.add_bias) @ head.weight


def head_embeddings(head: ImageHead, phi: jax.Array, offset: jax.Array) -> jax.Array:
  return _aug(phi, head.add_bias) @ head.weight + offset


# ------------------------------------------------------------------------------------------------------------
# Posterior of the image head (re-fitted after online updates).
# ------------------------------------------------------------------------------------------------------------


def head_posterior(
  factors: laplace.KFACFactors, head: ImageHead, *, pseudo_data_count: float, prior_precision: float | str,
  evidence_mode: str = "corrected",
) -> vlm.TowerPosterior:
  """Posterior of the head with λ given or re-fitted for the current weights (‖W‖² changes as W learns)."""
  posterior = laplace.posterior_from_factors(factors.a, factors.b, pseudo_data_count=pseudo_data_count)
  if prior_precision == "fit":
    lam = _fit_lambda(posterior, jnp.sum(jnp.square(head.weight)), evidence_mode)
  else:
    lam = jnp.asarray(float(prior_precision), posterior.a_eigvals.dtype)
  return vlm.TowerPosterior(posterior._replace(prior_precision=lam), head.add_bias)


@functools.partial(jax.jit, static_argnames=("mode",))
def _fit_lambda(posterior: laplace.KroneckerPosterior, weight_sq_norm: jax.Array, mode: str) -> jax.Array:
  return laplace.fit_prior_precision(posterior, weight_sq_norm, mode=mode)


# ------------------------------------------------------------------------------------------------------------
# Acquisition scores.
# ------------------------------------------------------------------------------------------------------------


class Problem(NamedTuple):
  """Everything fixed during selection.

  Attributes:
    text: {"pre_projection" [C, d_t], "embeddings" [C, D]} of the class prompts.
    text_post: the text projection's posterior (None: deterministic text).
    logit_scale, logit_bias: the model's (log) temperature and SigLIP bias (None for CLIP).
  """

  text: dict[str, Any]
  text_post: vlm.TowerPosterior | None
  logit_scale: float
  logit_bias: float | None


def _sample_probs(key, image_post, problem: Problem, phi, embeddings, num_samples: int) -> jax.Array:
  """[N, K, C] class probabilities under K joint posterior draws of both projections."""
  k_img, k_txt = jax.random.split(key)
  img = predictive.sample_projection_embeddings(k_img, image_post.posterior, phi, embeddings, num_samples,
                                                add_bias=image_post.add_bias)  # [K, N, D]
  text = jnp.asarray(problem.text["embeddings"], jnp.float32)
  if problem.text_post is not None:
    txt = predictive.sample_projection_embeddings(k_txt, problem.text_post.posterior,
                                                  problem.text["pre_projection"], text, num_samples,
                                                  add_bias=problem.text_post.add_bias)  # [K, C, D]
  else:
    txt = jnp.broadcast_to(text, (num_samples, *text.shape))
  unit = lambda x: x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True))
  logits = jnp.exp(problem.logit_scale) * jnp.einsum("knd,kcd->nkc", unit(img), unit(txt))
  if problem.logit_bias is not None:
    logits = logits + problem.logit_bias
  return jax.nn.softmax(logits, axis=-1)


def acquisition_scores(
  method: str,
  key: jax.Array,
  image_post: vlm.TowerPosterior,
  problem: Problem,
  candidates: dict[str, jax.Array],
  targets: dict[str, jax.Array] | None = None,
  *,
  num_samples: int = 32,
  max_working_bytes: int = 2**28,
  mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
  """Scores [N] of the candidates (higher = acquire first).

  Args:
    method: one of ACQUISITIONS.
    candidates / targets: {"pre_projection" [N, d_in], "embeddings" [N, D]} (targets: EPIG only).
    num_samples: K posterior samples (BALD, EPIG).
    max_working_bytes: EPIG's working-set budget (per device with a mesh).
    mesh: score EPIG with the candidates split over this mesh's "data" axis (see the module docstring);
      the scores come back replicated, readable on every process. None: one device.
  """
  if method not in ACQUISITIONS:
    raise ValueError(f"acquisition {method!r}; expected one of {ACQUISITIONS}")
  if candidates["embeddings"].shape[0] == 0:
    raise ValueError("no candidates to score (empty pool)")
  if method in ("bald", "epig") and num_samples <= 0:
    raise ValueError(f"num_samples={num_samples}; expected a positive integer")
  if method == "epig" and (targets is None or targets["embeddings"].shape[0] == 0):
    raise ValueError("EPIG needs a non-empty set of target inputs")
  candidates = {k: jnp.asarray(candidates[k], jnp.float32) for k in ("pre_projection", "embeddings")}
  if targets is not None:
    targets = {k: jnp.asarray(targets[k], jnp.float32) for k in ("pre_projection", "embeddings")}
  if method == "epig" and mesh is not None:
    pool_probs, target_probs = _joint_probs(key, image_post, problem, candidates, targets, num_samples=num_samples)
    return bayes_distributed.epig_sharded(pool_probs, target_probs, mesh, max_working_bytes=max_working_bytes,
                                          gather=True)
  return _scores(method, key, image_post, problem, candidates, targets if method == "epig" else None,
                 num_samples=num_samples, max_working_bytes=max_working_bytes)


def _joint_probs_impl(key, image_post, problem, candidates, targets, num_samples):
  """([N, K, C], [N*, K, C]) probabilities of candidates and targets under the same K joint draws."""
  # One draw for candidates and targets together: EPIG needs their samples to be jointly distributed.
  n = candidates["embeddings"].shape[0]
  phi = jnp.concatenate([jnp.asarray(candidates["pre_projection"]), jnp.asarray(targets["pre_projection"])])
  emb = jnp.concatenate([jnp.asarray(candidates["embeddings"]), jnp.asarray(targets["embeddings"])])
  probs = _sample_probs(key, image_post, problem, phi, emb, num_samples)
  return probs[:n], probs[n:]


_joint_probs = jax.jit(_joint_probs_impl, static_argnames=("num_samples",))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_samples", "max_working_bytes"))
def _scores(method, key, image_post, problem, candidates, targets, *, num_samples, max_working_bytes):
  n = candidates["embeddings"].shape[0]
  if method == "random":
    return jax.random.uniform(key, (n,))
  if method == "entropy":
    mean, var = vlm.logit_moments(image_post, problem.text_post, candidates, problem.text, problem.logit_scale,
                                  problem.logit_bias)
    return acquisition.entropy(predictive.probit_predictive(mean, var))
  if method == "bald":
    mean, var = vlm.logit_moments(image_post, problem.text_post, candidates, problem.text, problem.logit_scale,
                                  problem.logit_bias)
    return acquisition.bald(jax.nn.softmax(predictive.sample_logits(key, mean, var, num_samples), axis=-1))
  pool_probs, target_probs = _joint_probs_impl(key, image_post, problem, candidates, targets, num_samples)
  return acquisition.epig(pool_probs, target_probs, max_working_bytes=max_working_bytes)


# ------------------------------------------------------------------------------------------------------------
# Selection.
# ------------------------------------------------------------------------------------------------------------


def targeted_order(
  target_scores: jax.Array,
  target_dist: tuple[jax.Array, jax.Array],
  pool_dist: tuple[jax.Array, jax.Array],
  budget: int,
  *,
  k: int,
  metric: str = "cosine",
  exclude: np.ndarray | None = None,
) -> np.ndarray:
  """Pool indices [≤ budget]: the k nearest pool points of the best-scoring targets, in order, deduplicated.

  Args:
    target_scores: [T]; target_dist / pool_dist: (mean [·, D], diagonal variance [·, D]) of the embeddings.
    k: neighbours per target (1 ≤ k ≤ pool size).
    metric: "cosine" (largest expected cosine) or "wasserstein" (smallest diagonal W₂²).
    exclude: pool indices never returned (already labelled).
  """
  if metric not in KNN_METRICS:
    raise ValueError(f"knn metric {metric!r}; expected one of {KNN_METRICS}")
  num_pool = pool_dist[0].shape[0]
  if num_pool == 0:
    raise ValueError("the pool is empty: nothing to select from")
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_pool:
    raise ValueError(f"k={k!r}; expected an integer in [1, {num_pool}] (the pool size)")
  taken = set() if exclude is None else {int(i) for i in exclude}
  budget = min(budget, num_pool - len(taken))
  order = np.argsort(-np.asarray(target_scores), kind="stable")
  knn = acquisition.knn_expected_cosine if metric == "cosine" else acquisition.knn_wasserstein
  chosen: list[int] = []
  queries = max(1, math.ceil(budget / k))
  start = 0
  while len(chosen) < budget and start < len(order):
    block = order[start : start + queries]
    _, idx = knn(target_dist[0][block], target_dist[1][block], pool_dist[0], pool_dist[1], int(k))
    for row in np.asarray(idx):
      for i in row:
        if int(i) not in taken:
          taken.add(int(i))
          chosen.append(int(i))
          if len(chosen) == budget:
            return np.asarray(chosen, np.int64)
    start += len(block)
    queries *= 2
  return np.asarray(chosen, np.int64)


def _cross_entropy(weight, phi_aug, offset, labels, text_unit, scale, bias):
  g = phi_aug @ weight + offset
  logits = jnp.exp(scale) * (g * jax.lax.rsqrt(jnp.sum(jnp.square(g), -1, keepdims=True))) @ text_unit.T
  if bias is not None:
    logits = logits + bias
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@functools.partial(jax.jit, static_argnames=("optimizer", "batch_size", "has_bias"))
def _finetune(weight, phi_aug, offset, labels, num_valid, num_steps, text_unit, scale, bias, key, *, optimizer,
              batch_size, has_bias):
  # Rows past num_valid are padding (so every selection size up to a bucket shares one compilation);
  # minibatches draw uniformly from the valid rows, with replacement.
  opt_state = optimizer.init(weight)
  bias = bias if has_bias else None

  def step(i, carry):
    weight, opt_state, _ = carry
    idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, num_valid)
    loss, grads = jax.value_and_grad(_cross_entropy)(weight, phi_aug[idx], offset[idx], labels[idx], text_unit,
                                                     scale, bias)
    updates, opt_state = optimizer.update(grads, opt_state, weight)
    return optax.apply_updates(weight, updates), opt_state, loss

  weight, _, loss = jax.lax.fori_loop(0, num_steps, step, (weight, opt_state, jnp.zeros((), jnp.float32)))
  return weight, loss


def _bucket(n: int) -> int:
  return max(8, 1 << (int(n) - 1).bit_length())


def finetune_head(
  head: ImageHead,
  phi: np.ndarray,
  offset: jax.Array,
  labels: np.ndarray,
  problem: Problem,
  key: jax.Array,
  *,
  learning_rate: float = 1e-5,
  weight_decay: float = 5e-2,
  epochs: int = 10,
  batch_size: int = 32,
) -> tuple[ImageHead, float]:
  """Fine-tunes W with AdamW on cross-entropy against the fixed class-prompt embeddings (the paper's setting:
  lr 1e-5, wd 5e-2): epochs·ceil(N/batch_size) steps, each on `batch_size` examples drawn uniformly with
  replacement from the N selected ones.

  Returns:
    (the fine-tuned head, the last step's loss).
  """
  labels = np.asarray(labels)
  n = len(labels)
  if n == 0:
    raise ValueError("cannot fine-tune on an empty selection")
  if learning_rate <= 0 or weight_decay < 0 or epochs <= 0 or batch_size <= 0:
    raise ValueError(f"bad fine-tuning settings lr={learning_rate}, wd={weight_decay}, epochs={epochs}, "
                     f"batch_size={batch_size}")
  num_steps = epochs * math.ceil(n / batch_size)
  pad = _bucket(n) - n
  phi_aug = jnp.pad(_aug(phi, head.add_bias), ((0, pad), (0, 0)))
  offset = jnp.pad(jnp.asarray(offset, jnp.float32), ((0, pad), (0, 0)))
  labels = jnp.pad(jnp.asarray(labels, jnp.int32), (0, pad))
  text = jnp.asarray(problem.text["embeddings"], jnp.float32)
  text_unit = text * jax.lax.rsqrt(jnp.sum(jnp.square(text), -1, keepdims=True))
  bias = jnp.asarray(problem.logit_bias if problem.logit_bias is not None else 0.0, jnp.float32)
  weight, loss = _finetune(
    head.weight, phi_aug, offset, labels, jnp.asarray(n, jnp.int32), jnp.asarray(num_steps, jnp.int32), text_unit,
    jnp.asarray(problem.logit_scale, jnp.float32), bias, key,
    optimizer=_adamw(float(learning_rate), float(weight_decay)), batch_size=int(batch_size),
    has_bias=problem.logit_bias is not None)
  return head._replace(weight=weight), float(loss)


@functools.lru_cache(maxsize=16)
def _adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, weight_decay=weight_decay)  # cached: a new instance would recompile


class Selection(NamedTuple):
  """An ordered selection: `indices` [B] into the pool; `rounds` [B] the round each was chosen in."""

  indices: np.ndarray
  rounds: np.ndarray


def select(
  method: str,
  key: jax.Array,
  *,
  head: ImageHead,
  factors: laplace.KFACFactors,
  problem: Problem,
  pool: dict[str, np.ndarray],
  pool_offset: jax.Array,
  targets: dict[str, np.ndarray],
  budget: int,
  pseudo_data_count: float,
  prior_precision: float | str = "fit",
  evidence_mode: str = "corrected",
  selection: str = "direct",
  knn_k: int = 1,
  knn_metric: str = "cosine",
  rounds: int = 1,
  hessian_update_scale: float = 1.0,
  hessian_update_product: str = "outer",
  online_lr: float = 1e-5,
  online_weight_decay: float = 5e-2,
  online_steps: int = 1,
  num_samples: int = 32,
  epig_targets: int | None = 256,
  mesh: jax.sharding.Mesh | None = None,
) -> Selection:
  """Chooses `budget` pool points in `rounds` rounds (see the module docstring).

  Args:
    pool: {"pre_projection" [N, d_in], "embeddings" [N, D], "labels" [N]} (labels are revealed only for
      selected points, by the online updates; a label < 0 marks an image of none of the target's classes).
    targets: {"pre_projection", "embeddings"} of unlabelled test-domain inputs (EPIG, targeted selection).
    epig_targets: EPIG averages over a random subset of this many targets per round (None: all).
    mesh: score EPIG data-parallel over this mesh (`acquisition_scores`); the selection equals one
      device's up to ties broken by float rounding.
    hessian_update_product: the online update of A, `laplace.rank_one_update(product=)`: "outer" (the KFAC
      term) or "inner" (the official code's scalar ‖φ‖² on every entry).

  Raises:
    ValueError: empty pool, budget outside [1, pool size], bad k, unknown method/selection.
  """
  if selection not in SELECTIONS:
    raise ValueError(f"selection {selection!r}; expected one of {SELECTIONS}")
  if method not in ACQUISITIONS:
    raise ValueError(f"acquisition {method!r}; expected one of {ACQUISITIONS}")
  num_pool = len(pool["labels"])
  if num_pool == 0:
    raise ValueError("the pool is empty: nothing to select from")
  if not isinstance(budget, (int, np.integer)) or not 1 <= budget <= num_pool:
    raise ValueError(f"budget={budget!r}; expected an integer in [1, {num_pool}] (the pool size)")
  if not isinstance(rounds, (int, np.integer)) or not 1 <= rounds <= budget:
    raise ValueError(f"rounds={rounds!r}; expected an integer in [1, budget={budget}]")
  if selection == "targeted" and not 1 <= knn_k <= num_pool:
    raise ValueError(f"knn_k={knn_k}; expected an integer in [1, {num_pool}] (the pool size)")
  if hessian_update_scale < 0:
    raise ValueError(f"hessian_update_scale={hessian_update_scale}; expected >= 0")
  target_phi = np.asarray(targets["pre_projection"])
  target_offset = embedding_offset(head, target_phi, targets["embeddings"])
  chosen: list[int] = []
  round_of: list[int] = []
  sizes = np.diff(np.linspace(0, budget, rounds + 1).round().astype(int))
  for r, size in enumerate(sizes):
    key, k_score, k_targets, k_step = jax.random.split(key, 4)
    image_post = head_posterior(factors, head, pseudo_data_count=pseudo_data_count,
                                prior_precision=prior_precision, evidence_mode=evidence_mode)
    pool_now = {"pre_projection": pool["pre_projection"],
                "embeddings": head_embeddings(head, pool["pre_projection"], pool_offset)}
    targets_now = {"pre_projection": target_phi, "embeddings": head_embeddings(head, target_phi, target_offset)}
    if epig_targets is not None and method == "epig" and len(target_phi) > epig_targets:
      pick = np.sort(np.asarray(jax.random.choice(k_targets, len(target_phi), (epig_targets,), replace=False)))
      epig_set = {k: v[pick] for k, v in targets_now.items()}
    else:
      epig_set = targets_now
    remaining = np.setdiff1d(np.arange(num_pool), np.asarray(chosen, np.int64))
    if selection == "direct":
      cands = {k: v[remaining] for k, v in pool_now.items()}
      scores = np.asarray(acquisition_scores(method, k_score, image_post, problem, cands, epig_set,
                                             num_samples=num_samples, mesh=mesh))
      new = remaining[np.argsort(-scores, kind="stable")[:size]]
    else:
      scores = np.asarray(acquisition_scores(method, k_score, image_post, problem, targets_now, epig_set,
                                             num_samples=num_samples, mesh=mesh))
      post = image_post.posterior
      target_var = laplace.embedding_variance(post, target_phi, add_bias=head.add_bias)
      pool_var = laplace.embedding_variance(post, pool["pre_projection"], add_bias=head.add_bias)
      new = targeted_order(scores, (targets_now["embeddings"], target_var), (pool_now["embeddings"], pool_var),
                           int(size), k=int(knn_k), metric=knn_metric, exclude=np.asarray(chosen, np.int64))
    chosen.extend(int(i) for i in new)
    round_of.extend([r] * len(new))
    if r + 1 < rounds:  # online update with the labels just revealed
      # A label < 0 says "none of the target's classes" (a mixed pool, bayesprompt.data.pool): such picks
      # spent budget but give neither a gradient nor a Hessian term.
      labelled = np.asarray(pool["labels"]) >= 0
      picked = np.asarray(chosen, np.int64)
      picked = picked[labelled[picked]]
      new_idx = np.asarray(new, np.int64)
      new_idx = new_idx[labelled[new_idx]]
      if len(picked):
        head, _ = finetune_head(head, pool["pre_projection"][picked], pool_offset[picked], pool["labels"][picked],
                                problem, k_step, learning_rate=online_lr, weight_decay=online_weight_decay,
                                epochs=online_steps, batch_size=32)
      if len(new_idx):
        factors = laplace.rank_one_update(factors, pool["pre_projection"][new_idx], scale=hessian_update_scale,
                                          add_bias=head.add_bias, product=hessian_update_product)
  return Selection(np.asarray(chosen, np.int64), np.asarray(round_of, np.int64))


def evaluate_head(
  head: ImageHead,
  factors: laplace.KFACFactors,
  problem: Problem,
  data: dict[str, np.ndarray],
  offset: jax.Array,
  *,
  pseudo_data_count: float,
  prior_precision: float | str,
  evidence_mode: str = "corrected",
) -> dict[str, dict[str, float]]:
  """{"map": metrics, "bayes": metrics} of the head on labelled data (BayesVLM probit predictive)."""
  image = {"pre_projection": data["pre_projection"], "embeddings": head_embeddings(head, data["pre_projection"],
                                                                                  offset)}
  post = head_posterior(factors, head, pseudo_data_count=pseudo_data_count, prior_precision=prior_precision,
                        evidence_mode=evidence_mode)
  map_lp = vlm.map_log_probs(image, problem.text, problem.logit_scale, problem.logit_bias)
  bayes_lp = vlm.zero_shot_predictive(post, problem.text_post, image, problem.text, problem.logit_scale,
                                      problem.logit_bias)
  return {"map": vlm.classification_metrics(map_lp, data["labels"]),
          "bayes": vlm.classification_metrics(bayes_lp, data["labels"])}
