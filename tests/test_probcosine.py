"""Tests of bayesprompt.bayes.probcosine and .predictive (Monte Carlo, quadrature, fixtures)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from bayesprompt.bayes import laplace, predictive, probcosine

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

DIM = 16


def _pair_with_cosine(cos, rng):
  """Unit means μ_g, μ_h with μ_gᵀμ_h = cos."""
  a = rng.normal(size=DIM)
  a /= np.linalg.norm(a)
  b = rng.normal(size=DIM)
  b -= a * (a @ b)
  b /= np.linalg.norm(b)
  return a, cos * a + math.sqrt(1 - cos**2) * b


def _mc_cosines(mu_g, var_g, mu_h, var_h, num, rng):
  g = mu_g + np.sqrt(var_g) * rng.standard_normal((num, DIM))
  h = mu_h + np.sqrt(var_h) * rng.standard_normal((num, DIM))
  return np.sum(g * h, 1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(h, axis=1))


def _moments64(mu_g, var_g, mu_h, var_h):
  with jax.enable_x64(True):
    mean, var = probcosine.probcosine_moments(*(jnp.asarray(x[None]) for x in (mu_g, var_g, mu_h, var_h)))
    return float(mean[0, 0]), float(var[0, 0])


class ProbCosineTest(parameterized.TestCase):
  @parameterized.parameters(0.0, 0.3, 0.7)
  def test_mean_matches_monte_carlo_at_small_variance(self, cos):
    rng = np.random.default_rng(int(cos * 10))
    mu_g, mu_h = _pair_with_cosine(cos, rng)
    var_g = 1e-5 / DIM * rng.uniform(0.5, 1.5, DIM)
    var_h = 1e-5 / DIM * rng.uniform(0.5, 1.5, DIM)
    draws = _mc_cosines(mu_g, var_g, mu_h, var_h, 10**6, rng)
    mean, _ = _moments64(mu_g, var_g, mu_h, var_h)
    std_err = draws.std() / math.sqrt(draws.size)
    self.assertLess(
      abs(mean - draws.mean()), 4 * std_err, msg=f"approx {mean} vs MC {draws.mean()} ± {std_err}"
    )

  def test_variance_sweep(self):
    """Reports the variance approximation error over a sweep, and checks its small-variance limit.

    To first order in σ (isotropic σ²_g = σ²_h), the true Var[cos] is ProbCosine's numerator with μ_h replaced
    by its component orthogonal to μ_g (and vice versa), so Var_approx / Var_true → 1 / (1 − cos²).
    """
    rng = np.random.default_rng(0)
    rows = []
    for cos in (0.0, 0.3, 0.7):
      mu_g, mu_h = _pair_with_cosine(cos, rng)
      for scale in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        var = np.full(DIM, scale / DIM)
        draws = _mc_cosines(mu_g, var, mu_h, var, 200_000, rng)
        mean, approx = _moments64(mu_g, var, mu_h, var)
        rel = approx / draws.var() - 1
        rows.append((cos, scale, mean - draws.mean(), rel))
        if scale == 1e-4:
          self.assertAlmostEqual(rel, cos**2 / (1 - cos**2), delta=0.03)
    print("\nProbCosine vs Monte Carlo (D=16, unit means, σ² = scale/D on both sides):")
    print("  cos   scale   mean error   variance relative error")
    for cos, scale, mean_err, rel in rows:
      print(f"  {cos:.1f}  {scale:6.0e}  {mean_err:+.2e}   {rel:+.3f}")

  def test_factored_equals_general(self):
    rng = np.random.default_rng(1)
    mu_g, mu_h = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    quad_g, quad_h = rng.uniform(0.1, 1, 5), rng.uniform(0.1, 1, 7)
    b_g, b_h = rng.uniform(0.01, 0.1, 8), rng.uniform(0.01, 0.1, 8)
    general = probcosine.probcosine_moments(
      jnp.asarray(mu_g),
      jnp.asarray(np.outer(quad_g, b_g)),
      jnp.asarray(mu_h),
      jnp.asarray(np.outer(quad_h, b_h)),
    )
    factored = probcosine.probcosine_moments_factored(
      *(jnp.asarray(x) for x in (mu_g, quad_g, b_g, mu_h, quad_h, b_h))
    )
    chex.assert_trees_all_close(factored, general, atol=1e-6, rtol=1e-5)
    logits = probcosine.probcosine_logits_factored(
      *(jnp.asarray(x) for x in (mu_g, quad_g, b_g, mu_h, quad_h, b_h)), logit_scale=2.0, logit_bias=-1.0
    )
    chex.assert_trees_all_close(
      logits, (math.exp(2.0) * general[0] - 1.0, math.exp(4.0) * general[1]), atol=1e-4, rtol=1e-5
    )

  def test_moments_against_direct_sums(self):
    rng = np.random.default_rng(2)
    mu_g, var_g = rng.normal(size=(3, 6)), rng.uniform(0, 0.2, (3, 6))
    mu_h, var_h = rng.normal(size=(4, 6)), rng.uniform(0, 0.2, (4, 6))
    mean, var = probcosine.probcosine_moments(*(jnp.asarray(x) for x in (mu_g, var_g, mu_h, var_h)))
    for i in range(3):
      for j in range(4):
        norms = np.sum(mu_g[i] ** 2 + var_g[i]) * np.sum(mu_h[j] ** 2 + var_h[j])
        self.assertAlmostEqual(float(mean[i, j]), mu_g[i] @ mu_h[j] / math.sqrt(norms), places=5)
        num = np.sum((mu_g[i] ** 2 + var_g[i]) * var_h[j] + var_g[i] * mu_h[j] ** 2)
        self.assertAlmostEqual(float(var[i, j]), num / norms, places=5)

  def test_no_pairwise_feature_tensor(self):
    n, m, d = 3, 5, 7
    args = (jnp.ones((n, d)), jnp.ones((n, d)), jnp.ones((m, d)), jnp.ones((m, d)))
    for fn, fargs in (
      (probcosine.probcosine_moments, args),
      (
        probcosine.probcosine_moments_factored,
        (jnp.ones((n, d)), jnp.ones(n), jnp.ones(d), jnp.ones((m, d)), jnp.ones(m), jnp.ones(d)),
      ),
    ):
      jaxpr = jax.make_jaxpr(fn)(*fargs)
      sizes = [math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
      self.assertLess(max(sizes), n * m * d, msg=f"{fn.__name__} builds an N×M×D intermediate")

  @pytest.fixture(autouse=True)
  def _fixtures(self, fixtures_dir):
    self.fixtures_dir = fixtures_dir

  @parameterized.parameters("openclip_vit_tiny", "hf_clip_tiny", "hf_siglip_tiny")
  def test_zero_variance_logits_are_the_fixture_logits(self, name):
    io = np.load(self.fixtures_dir / f"{name}.io.npz")
    img, txt = jnp.asarray(io["image_features"]), jnp.asarray(io["text_features"])
    bias = io["logit_bias"] if "logit_bias" in io else None
    mean, var = probcosine.probcosine_logits(
      img, jnp.zeros_like(img), txt, jnp.zeros_like(txt), io["logit_scale"], bias
    )
    chex.assert_trees_all_close(mean, io["logits_per_image"], atol=1e-4)
    chex.assert_trees_all_close(var, np.zeros_like(io["logits_per_image"]), atol=0.0)

  def test_bad_input(self):
    with pytest.raises(ValueError, match="same shape"):
      probcosine.probcosine_moments(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.ones((3, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="dimension"):
      probcosine.probcosine_moments(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="quad"):
      probcosine.probcosine_moments_factored(
        jnp.ones((2, 3)), jnp.ones(3), jnp.ones(3), jnp.ones((3, 3)), jnp.ones(3), jnp.ones(3)
      )
    variances = jnp.asarray([[0.1, -0.2, 0.1], [0.1, 0.1, 0.1]])
    with pytest.raises(ValueError, match=r"var_g must be ≥ 0.*var_g\[0, 1\] = -0.2"):
      probcosine.probcosine_moments(jnp.ones((2, 3)), variances, jnp.ones((3, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match=r"var_h\[1, 0\] = nan"):
      probcosine.probcosine_moments(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)),
                                    jnp.asarray([[0.1, 0.1, 0.1], [np.nan, 0.1, 0.1]]))
    # Under jit the values are tracers: no check, no error.
    mean, var = jax.jit(probcosine.probcosine_moments)(jnp.ones((2, 3)), variances, jnp.ones((3, 3)),
                                                      jnp.ones((3, 3)))
    assert mean.shape == var.shape == (2, 3)


class PredictiveTest(chex.TestCase):
  def test_probit_close_to_monte_carlo_at_small_variance(self):
    rng = np.random.default_rng(3)
    mean = jnp.asarray(rng.normal(size=(6, 5)) * 2, jnp.float32)
    var = jnp.asarray(rng.uniform(0, 0.02, (6, 5)), jnp.float32)
    mc = predictive.mc_predictive(jax.random.key(0), mean, var, 4000, chunk_size=500)
    chex.assert_trees_all_close(predictive.probit_predictive(mean, var), mc, atol=3e-3)
    # and both move away from the deterministic softmax as σ grows (the comparison is not vacuous)
    big = var * 500
    self.assertGreater(
      float(jnp.abs(predictive.probit_predictive(mean, big) - jax.nn.softmax(mean)).max()), 0.05
    )

  def test_monte_carlo_matches_quadrature_for_two_classes(self):
    # softmax over two logits = sigmoid of their difference d ~ N(m, v1 + v2): a 1-D Gauss–Hermite oracle.
    mean = np.array([[1.0, -0.5], [0.3, 0.2]])
    var = np.array([[0.8, 0.5], [2.0, 1.0]])
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    m, s = mean[:, 0] - mean[:, 1], np.sqrt(var.sum(1))
    p0 = (weights[None] / np.sqrt(2 * np.pi) / (1 + np.exp(-(m[:, None] + s[:, None] * nodes[None])))).sum(1)
    mc = predictive.mc_predictive(
      jax.random.key(1),
      jnp.asarray(mean, jnp.float32),
      jnp.asarray(var, jnp.float32),
      40_000,
      chunk_size=4000,
    )
    chex.assert_trees_all_close(mc[:, 0], p0, atol=6e-3)  # 4·SE with SE ≤ 0.5/√40000

  @chex.variants(with_jit=True, without_jit=True)
  def test_monte_carlo_chunking_and_log_space(self):
    rng = np.random.default_rng(4)
    mean = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    var = jnp.asarray(rng.uniform(0, 1, (3, 4)), jnp.float32)
    key = jax.random.key(2)
    run = lambda chunk, log=False: self.variant(
      lambda k, m, v: predictive.mc_predictive(k, m, v, 37, chunk_size=chunk, log_probs=log)
    )(key, mean, var)
    reference = run(37)
    for chunk in (1, 16, 100):
      chex.assert_trees_all_close(run(chunk), reference, atol=1e-6)
    chex.assert_trees_all_close(jnp.exp(run(5, True)), reference, atol=1e-6)
    chex.assert_trees_all_close(reference.sum(-1), jnp.ones(3), atol=1e-5)
    # σ = 0 gives the plain softmax.
    chex.assert_trees_all_close(
      predictive.mc_predictive(key, mean, jnp.zeros_like(var), 8), jax.nn.softmax(mean), atol=1e-6
    )

  def test_sample_logits_moments(self):
    mean = jnp.asarray([[0.5, -1.0, 2.0]])
    var = jnp.asarray([[0.1, 1.0, 4.0]])
    draws = predictive.sample_logits(jax.random.key(3), mean, var, 50_000)
    self.assertEqual(draws.shape, (1, 50_000, 3))
    chex.assert_trees_all_close(draws.mean(1), mean, atol=0.05)
    chex.assert_trees_all_close(draws.var(1), var, atol=0.1, rtol=0.05)

  def test_weight_samples_have_the_kronecker_joint_covariance(self):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(3, 3))
    post = laplace.posterior_from_factors(a @ a.T, b @ b.T, pseudo_data_count=2.0, prior_precision=0.5)
    phi = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    draws = predictive.sample_projection_embeddings(jax.random.key(4), post, phi, emb, 40_000, add_bias=True)
    self.assertEqual(draws.shape, (40_000, 2, 3))
    a_inv, b_inv = (np.asarray(x) for x in laplace.covariance_factors(post))
    aug = np.concatenate([np.asarray(phi), np.ones((2, 1))], 1)
    centred = np.asarray(draws) - np.asarray(emb)[None]
    emp = np.einsum("sie,sjf->ijef", centred, centred) / centred.shape[0]
    expected = np.einsum("ij,ef->ijef", aug @ a_inv @ aug.T, b_inv)  # Cov(g_i, g_j) = (φ_iᵀA'⁻¹φ_j)·B'⁻¹
    chex.assert_trees_all_close(emp, expected, atol=0.03 * np.abs(expected).max())
    chex.assert_trees_all_close(np.asarray(draws).mean(0), emb, atol=0.03 * math.sqrt(np.abs(expected).max()))
    marginal = laplace.embedding_variance(post, phi, add_bias=True)
    chex.assert_trees_all_close(np.einsum("iiee->ie", expected), marginal, atol=1e-5, rtol=1e-4)

  def test_probit_limit_with_unequal_variances(self):
    """The documented limit: equal means, one class with a large variance. The probit shrinks that class's
    logit towards 0 and gives the other class ~0.98; Monte Carlo (and, with 2 classes, exact quadrature of
    P(μ + σε wins)) gives it ~0.5-0.6."""
    mean = jnp.asarray([[5.0, 5.0]])
    var = jnp.asarray([[0.0, 100.0]])
    probit = predictive.probit_predictive(mean, var)
    mc = predictive.mc_predictive(jax.random.key(0), mean, var, num_samples=4000)
    x, w = np.polynomial.hermite_e.hermegauss(200)  # E over ε ~ N(0, 1) of softmax_0 = σ(−10ε)
    exact = np.sum(w * (1 / (1 + np.exp(np.clip(10 * x, -50, 50))))) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(mc[0, 0], exact, atol=0.03)
    assert float(probit[0, 0]) > 0.95 and abs(float(probit[0, 0]) - exact) > 0.4

  def test_bad_input(self):
    with pytest.raises(ValueError, match="same shape"):
      predictive.probit_predictive(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"logits_var must be ≥ 0.*logits_var\[1, 2\] = -1.0"):
      predictive.probit_predictive(jnp.ones((2, 3)), jnp.asarray([[0.0, 1.0, 2.0], [0.5, 0.5, -1.0]]))
    with pytest.raises(ValueError, match="logits_var"):
      predictive.mc_predictive(jax.random.key(0), jnp.ones((2, 3)), -jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="num_samples"):
      predictive.mc_predictive(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((2, 3)), 0)
