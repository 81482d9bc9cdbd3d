"""Tests of bayesprompt.bayes.laplace against autodiff GGNs, dense linear algebra and the fixtures."""

import functools
import importlib.util
import math
import pathlib
import pickle
import sys
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from safetensors.numpy import load_file

from bayesprompt.bayes import laplace

# Tiny factors and float64 oracles: XLA's optimisation passes cost more compile time than they save
# (tests/conftest.py::fast_compiles); the one exact-summation check turns them back on for itself.
pytestmark = pytest.mark.usefixtures("fast_compiles")

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _loss_from_logits(logits, likelihood, label):
  """The contrastive loss of one source item as a function of its logits against the class batch."""
  if likelihood == "infonce":
    return -jax.nn.log_softmax(logits)[label]
  signs = -jnp.ones_like(logits).at[label].set(1.0)  # ±1 SigLIP labels: the paired item is positive
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits))


def _logits_of_embedding(g, targets, logit_scale, logit_bias):
  unit_targets = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
  return jnp.exp(logit_scale) * (unit_targets @ (g / jnp.linalg.norm(g))) + logit_bias


def _linearised_ggn(fn, x0, likelihood, label):
  """Exact GGN of loss(fn(x)) at x0: the Hessian of the loss of the *linearised* fn (independent of ours)."""
  z0, jvp_fn = jax.linearize(fn, x0)
  return jax.hessian(lambda x: _loss_from_logits(z0 + jvp_fn(x - x0), likelihood, label))(x0)


def _problem(seed, num=6, feat_dim=5, embed_dim=4, classes=7):
  rng = np.random.default_rng(seed)
  phi = rng.normal(size=(num, feat_dim))
  kernel = rng.normal(size=(feat_dim, embed_dim)) / math.sqrt(feat_dim)
  bias = rng.normal(size=(embed_dim,))
  residual = rng.normal(size=(num, embed_dim))
  targets = rng.normal(size=(classes, embed_dim))
  return phi, kernel, bias, residual, targets


@pytest.mark.usefixtures("optimized_compiles")
def test_projection_sq_norm_keeps_float64_and_sums_bf16_in_float32():
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(64, 32)) * 1e-3 + 1.0, rng.normal(size=32)
  with jax.enable_x64(True):
    sq = laplace.projection_sq_norm(jnp.asarray(kernel), jnp.asarray(bias))
    assert sq.dtype == jnp.float64
    np.testing.assert_allclose(float(sq), np.sum(kernel**2) + np.sum(bias**2), rtol=1e-15)
  sq32 = laplace.projection_sq_norm(jnp.asarray(kernel, jnp.bfloat16))
  assert sq32.dtype == jnp.float32


class EmbeddingGGNTest(parameterized.TestCase):
  @parameterized.parameters("infonce", "siglip")
  def test_matches_hessian_of_linearised_loss(self, likelihood):
    with jax.enable_x64(True):
      _, _, _, _, targets = _problem(0)
      g0 = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape[1]))
      logit_scale, logit_bias = 1.3, -2.0
      fn = functools.partial(
        _logits_of_embedding, targets=targets, logit_scale=logit_scale, logit_bias=logit_bias
      )
      expected = _linearised_ggn(fn, g0, likelihood, label=2)
      got = laplace.embedding_ggn(
        g0, jnp.asarray(targets), logit_scale, likelihood=likelihood, logit_bias=logit_bias
      )
      chex.assert_trees_all_close(got, expected, atol=1e-10, rtol=1e-9)
      self.assertGreater(float(jnp.abs(expected).max()), 1e-3)  # not a vacuous comparison

  def test_siglip_ggn_does_not_depend_on_labels(self):
    # σ'(z) is even, so the ±1 labels drop out of the SigLIP curvature (the docstring's claim).
    with jax.enable_x64(True):
      _, _, _, _, targets = _problem(0)
      g0 = jnp.asarray(np.random.default_rng(2).normal(size=targets.shape[1]))
      fn = functools.partial(_logits_of_embedding, targets=targets, logit_scale=0.4, logit_bias=1.0)
      chex.assert_trees_all_close(
        _linearised_ggn(fn, g0, "siglip", 0), _linearised_ggn(fn, g0, "siglip", 5), atol=1e-12
      )


def official_kfac_ggn(source_embeds, source_activations, target_embeds, num_classes, batch_size, logit_scale,
                      likelihood, logit_bias=0.0):
  """AaltoML/BayesVLM's `kfac_ggn` (scripts/hessian_estimation.py) with `compute_hessian_analytic_InfoNCE` /
  `compute_hessian_analytic_SigLIP` (bayesvlm/hessians.py), transliterated to float64 NumPy: class batches of
  `num_classes` (a trailing partial one is dropped), B summed over data batches of `batch_size` inside each
  (the leftover rows are dropped), A over the whole class batch (SigLIP: activations with a ones column),
  both divided by √(num_class_batches · num_classes)."""

  def hessian_infonce(x, y):
    x_norm = np.linalg.norm(x, axis=-1, keepdims=True)
    x_hat, y_hat = x / x_norm, y / np.linalg.norm(y, axis=-1, keepdims=True)
    logits = x_hat @ y_hat.T * np.exp(logit_scale)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    j_diag = np.einsum("bc,cd,ce->bde", probs, y_hat, y_hat)  # (Y * p[:, None]).T @ Y per row
    yp = probs @ y_hat  # [B, D] = Yᵀ p
    j_pp = yp[:, :, None] * yp[:, None, :]
    j_norm = np.eye(x.shape[1]) / x_norm[:, :, None] - x[:, :, None] * x[:, None, :] / x_norm[:, :, None] ** 3
    return (j_norm @ (j_diag - j_pp) @ np.swapaxes(j_norm, 1, 2) * np.exp(logit_scale) ** 2).sum(0)

  def hessian_siglip(x, indices, y):
    x_norm = np.linalg.norm(x, axis=1, keepdims=True)
    x_hat, y_hat = x / x_norm, y / np.linalg.norm(y, axis=1, keepdims=True)
    scale = np.exp(logit_scale)
    logits = x_hat @ y_hat.T * scale + logit_bias
    labels = (2 * np.eye(len(y)) - 1)[indices]
    sig = 1 / (1 + np.exp(-logits * labels))
    weights = scale**2 * sig * (1 - sig)  # [B, N_y]
    hess = np.einsum("ij,jk,jl->ikl", weights, y_hat, y_hat)
    outer_x = x[:, :, None] * x[:, None, :]
    norm_jac = np.eye(x.shape[1])[None] / x_norm[:, :, None] - outer_x / x_norm[:, :, None] ** 3
    return np.einsum("ijk,ikl,ilm->jm", norm_jac, hess, norm_jac)

  num_class_batches = len(target_embeds) // num_classes
  a, b = 0, 0
  for i in range(num_class_batches):
    rows = slice(i * num_classes, (i + 1) * num_classes)
    targets, sources, activations = target_embeds[rows], source_embeds[rows], source_activations[rows]
    for j in range(len(sources) // batch_size):
      x = sources[j * batch_size:(j + 1) * batch_size]
      if likelihood == "infonce":
        b = b + hessian_infonce(x, targets)
      else:
        b = b + hessian_siglip(x, np.arange(j * batch_size, (j + 1) * batch_size), targets)
    if likelihood == "siglip":
      activations = np.concatenate([activations, np.ones_like(activations[:, :1])], axis=1)
    a = a + activations.T @ activations
  n = num_class_batches * num_classes
  return a / math.sqrt(n), b / math.sqrt(n)


class KFACTest(chex.TestCase):
  @parameterized.parameters(("infonce", False, False), ("siglip", True, True), ("infonce", True, False))
  def test_single_sample_kronecker_is_exact_weight_ggn(self, likelihood, add_bias, residual):
    """With N = 1, kron(A, B) is the exact GGN of the (row-major vec of the) projection weight."""
    with jax.enable_x64(True):
      phi, kernel, bias, res, targets = _problem(3, num=1)
      logit_scale, logit_bias = 0.9, -1.5
      weight = np.concatenate([kernel, bias[None]], 0) if add_bias else kernel
      features = laplace.augment_features(jnp.asarray(phi)) if add_bias else jnp.asarray(phi)
      res_row = jnp.asarray(res[0]) if residual else 0.0
      p, q = weight.shape

      def logits_of_weight(w_flat):
        g = features[0] @ w_flat.reshape(p, q) + res_row
        return _logits_of_embedding(g, targets, logit_scale, logit_bias)

      exact = _linearised_ggn(logits_of_weight, jnp.asarray(weight.reshape(-1)), likelihood, label=0)
      embeddings = features @ weight + res_row
      a, b = laplace.kfac_factors(
        jnp.asarray(phi),
        embeddings,
        jnp.asarray(targets),
        logit_scale,
        likelihood=likelihood,
        logit_bias=logit_bias,
        add_bias=add_bias,
      )
      self.assertEqual(a.shape, (p, p))
      chex.assert_trees_all_close(jnp.kron(a, b), exact, atol=1e-10, rtol=1e-9)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("infonce", "siglip")
  def test_streamed_sums_match_per_sample_ggns(self, likelihood):
    phi, kernel, bias, _, targets = _problem(4, num=37, feat_dim=6, embed_dim=5, classes=11)
    embeddings = phi @ kernel + bias
    update = self.variant(
      functools.partial(
        laplace.kfac_update, likelihood=likelihood, logit_bias=0.5, add_bias=True, chunk_size=8
      )
    )
    state = update(
      laplace.kfac_init(6, 5, add_bias=True),
      jnp.asarray(phi, jnp.float32),
      jnp.asarray(embeddings, jnp.float32),
      jnp.asarray(targets, jnp.float32),
      jnp.float32(1.1),
    )
    factors = laplace.kfac_finalize(state)
    with jax.enable_x64(True):
      per_sample = jax.vmap(
        lambda g: laplace.embedding_ggn(g, jnp.asarray(targets), 1.1, likelihood=likelihood, logit_bias=0.5)
      )(jnp.asarray(embeddings))
      expected_b = np.asarray(per_sample.sum(0)) / math.sqrt(37)
    aug = np.concatenate([phi, np.ones((37, 1))], 1)
    self.assertEqual(int(state.num_data), 37)
    chex.assert_trees_all_close(factors.a, aug.T @ aug / math.sqrt(37), atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(factors.b, expected_b, atol=1e-5, rtol=1e-4)

  @parameterized.parameters("infonce", "siglip")
  def test_chunked_and_combined_equal_unchunked(self, likelihood):
    phi, kernel, _, _, targets = _problem(5, num=50, feat_dim=8, embed_dim=6, classes=9)
    phi, emb, targets = (jnp.asarray(x, jnp.float32) for x in (phi, phi @ kernel, targets))
    kwargs = dict(likelihood=likelihood, logit_bias=-1.0)
    whole = laplace.kfac_factors(phi, emb, targets, 2.0, chunk_size=None, **kwargs)
    for chunk in (1, 7, 50, 64):
      chex.assert_trees_all_close(
        laplace.kfac_factors(phi, emb, targets, 2.0, chunk_size=chunk, **kwargs), whole, atol=1e-5, rtol=1e-5
      )
    # Two "devices" holding halves, combined by summation, then normalised by the total N.
    init = laplace.kfac_init(8, 6)
    states = [
      laplace.kfac_update(init, phi[s], emb[s], targets, 2.0, **kwargs) for s in (slice(0, 21), slice(21, 50))
    ]
    combined = laplace.kfac_finalize(laplace.kfac_combine(*states))
    chex.assert_trees_all_close((combined.a, combined.b), whole, atol=1e-5, rtol=1e-5)
    self.assertEqual(float(combined.num_data), 50.0)

  @parameterized.parameters("infonce", "siglip")
  def test_b_batch_size_is_the_official_kfac_ggn(self, likelihood):
    """`b_batch_size` = the official `la_batch_size`: class batches of 7 cut into data batches of 3, so one
    row per class batch adds to A and N but not to B (the official code). The default counts it in B too."""
    class_batch, la_batch_size, num_batches = 7, 3, 3
    with jax.enable_x64(True):
      phi, kernel, _, residual, _ = _problem(11, num=class_batch * num_batches, feat_dim=5, embed_dim=4)
      source = phi @ kernel + residual
      targets = np.random.default_rng(12).normal(size=source.shape)  # the other tower's embeddings, paired
      kwargs = dict(likelihood=likelihood, logit_bias=-0.7, add_bias=likelihood == "siglip", chunk_size=2)
      official = official_kfac_ggn(source, phi, targets, class_batch, la_batch_size, 1.3, likelihood, -0.7)
      states = {}
      for b_batch_size in (la_batch_size, None):
        state = laplace.kfac_init(5, 4, add_bias=kwargs["add_bias"], dtype=jnp.float64)
        for i in range(num_batches):
          rows = slice(i * class_batch, (i + 1) * class_batch)
          state = laplace.kfac_update(state, jnp.asarray(phi[rows]), jnp.asarray(source[rows]),
                                      jnp.asarray(targets[rows]), 1.3, b_batch_size=b_batch_size, **kwargs)
        states[b_batch_size] = laplace.kfac_finalize(state)
    got = states[la_batch_size]
    self.assertEqual(float(got.num_data), class_batch * num_batches)
    np.testing.assert_allclose(np.asarray(got.a), official[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got.b), official[1], rtol=1e-10, atol=1e-12)
    ours = states[None]
    np.testing.assert_allclose(np.asarray(ours.a), official[0], rtol=1e-12, atol=1e-12)  # A: the same
    assert np.max(np.abs(np.asarray(ours.b) - official[1])) > 0.05 * np.max(np.abs(official[1]))  # B: not
    # A class batch smaller than la_batch_size adds nothing to B (the official loop runs zero data batches).
    tiny = laplace.kfac_update(laplace.kfac_init(5, 4, add_bias=kwargs["add_bias"]), jnp.asarray(phi[:2]),
                               jnp.asarray(source[:2]), jnp.asarray(targets[:2]), 1.3, b_batch_size=3,
                               **kwargs)
    np.testing.assert_array_equal(np.asarray(tiny.b_sum), 0.0)
    self.assertEqual(int(tiny.num_data), 2)
    with pytest.raises(ValueError, match="b_batch_size=0"):
      laplace.kfac_update(laplace.kfac_init(5, 4), jnp.asarray(phi), jnp.asarray(source),
                          jnp.asarray(targets), 1.3, b_batch_size=0)

  def test_factors_are_psd(self):
    phi, kernel, _, _, targets = _problem(6, num=40, feat_dim=8, embed_dim=6, classes=30)
    a, b = laplace.kfac_factors(jnp.asarray(phi), jnp.asarray(phi @ kernel), jnp.asarray(targets), 4.6)
    self.assertGreater(float(jnp.linalg.eigvalsh(b)[0]), -1e-5 * float(jnp.abs(b).max()))
    self.assertGreater(float(jnp.linalg.eigvalsh(a)[0]), -1e-5 * float(jnp.abs(a).max()))

  def test_rank_one_update_adds_outer_products(self):
    phi, kernel, _, _, targets = _problem(7, num=10)
    factors = laplace.KFACFactors(
      *laplace.kfac_factors(
        jnp.asarray(phi), jnp.asarray(phi @ kernel + 1.0), jnp.asarray(targets), 1.0, add_bias=True
      ),
      jnp.float32(10),
    )
    new = np.random.default_rng(0).normal(size=(2, 5))
    updated = laplace.rank_one_update(factors, jnp.asarray(new), scale=0.3, add_bias=True)
    aug = np.concatenate([new, np.ones((2, 1))], 1)
    expected = np.asarray(factors.a) + 0.3 * sum(np.outer(x, x) for x in aug)
    chex.assert_trees_all_close(updated.a, expected, atol=1e-5)
    chex.assert_trees_all_close(updated.b, factors.b, atol=0.0)
    one = laplace.rank_one_update(factors, jnp.asarray(new[0]), add_bias=True)  # a single [d_in] vector
    chex.assert_trees_all_close(one.a, np.asarray(factors.a) + np.outer(aug[0], aug[0]), atol=1e-5)
    with pytest.raises(ValueError, match="do not match A"):
      laplace.rank_one_update(factors, jnp.asarray(new), add_bias=False)
    with pytest.raises(ValueError, match="scale"):
      laplace.rank_one_update(factors, jnp.asarray(new), scale=-1.0, add_bias=True)
    with pytest.raises(ValueError, match="product='outr'"):
      laplace.rank_one_update(factors, jnp.asarray(new), add_bias=True, product="outr")

  def test_rank_one_update_inner_is_the_official_online_update(self):
    """product="inner" adds the official active-learning term (AaltoML/BayesVLM epig.py, one selected sample
    per step: `A_new = a @ a.T` on a 1-D activation, a scalar broadcast onto A, times hessian_update_scale),
    checked against that loop with its √n/√(n+1) renormalisation taken back out."""
    rng = np.random.default_rng(9)
    with jax.enable_x64(True):
      a0 = _random_psd(rng, 5)
      factors = laplace.KFACFactors(jnp.asarray(a0), jnp.asarray(_random_psd(rng, 3)), jnp.asarray(100.0))
      new = rng.normal(size=(3, 5))
      update_scale, n0 = 10.0, 327_680
      a_img = a0.copy()  # the official loop
      for i, activation in enumerate(new):
        a_new = activation @ activation.T  # 1-D: .T is a no-op, @ the inner product
        n = n0 + i
        a_img = (math.sqrt(n) * a_img + a_new * update_scale) / math.sqrt(n + 1)
      added = math.sqrt(n0 + len(new)) * a_img - math.sqrt(n0) * a0  # the sum of the official additive terms
      inner = laplace.rank_one_update(factors, jnp.asarray(new), scale=update_scale, product="inner")
      outer = laplace.rank_one_update(factors, jnp.asarray(new), scale=update_scale)
    np.testing.assert_allclose(np.asarray(inner.a) - a0, added, rtol=1e-10, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(inner.b), np.asarray(factors.b))
    assert np.max(np.abs(np.asarray(outer.a) - a0 - added)) > 1.0  # the default is not the official term

  def test_bad_input(self):
    phi, kernel, _, _, targets = _problem(8)
    phi, emb, targets = jnp.asarray(phi), jnp.asarray(phi @ kernel), jnp.asarray(targets)
    with pytest.raises(ValueError, match="likelihood"):
      laplace.kfac_factors(phi, emb, targets, 1.0, likelihood="softmax")
    with pytest.raises(ValueError, match="expected .*5, 5"):
      laplace.kfac_update(laplace.kfac_init(5, 4, add_bias=True), phi, emb, targets, 1.0)  # add_bias mismatch
    with pytest.raises(ValueError, match="rows"):
      laplace.kfac_factors(phi, emb[:3], targets, 1.0)
    with pytest.raises(ValueError, match="targets have dimension"):
      laplace.kfac_factors(phi, emb, targets[:, :3], 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
      laplace.kfac_factors(phi, emb, targets, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match=r"embeddings\[2\] has norm 0.0.*non-zero"):
      laplace.kfac_factors(phi, emb.at[2].set(0.0), targets, 1.0)
    with pytest.raises(ValueError, match=r"targets\[1\] has norm nan"):
      laplace.kfac_factors(phi, emb, targets.at[1, 0].set(jnp.nan), 1.0)
    with pytest.raises(ValueError, match="no data"):
      laplace.kfac_finalize(laplace.kfac_init(5, 4))
    with pytest.raises(ValueError, match="kernel"):
      laplace.linear_projection(phi, kernel.T)


class FixtureProjectionTest(parameterized.TestCase):
  """The fixtures' pre-projection features reproduce their embeddings through `linear_projection`."""

  @pytest.fixture(autouse=True)
  def _fixtures(self, fixtures_dir):
    self.fixtures_dir = fixtures_dir

  @parameterized.parameters(
    ("openclip_vit_tiny", "open_clip_model.safetensors"),
    ("openclip_vit_tiny_gelu", "open_clip_model.safetensors"),
  )
  def test_open_clip(self, name, weights):
    io = np.load(self.fixtures_dir / f"{name}.io.npz")
    params = load_file(self.fixtures_dir / name / weights)
    image = laplace.linear_projection(io["image_pre_projection"], params["visual.proj"])
    text = laplace.linear_projection(io["text_pre_projection"], params["text_projection"])
    chex.assert_trees_all_close(image, io["image_features"], atol=1e-4)
    chex.assert_trees_all_close(text, io["text_features"], atol=1e-4)

  def test_hf_clip(self):
    io = np.load(self.fixtures_dir / "hf_clip_tiny.io.npz")
    params = load_file(self.fixtures_dir / "hf_clip_tiny" / "model.safetensors")
    image = laplace.linear_projection(io["image_pre_projection"], params["visual_projection.weight"].T)
    text = laplace.linear_projection(io["text_pre_projection"], params["text_projection.weight"].T)
    chex.assert_trees_all_close(image, io["image_features"], atol=1e-4)
    chex.assert_trees_all_close(text, io["text_features"], atol=1e-4)

  def test_siglip_bias_and_residual(self):
    io = np.load(self.fixtures_dir / "hf_siglip_tiny.io.npz")
    params = load_file(self.fixtures_dir / "hf_siglip_tiny" / "model.safetensors")
    fc2_w, fc2_b = params["vision_model.head.mlp.fc2.weight"].T, params["vision_model.head.mlp.fc2.bias"]
    image = laplace.linear_projection(io["image_pre_projection"], fc2_w, fc2_b, io["image_residual"])
    chex.assert_trees_all_close(image, io["image_features"], atol=1e-4)
    # The augmented form the factors use: [φ, 1] @ [W; b] (+ residual).
    augmented = laplace.augment_features(jnp.asarray(io["image_pre_projection"])) @ np.concatenate(
      [fc2_w, fc2_b[None]]
    )
    chex.assert_trees_all_close(augmented + io["image_residual"], io["image_features"], atol=1e-4)
    head_w, head_b = params["text_model.head.weight"].T, params["text_model.head.bias"]
    text = laplace.linear_projection(io["text_pre_projection"], head_w, head_b)
    chex.assert_trees_all_close(text, io["text_features"], atol=1e-4)
    # Factors of the biased image head have the augmented size, and the variances follow through.
    a, b = laplace.kfac_factors(
      jnp.asarray(io["image_pre_projection"]),
      jnp.asarray(io["image_features"]),
      jnp.asarray(io["text_features"]),
      io["logit_scale"],
      likelihood="siglip",
      logit_bias=io["logit_bias"],
      add_bias=True,
    )
    self.assertEqual((a.shape, b.shape), ((257, 257), (128, 128)))
    post = laplace.posterior_from_factors(a, b, pseudo_data_count=10.0, prior_precision=50.0)
    var = laplace.embedding_variance(post, jnp.asarray(io["image_pre_projection"]), add_bias=True)
    self.assertEqual(var.shape, (3, 128))
    self.assertTrue(bool(jnp.all(var > 0)))


def _random_psd(rng, dim, rank=None):
  x = rng.normal(size=(rank or dim, dim))
  return x.T @ x / dim


class PosteriorTest(parameterized.TestCase):
  def _posterior(self, p=5, q=3, n=4.0, lam=2.5, seed=0):
    rng = np.random.default_rng(seed)
    a, b = _random_psd(rng, p, rank=2), _random_psd(rng, q)  # A rank-deficient: λ must regularise it
    return a, b, laplace.posterior_from_factors(a, b, pseudo_data_count=n, prior_precision=lam)

  def test_covariance_and_log_determinants_match_dense(self):
    with jax.enable_x64(True):
      a, b, post = self._posterior()
      n, lam = 4.0, 2.5
      a_damped = math.sqrt(n) * a + math.sqrt(lam) * np.eye(5)
      b_damped = math.sqrt(n) * b + math.sqrt(lam) * np.eye(3)
      a_inv, b_inv = laplace.covariance_factors(post)
      chex.assert_trees_all_close(a_inv, np.linalg.inv(a_damped), atol=1e-10)
      chex.assert_trees_all_close(b_inv, np.linalg.inv(b_damped), atol=1e-10)
      logdet_a, logdet_b = laplace.log_determinants(post)
      chex.assert_trees_all_close(
        (logdet_a, logdet_b), (np.linalg.slogdet(a_damped)[1], np.linalg.slogdet(b_damped)[1]), atol=1e-10
      )

  @parameterized.parameters(False, True)
  def test_embedding_variance_is_pushforward_of_weight_covariance(self, add_bias):
    with jax.enable_x64(True):
      p = 5
      rng = np.random.default_rng(1)
      post = laplace.posterior_from_factors(
        _random_psd(rng, p), _random_psd(rng, 3), pseudo_data_count=3.0, prior_precision=0.7
      )
      phi = rng.normal(size=(4, p - int(add_bias)))
      aug = np.concatenate([phi, np.ones((4, 1))], 1) if add_bias else phi
      a_inv, b_inv = (np.asarray(x) for x in laplace.covariance_factors(post))
      sigma = np.kron(a_inv, b_inv)  # covariance of the row-major vec(W)
      expected = []
      for x in aug:
        jac = np.kron(x[None, :], np.eye(3))  # ∂(xᵀW)/∂vec(W), [q, p·q]
        expected.append(np.diag(jac @ sigma @ jac.T))
      got = laplace.embedding_variance(post, jnp.asarray(phi), add_bias=add_bias)
      chex.assert_trees_all_close(got, np.stack(expected), atol=1e-10)

  def test_bad_input(self):
    rng = np.random.default_rng(2)
    a, b = _random_psd(rng, 4), _random_psd(rng, 3)
    with pytest.raises(ValueError, match="square"):
      laplace.posterior_from_factors(a[:, :3], b)
    not_psd = a - 3.0 * np.eye(4) * np.abs(a).max()
    with pytest.raises(ValueError, match="positive semi-definite"):
      laplace.posterior_from_factors(not_psd, b)
    with pytest.raises(ValueError, match="symmetric"):
      laplace.posterior_from_factors(a + np.triu(np.ones((4, 4)), 1), b)
    for lam in (0.0, -1.0, float("nan")):
      with pytest.raises(ValueError, match="prior_precision"):
        laplace.posterior_from_factors(a, b, prior_precision=lam)
    with pytest.raises(ValueError, match="pseudo_data_count"):
      laplace.posterior_from_factors(a, b, pseudo_data_count=0.0)
    laplace.check_factor_shapes(a, b, feature_dim=3, embed_dim=3, add_bias=True)  # fits: no error
    with pytest.raises(ValueError, match="factor A has shape"):
      laplace.check_factor_shapes(a, b, feature_dim=4, embed_dim=3, add_bias=True)
    with pytest.raises(ValueError, match="factor B has shape"):
      laplace.check_factor_shapes(a, b, feature_dim=4, embed_dim=4)
    post = laplace.posterior_from_factors(a, b)
    with pytest.raises(ValueError, match="do not match"):
      laplace.embedding_variance(post, jnp.ones((2, 4)), add_bias=True)
    with pytest.raises(ValueError, match="weight_sq_norm"):
      laplace.fit_prior_precision(post, 0.0)
    with pytest.raises(ValueError, match="mode"):
      laplace.log_evidence(post, 1.0, mode="official")


class EvidenceTest(parameterized.TestCase):
  def _setup(self, p=6, q=4):
    rng = np.random.default_rng(3)
    post = laplace.posterior_from_factors(
      _random_psd(rng, p) * 50, _random_psd(rng, q) * 20, pseudo_data_count=10.0
    )
    return post, float(np.sum(rng.normal(size=(p, q)) ** 2))

  def test_corrected_matches_dense_kronecker_log_determinant(self):
    with jax.enable_x64(True):
      post, w_sq = self._setup()
      a, b = (np.asarray(x) for x in laplace.covariance_factors(post))  # inverses of A', B'
      for log_lam in (-2.0, 0.5, 3.0):
        post_l = post._replace(prior_precision=jnp.exp(log_lam))
        a_inv, b_inv = (np.asarray(x) for x in laplace.covariance_factors(post_l))
        logdet_kron = -np.linalg.slogdet(np.kron(a_inv, b_inv))[1]  # log|A' ⊗ B'|
        expected = -0.5 * math.exp(log_lam) * w_sq + 0.5 * 24 * log_lam - 0.5 * logdet_kron
        chex.assert_trees_all_close(laplace.log_evidence(post, w_sq, log_lam), expected, atol=1e-9)
      del a, b

  @parameterized.parameters("corrected", "faithful")
  def test_gradient_matches_finite_differences(self, mode):
    with jax.enable_x64(True):
      post, w_sq = self._setup()
      fn = lambda t: laplace.log_evidence(post, w_sq, t, mode=mode)
      for t in (-1.0, 0.7, 2.5):
        eps = 1e-5
        fd = (fn(t + eps) - fn(t - eps)) / (2 * eps)
        chex.assert_trees_all_close(jax.grad(fn)(t), fd, atol=1e-6, rtol=1e-6)

  def test_corrected_minus_faithful_is_documented_difference(self):
    with jax.enable_x64(True):
      post, w_sq = self._setup(p=7, q=3)
      p, q = 7, 3
      for t in (-1.0, 2.0):
        logdet_a, logdet_b = laplace.log_determinants(post._replace(prior_precision=jnp.exp(t)))
        diff = laplace.log_evidence(post, w_sq, t) - laplace.log_evidence(post, w_sq, t, mode="faithful")
        expected = 0.5 * (2 * p - q) * logdet_a + 0.5 * (2 * q - p) * logdet_b
        chex.assert_trees_all_close(diff, expected, atol=1e-9)
        self.assertGreater(abs(float(diff)), 1e-3)

  def test_official_adam_solver_is_the_official_fit(self):
    """solver="official_adam" = BayesVLM's optimize_prior_precision (Adam on log λ from 400, lr 1e-2, 300
    steps, maximising log_prior − (p·log|A'| + q·log|B'|)), transliterated to NumPy; it stops short of the
    optimum the default solver reaches."""
    rng = np.random.default_rng(3)
    p, q, n = 6, 4, 10.0
    a, b = _random_psd(rng, p) * 50, _random_psd(rng, q) * 20
    w_sq = float(np.sum(rng.normal(size=(p, q)) ** 2))

    def official_marglik(t):
      lam = math.exp(t)
      a_ = a * math.sqrt(n) + math.sqrt(lam) * np.eye(p)
      b_ = b * math.sqrt(n) + math.sqrt(lam) * np.eye(q)
      log_prior = -0.5 * lam * w_sq + 0.5 * p * q * math.log(lam)
      return log_prior - (np.linalg.slogdet(a_)[1] * p + np.linalg.slogdet(b_)[1] * q)

    t, m, v = math.log(400.0), 0.0, 0.0  # torch.optim.Adam(lr=1e-2, maximize=True), default betas and eps
    for step in range(1, 301):
      grad = -(official_marglik(t + 1e-6) - official_marglik(t - 1e-6)) / 2e-6
      m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
      t -= 1e-2 * (m / (1 - 0.9**step)) / (math.sqrt(v / (1 - 0.999**step)) + 1e-8)
    with jax.enable_x64(True):
      post = laplace.posterior_from_factors(jnp.asarray(a), jnp.asarray(b), pseudo_data_count=n)
      adam = laplace.fit_prior_precision(post, w_sq, mode="faithful", solver="official_adam")
      optimum = laplace.fit_prior_precision(post, w_sq, mode="faithful")
    np.testing.assert_allclose(float(adam), math.exp(t), rtol=1e-6)
    assert official_marglik(math.log(float(optimum))) > official_marglik(t) + 1e-3  # Adam stopped short
    with pytest.raises(ValueError, match="solver='adam'"):
      laplace.fit_prior_precision(post, w_sq, solver="adam")

  @parameterized.parameters("corrected", "faithful")
  def test_fit_maximises_evidence(self, mode):
    with jax.enable_x64(True):
      post, w_sq = self._setup()
      lam = laplace.fit_prior_precision(post, w_sq, mode=mode)
      fn = lambda t: laplace.log_evidence(post, w_sq, t, mode=mode)
      self.assertLess(abs(float(jax.grad(fn)(jnp.log(lam)))), 1e-6)
      grid = np.linspace(-10, 10, 401)
      self.assertGreaterEqual(float(fn(jnp.log(lam))), float(jnp.max(jax.vmap(fn)(grid))) - 1e-9)
    # float32 agrees (the default dtype the binaries run in).
    post32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), post)
    chex.assert_trees_all_close(
      laplace.fit_prior_precision(post32, w_sq, mode=mode), lam, rtol=1e-3, atol=0.0
    )
    # The whole online refit (eigendecomposition + fit) also runs under jit.
    refit = jax.jit(
      lambda a, b, w: laplace.fit_prior_precision(
        laplace.posterior_from_factors(a, b, pseudo_data_count=10.0), w, mode=mode
      )
    )
    rng = np.random.default_rng(7)
    a32, b32 = (jnp.asarray(_random_psd(rng, dim) * 30, jnp.float32) for dim in (6, 4))
    eager = laplace.fit_prior_precision(
      laplace.posterior_from_factors(a32, b32, pseudo_data_count=10.0), w_sq, mode=mode
    )
    chex.assert_trees_all_close(refit(a32, b32, w_sq), eager, rtol=1e-4, atol=0.0)

  def test_fit_clamps_to_bounds(self):
    post, w_sq = self._setup()
    lam = laplace.fit_prior_precision(post, w_sq, bounds=(1e-6, 1e-4))
    chex.assert_trees_all_close(lam, 1e-4, rtol=1e-3, atol=0.0)
    with pytest.raises(ValueError, match="bounds"):
      laplace.fit_prior_precision(post, w_sq, bounds=(1.0, 0.5))


def write_torch_zip(path, array, *, transposed=False, pickle_bytes=None):
  """Writes `array` (float32) as `torch.save` does (zip format version 3), with the standard library only.

  The data.pkl opcodes are those of the official BayesVLM factor files (`pickletools.dis` of
  hessians/hessian_CLIP-ViT-B-32-laion2B-s34B-b79K/B_img_analytic.pt in AaltoML/BayesVLM): protocol 2,
  GLOBAL torch._utils._rebuild_tensor_v2 applied to (persistent id ("storage", torch.FloatStorage, "0",
  "cpu", numel), storage offset, size, stride, False, OrderedDict()); the memo (BINPUT) opcodes are left out
  and every int is a 4-byte BININT. Entries: <name>/data.pkl, <name>/byteorder ("little"), <name>/data/0 (raw
  little-endian storage), <name>/version ("3\\n"), <name>/.data/serialization_id.
  `transposed`: the storage holds arrayᵀ and the stride reads it back transposed.
  `pickle_bytes`: replaces data.pkl (to test what the reader refuses).
  """
  import struct
  import zipfile

  array = np.asarray(array, np.float32)
  storage = np.ascontiguousarray(array.T if transposed else array)
  stride = tuple(s // 4 for s in (storage.T.strides if transposed else storage.strides))

  def text(value):
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw

  def ints(values):  # TUPLE1..3 as torch writes them (MARK ... TUPLE beyond)
    body = b"".join(b"J" + struct.pack("<i", v) for v in values)
    return body + bytes([0x84 + len(values)]) if 1 <= len(values) <= 3 else b"(" + body + b"t"

  data_pkl = pickle_bytes if pickle_bytes is not None else (
    b"\x80\x02" + b"ctorch._utils\n_rebuild_tensor_v2\n"
    + b"((" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu")
    + b"J" + struct.pack("<i", storage.size) + b"tQ"  # the persistent id, then BINPERSID
    + b"K\x00" + ints(array.shape) + ints(stride) + b"\x89"  # offset, size, stride, requires_grad
    + b"ccollections\nOrderedDict\n)R" + b"tR.")
  name = pathlib.Path(path).stem
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(f"{name}/data.pkl", data_pkl)
    archive.writestr(f"{name}/byteorder", "little")
    archive.writestr(f"{name}/data/0", storage.astype("<f4").tobytes())
    archive.writestr(f"{name}/version", "3\n")
    archive.writestr(f"{name}/.data/serialization_id", "0" * 40)


class SerialisationTest(parameterized.TestCase):
  def test_orbax_round_trip(self):
    import tempfile

    rng = np.random.default_rng(4)
    factors = {
      "img": laplace.KFACFactors(
        jnp.asarray(_random_psd(rng, 4), jnp.float32),
        jnp.asarray(_random_psd(rng, 3), jnp.float32),
        jnp.float32(12),
      ),
      "txt": laplace.KFACFactors(
        jnp.asarray(_random_psd(rng, 5), jnp.float32),
        jnp.asarray(_random_psd(rng, 3), jnp.float32),
        jnp.float32(12),
      ),
    }
    info = {"lambda_img": 3.5, "n_img": 10.0, "model": "sandbox"}
    with tempfile.TemporaryDirectory() as tmp:
      laplace.save_factors(f"{tmp}/factors", factors, info)
      loaded, loaded_info = laplace.load_factors(f"{tmp}/factors")
      self.assertEqual(loaded_info, info)
      self.assertEqual(set(loaded), {"img", "txt"})
      for name in factors:
        chex.assert_trees_all_close(tuple(loaded[name]), tuple(factors[name]), atol=0.0)
      with pytest.raises(FileNotFoundError):
        laplace.load_factors(f"{tmp}/missing")

  def test_official_import_without_torch_reads_the_official_format(self):
    """The success path with torch unimportable: factor files in the official format written by hand
    (`write_torch_zip`), one of them a transposed (non-contiguous) tensor, read back exactly."""
    import json
    import tempfile

    rng = np.random.default_rng(5)
    arrays = {f"{m}_{t}": _random_psd(rng, 4 if m == "A" else 3).astype(np.float32)
              for m in "AB" for t in ("img", "txt")}
    arrays["B_txt"] = arrays["B_txt"] + np.triu(np.ones((3, 3), np.float32))  # not symmetric: order matters
    info = {"lambda_img": 1.5, "n_img": 10, "lambda_txt": 2.5, "n_txt": 10}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(sys.modules, {"torch": None}):
      for name, arr in arrays.items():
        write_torch_zip(f"{tmp}/{name}_analytic.pt", arr, transposed=name == "B_txt")
      with open(f"{tmp}/prior_precision_analytic.json", "w") as f:
        json.dump(info, f)
      factors, got_info = laplace.import_official_factors(tmp)
    self.assertEqual(got_info, info)
    for tag in ("img", "txt"):
      np.testing.assert_array_equal(np.asarray(factors[tag].a), arrays[f"A_{tag}"])
      np.testing.assert_array_equal(np.asarray(factors[tag].b), arrays[f"B_{tag}"])
      self.assertTrue(np.isnan(float(factors[tag].num_data)))

  def test_torch_reader_runs_no_pickled_code(self):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
      path = f"{tmp}/evil.pt"
      payload = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."  # os.system("true")
      write_torch_zip(path, np.eye(2, dtype=np.float32), pickle_bytes=payload)
      with pytest.raises(pickle.UnpicklingError, match="refusing the pickled global os.system"):
        laplace.read_torch_tensor(path)
      with open(f"{tmp}/plain.pt", "wb") as f:
        f.write(b"not a zip")
      with pytest.raises(ValueError, match="not a torch.save zip archive"):
        laplace.read_torch_tensor(f"{tmp}/plain.pt")
      with pytest.raises(FileNotFoundError, match="A_img_analytic.pt nor A_img.pt"):
        laplace.import_official_factors(tmp)

  @pytest.mark.skipif(not HAS_TORCH, reason="needs torch to write the .pt files with torch.save itself")
  def test_official_import_of_torch_save_files(self):
    import json
    import tempfile

    import torch

    rng = np.random.default_rng(5)
    arrays = {
      f"{m}_{t}": _random_psd(rng, 4 if m == "A" else 3).astype(np.float32)
      for m in "AB"
      for t in ("img", "txt")
    }
    with tempfile.TemporaryDirectory() as tmp:
      for name, arr in arrays.items():
        torch.save(torch.from_numpy(arr), f"{tmp}/{name}_analytic.pt")
      info = {"lambda_img": 1.5, "n_img": 10, "lambda_txt": 2.5, "n_txt": 10}
      with open(f"{tmp}/prior_precision_analytic.json", "w") as f:
        json.dump(info, f)
      factors, got_info = laplace.import_official_factors(tmp)
      # The stdlib writer of the torch-free test writes files torch itself loads (strided one included).
      write_torch_zip(f"{tmp}/by_hand.pt", arrays["B_txt"], transposed=True)
      by_hand = torch.load(f"{tmp}/by_hand.pt", weights_only=True)
      self.assertFalse(by_hand.is_contiguous())
      np.testing.assert_array_equal(by_hand.numpy(), arrays["B_txt"])
    self.assertEqual(got_info, info)
    for tag in ("img", "txt"):
      chex.assert_trees_all_close(factors[tag].a, arrays[f"A_{tag}"], atol=0.0)
      chex.assert_trees_all_close(factors[tag].b, arrays[f"B_{tag}"], atol=0.0)
