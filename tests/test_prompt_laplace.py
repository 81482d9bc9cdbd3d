"""Prompt Laplace (bayesprompt.bayes.prompt_laplace) against brute force and closed forms."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bayesprompt.bayes import prompt_laplace as pl

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES, FEATURE_DIM = 3, 4
CONTEXT = {"gain": jnp.asarray(1.5, jnp.float32)}  # a constant the model reads, passed as `context`


def tiny_apply(params, inputs, key, context):
  """A tiny 'prompt learner': a context [2, 3] shapes class prototypes through a tanh; logits [B, 3]."""
  del key
  prototypes = jnp.tanh(params["ctx"] @ params["mix"]) * context["gain"]  # [2, FEATURE_DIM]
  classes = jnp.stack([prototypes[0], prototypes[1], prototypes[0] * prototypes[1]])  # [C, FEATURE_DIM]
  return 3.0 * inputs["x"] @ classes.T


def tiny_setup(num=24, seed=0):
  rng = np.random.default_rng(seed)
  params = {"ctx": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
            "mix": jnp.asarray(0.5 * rng.normal(size=(3, FEATURE_DIM)), jnp.float32)}
  inputs = {"x": jnp.asarray(rng.normal(size=(num, FEATURE_DIM)), jnp.float32)}
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, num), jnp.int32)
  return params, inputs, labels


def brute_force(params, inputs, lam):
  """Explicit Jacobian (jax.jacfwd of the flat function), the GGN and the covariance, in float64."""
  theta, unravel = ravel_pytree(params)
  fn = lambda t: tiny_apply(unravel(t), inputs, None, CONTEXT)  # noqa: E731
  jac = np.asarray(jax.jacfwd(fn)(theta), np.float64)  # [B, C, P]
  probs = np.asarray(jax.nn.softmax(fn(theta)), np.float64)
  ggn = sum(jac[i].T @ (np.diag(probs[i]) - np.outer(probs[i], probs[i])) @ jac[i] for i in range(len(jac)))
  cov = np.linalg.inv(ggn + lam * np.eye(len(theta)))
  return np.asarray(fn(theta), np.float64), jac, ggn, cov


def test_full_ggn_and_covariance_match_brute_force():
  params, inputs, labels = tiny_setup()
  posterior, info = pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, kind="full",
                           prior_precision=2.0, chunk_size=7, tangent_chunk=4)
  _, _, ggn, cov = brute_force(params, inputs, 2.0)
  chex.assert_trees_all_close(np.asarray(pl.covariance(posterior)), cov, rtol=1e-4, atol=1e-6)
  eig = np.linalg.eigvalsh(ggn)
  # float32 eigh: the null-space eigenvalues come back as rounding noise of the largest one.
  np.testing.assert_allclose(np.sort(np.asarray(posterior.ggn_eigvals)), np.clip(eig, 0, None), rtol=1e-4,
                             atol=1e-5 * np.max(eig))
  assert np.isfinite(info["log_marginal_likelihood"])


def test_glm_predictive_matches_a_million_draws():
  params, inputs, labels = tiny_setup()
  test_inputs = {"x": tiny_setup(num=6, seed=1)[1]["x"]}
  lam = 0.5
  posterior, _ = pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, prior_precision=lam)
  _, _, _, cov = brute_force(params, inputs, lam)
  logits, jac, _, _ = brute_force(params, test_inputs, lam)

  # Exact moments: J Σ Jᵀ.
  mean, logit_cov = pl.glm_logit_moments(tiny_apply, params, posterior, test_inputs, context=CONTEXT)
  np.testing.assert_allclose(np.asarray(mean), logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logit_cov), np.einsum("bcp,pq,bdq->bcd", jac, cov, jac), rtol=1e-4,
                             atol=1e-6)

  # 10⁶ draws θ ~ N(θ*, Σ) through the explicit linearisation, in float64.
  rng = np.random.default_rng(0)
  chol = np.linalg.cholesky(cov)
  truth = np.zeros_like(logits)
  for _ in range(10):
    delta = rng.standard_normal((100_000, cov.shape[0])) @ chol.T
    z = logits[None] + np.einsum("bcp,sp->sbc", jac, delta)
    z = np.exp(z - z.max(-1, keepdims=True))
    truth += (z / z.sum(-1, keepdims=True)).mean(0) / 10

  key = jax.random.key(3)
  mc = pl.glm_predictive(tiny_apply, params, posterior, test_inputs, key, CONTEXT, method="mc",
                         num_samples=40_000)
  jvp = pl.glm_predictive(tiny_apply, params, posterior, test_inputs, key, CONTEXT, method="mc",
                          num_samples=40_000, use_jacobian=False)
  probit = pl.glm_predictive(tiny_apply, params, posterior, test_inputs, key, CONTEXT, method="probit")
  # MC error of 4·10⁴ draws: std ≤ 0.5/√(4·10⁴) = 2.5e-3 per entry.
  np.testing.assert_allclose(np.asarray(mc), truth, atol=1e-2)
  np.testing.assert_allclose(np.asarray(jvp), truth, atol=1e-2)
  # The probit is an approximation (not exact): close, and much closer than the MAP softmax where they differ.
  map_probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
  np.testing.assert_allclose(np.asarray(probit), truth, atol=0.06)
  assert np.max(np.abs(map_probs - truth)) > 3 * 0.01, "test data too certain to tell the predictives apart"


def test_diagonal_estimator_is_unbiased():
  params, inputs, _ = tiny_setup()
  _, _, ggn, _ = brute_force(params, inputs, 1.0)
  estimate = pl.ggn_diagonal(tiny_apply, params, inputs, jax.random.key(0), CONTEXT, chunk_size=10,
                             num_label_samples=4000)
  np.testing.assert_allclose(np.asarray(estimate), np.diag(ggn), rtol=0.06, atol=1e-3)


def test_evidence_equals_linear_gaussian_closed_form():
  rng = np.random.default_rng(0)
  num, dim, noise, lam = 30, 5, 0.7, 1.3
  x = rng.normal(size=(num, dim))
  y = x @ rng.normal(size=dim) + noise * rng.normal(size=num)
  precision = x.T @ x / noise**2 + lam * np.eye(dim)
  theta_map = np.linalg.solve(precision, x.T @ y / noise**2)
  residual = y - x @ theta_map
  loglik = -0.5 * np.sum(residual**2) / noise**2 - 0.5 * num * np.log(2 * np.pi * noise**2)
  posterior = pl.posterior_from_ggn(theta_map, x.T @ x / noise**2, prior_precision=lam)
  evidence = float(pl.log_marginal_likelihood(posterior, loglik))
  marginal_cov = noise**2 * np.eye(num) + x @ x.T / lam
  sign, logdet = np.linalg.slogdet(marginal_cov)
  closed = -0.5 * (y @ np.linalg.solve(marginal_cov, y) + logdet + num * np.log(2 * np.pi))
  assert sign > 0
  np.testing.assert_allclose(evidence, closed, rtol=1e-5)


def test_fitted_prior_precision_maximises_the_evidence():
  params, inputs, labels = tiny_setup()
  for kind in pl.KINDS:
    posterior, info = pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, kind=kind,
                             num_label_samples=8)
    grid = np.linspace(np.log(1e-4), np.log(1e4), 4001)
    values = np.asarray(jax.vmap(lambda t, p=posterior: pl.log_marginal_likelihood(p, 0.0, t))(grid))
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(np.log(info["prior_precision"]), grid[np.argmax(values)], atol=5e-3)


def numpy_evidence(mean, prior_mean, ggn_diag, lam, loglik=0.0):
  """The diagonal Laplace evidence in float64, λ a scalar or one per entry [P]."""
  mean, prior_mean, ggn_diag = (np.asarray(a, np.float64) for a in (mean, prior_mean, ggn_diag))
  lam = np.broadcast_to(np.asarray(lam, np.float64), mean.shape)
  return (loglik - 0.5 * np.sum(lam * (mean - prior_mean) ** 2) + 0.5 * np.sum(np.log(lam))
          - 0.5 * np.sum(np.log(ggn_diag + lam)))


def test_per_entry_evidence_equals_linear_gaussian_closed_form():
  """Orthogonal design columns make G diagonal, so the Laplace evidence with a per-entry prior precision is
  the exact log N(y; 0, σ²I + X Λ⁻¹ Xᵀ)."""
  rng = np.random.default_rng(1)
  num, dim, noise = 30, 5, 0.7
  x = np.linalg.qr(rng.normal(size=(num, dim)))[0] * np.array([3.0, 1.0, 0.5, 2.0, 4.0])
  y = x @ rng.normal(size=dim) + noise * rng.normal(size=num)
  lam = np.array([0.2, 5.0, 1.3, 40.0, 0.9])
  ggn = x.T @ x / noise**2
  assert np.max(np.abs(ggn - np.diag(np.diag(ggn)))) < 1e-10
  theta_map = np.linalg.solve(ggn + np.diag(lam), x.T @ y / noise**2)
  residual = y - x @ theta_map
  loglik = -0.5 * np.sum(residual**2) / noise**2 - 0.5 * num * np.log(2 * np.pi * noise**2)
  posterior = pl.posterior_from_ggn(theta_map, np.diag(ggn), prior_precision=lam)
  chex.assert_shape(posterior.prior_precision, (dim,))
  evidence = float(pl.log_marginal_likelihood(posterior, loglik))
  marginal_cov = noise**2 * np.eye(num) + x @ np.diag(1 / lam) @ x.T
  sign, logdet = np.linalg.slogdet(marginal_cov)
  closed = -0.5 * (y @ np.linalg.solve(marginal_cov, y) + logdet + num * np.log(2 * np.pi))
  assert sign > 0
  np.testing.assert_allclose(evidence, closed, rtol=1e-5)
  # and the posterior covariance is (G + Λ)⁻¹
  np.testing.assert_allclose(np.asarray(pl.covariance(posterior)), np.linalg.inv(ggn + np.diag(lam)),
                             rtol=1e-5, atol=1e-7)


def test_per_leaf_prior_precisions_maximise_the_evidence():
  """prior_groups="leaves": each leaf's λ is the maximiser of the float64 evidence along that leaf's λ (a
  brute-force grid, the other leaf held at its fitted λ), and the grouped evidence is at least the one-λ
  evidence (a special case)."""
  params, inputs, labels = tiny_setup()
  params = {**params, "mix": params["mix"] * 0.05}  # leaves on very different scales
  key = jax.random.key(0)
  posterior, info = pl.fit(tiny_apply, params, inputs, labels, key, CONTEXT, kind="diag", num_label_samples=8,
                           prior_groups="leaves")
  single, single_info = pl.fit(tiny_apply, params, inputs, labels, key, CONTEXT, kind="diag",
                               num_label_samples=8)
  assert set(info["prior_precision"]) == {"['ctx']", "['mix']"}
  ids, names = pl.leaf_groups(params)
  chex.assert_shape(posterior.prior_precision, (posterior.num_params,))
  fitted = np.array([info["prior_precision"][name] for name in names])
  assert np.all(np.isfinite(fitted)) and fitted[1] > 10 * fitted[0]  # the small leaf gets the tight prior
  np.testing.assert_allclose(np.asarray(posterior.prior_precision), fitted[ids], rtol=1e-6)
  args = (posterior.mean, posterior.prior_mean, posterior.ggn_eigvals)
  grid = np.exp(np.linspace(np.log(1e-4), np.log(1e6), 6001))
  for group in range(len(names)):
    values = []
    for lam in grid:
      trial = fitted.copy()
      trial[group] = lam
      values.append(numpy_evidence(*args, trial[ids]))
    np.testing.assert_allclose(np.log(fitted[group]), np.log(grid[int(np.argmax(values))]), atol=5e-3)
  # the log-likelihood from the estimator's own forward passes equals the model's on the whole batch
  logits = np.asarray(tiny_apply(params, inputs, None, CONTEXT), np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  picked = log_probs[np.arange(len(labels)), np.asarray(labels)]
  np.testing.assert_allclose(info["log_likelihood"], np.sum(picked), rtol=1e-5)
  grouped = numpy_evidence(*args, fitted[ids], info["log_likelihood"])
  np.testing.assert_allclose(info["log_marginal_likelihood"], grouped, rtol=1e-5)
  assert grouped >= single_info["log_marginal_likelihood"] - 1e-3
  # a predictive from the per-entry posterior
  probs = pl.glm_predictive(tiny_apply, params, posterior, inputs, jax.random.key(1), CONTEXT, method="mc",
                            num_samples=8)
  assert np.all(np.isfinite(np.asarray(probs)))


def test_per_group_prior_precision_edge_groups_go_to_the_bounds():
  """Group 0 has zero curvature (the evidence falls with λ: lower bound), group 1 sits at the prior mean (the
  evidence rises with λ: upper bound), group 2 is interior and matches its closed-form stationary point."""
  mean = np.array([0.5, -1.0, 0.0, 0.0, 0.3, 0.4], np.float32)
  ggn = np.array([0.0, 0.0, 2.0, 1.0, 4.0, 0.5], np.float32)
  ids = np.array([0, 0, 1, 1, 2, 2], np.int32)
  posterior, lams = pl.fit_prior_precision_groups(pl.posterior_from_ggn(mean, ggn), ids, bounds=(1e-6, 1e6))
  np.testing.assert_allclose(lams[:2], [1e-6, 1e6], rtol=1e-3)
  # interior: Σ_k g_k/(g_k + λ) = λ Σ_k θ_k² (the evidence's stationary point)
  lam = float(lams[2])
  np.testing.assert_allclose(np.sum(ggn[4:] / (ggn[4:] + lam)), lam * np.sum(mean[4:] ** 2), rtol=1e-4)
  chex.assert_trees_all_close(np.asarray(posterior.prior_precision), lams[ids], rtol=1e-6, atol=0)


def test_leaf_groups_follow_ravel_order():
  params = {"b": jnp.zeros((2, 3)), "a": {"w": jnp.ones(4), "v": jnp.full((1,), 2.0)}}
  ids, names = pl.leaf_groups(params)
  flat = np.asarray(ravel_pytree(params)[0])
  leaves = jax.tree.leaves(params)
  for group, leaf in enumerate(leaves):
    np.testing.assert_array_equal(flat[ids == group], np.ravel(leaf))
  assert names == ["['a']['v']", "['a']['w']", "['b']"]


def test_bad_inputs_raise():
  params, inputs, labels = tiny_setup()
  with pytest.raises(ValueError, match="kind"):
    pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, kind="kfac")
  with pytest.raises(ValueError, match="labels"):
    pl.fit(tiny_apply, params, inputs, labels[:3], jax.random.key(0), CONTEXT)
  with pytest.raises(ValueError, match="prior_precision"):
    pl.posterior_from_ggn(jnp.zeros(3), jnp.eye(3), prior_precision=0.0)
  with pytest.raises(ValueError, match="positive semi-definite"):
    pl.posterior_from_ggn(jnp.zeros(2), -jnp.eye(2))
  with pytest.raises(ValueError, match="diagonal GGN"):
    pl.posterior_from_ggn(jnp.zeros(2), jnp.eye(2), prior_precision=np.ones(2))
  with pytest.raises(ValueError, match=r"prior_precision=\[-1.\]"):
    pl.posterior_from_ggn(jnp.zeros(2), jnp.ones(2), prior_precision=np.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="shape"):
    pl.posterior_from_ggn(jnp.zeros(2), jnp.ones(2), prior_precision=np.ones(3))
  with pytest.raises(ValueError, match="prior_groups"):
    pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, kind="full", prior_groups="leaves")
  with pytest.raises(ValueError, match="prior_groups"):
    pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, kind="diag", prior_groups="layer")
  full, _ = pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, prior_precision=1.0)
  with pytest.raises(ValueError, match="diagonal GGN"):
    pl.fit_prior_precision_groups(full, np.zeros(full.num_params, np.int32))
  with pytest.raises(ValueError, match="method"):
    posterior, _ = pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, prior_precision=1.0)
    pl.glm_predictive(tiny_apply, params, posterior, inputs, jax.random.key(0), CONTEXT, method="laplace")


# ------------------------------------------------------------------------------------------------------------
# Fast path for image-independent text features (logits = s·f·t(θ)ᵀ + b).
# ------------------------------------------------------------------------------------------------------------

SCALE, BIAS, EMBED = 4.0, -0.3, 3


def tiny_text(params, key, context, class_context):
  """Class text features [C', D], row c from class c's embedding only; normalised like CLIP's."""
  del key
  hidden = jnp.tanh(class_context["emb"] @ params["ctx"] + context["gain"] * params["shift"])  # [C', 3]
  out = jnp.tanh(hidden @ params["mix"])  # [C', FEATURE_DIM]
  return out / jnp.linalg.norm(out, axis=-1, keepdims=True)


def shared_setup(num=24, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  params = {"ctx": jnp.asarray(rng.normal(size=(EMBED, 3)), jnp.float32),
            "shift": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
            "mix": jnp.asarray(rng.normal(size=(3, FEATURE_DIM)), jnp.float32)}
  classes = {"emb": jnp.asarray(rng.normal(size=(num_classes, EMBED)), jnp.float32)}
  feats = rng.normal(size=(num, FEATURE_DIM))
  feats = jnp.asarray(feats / np.linalg.norm(feats, axis=-1, keepdims=True), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, num), jnp.int32)
  return params, classes, feats, labels


def shared_apply(params, inputs, key, context):
  """The same model as a generic `apply_fn` (inputs: image features; the classes travel in the context)."""
  gain, classes = context
  return SCALE * inputs @ tiny_text(params, key, {"gain": gain}, classes).T + BIAS


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_shared_text_fast_path_equals_the_generic_path_and_brute_force(mode):
  params, classes, feats, labels = shared_setup()
  key, ctx = jax.random.key(0), CONTEXT
  fast, fast_info = pl.fit_shared_text(tiny_text, params, feats, labels, key, ctx, classes, SCALE, BIAS,
                                       prior_precision="fit", mode=mode, class_chunk=2, chunk_size=7)
  slow, slow_info = pl.fit(shared_apply, params, feats, labels, key, (ctx["gain"], classes), kind="full",
                           prior_precision="fit", chunk_size=7)
  # Brute force in float64: the explicit Jacobian of the logits and Σ_n J_nᵀ Λ_n J_n.
  theta, unravel = ravel_pytree(params)
  fn = lambda t: shared_apply(unravel(t), feats, None, (ctx["gain"], classes))  # noqa: E731
  jac = np.asarray(jax.jacfwd(fn)(theta), np.float64)
  probs = np.asarray(jax.nn.softmax(fn(theta)), np.float64)
  ggn = np.einsum("ncp,ncd,ndq->pq", jac, probs[:, :, None] * np.eye(probs.shape[1]) - probs[:, :, None]
                  * probs[:, None, :], jac)
  text, text_jac = pl.shared_text_jacobian(tiny_text, params, key, ctx, classes, mode=mode)
  text_truth = jax.jacfwd(lambda t: tiny_text(unravel(t), key, ctx, classes))(theta)
  np.testing.assert_allclose(np.asarray(text_jac), np.asarray(text_truth), rtol=1e-5, atol=1e-6)
  got, logits = pl.ggn_shared_text(text, text_jac, feats, SCALE, BIAS, chunk_size=7)
  np.testing.assert_allclose(np.asarray(got), ggn, rtol=1e-4, atol=1e-5 * np.max(np.abs(ggn)))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(fn(theta)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pl.covariance(fast)), np.asarray(pl.covariance(slow)), rtol=1e-3,
                             atol=1e-5)
  for name in ("prior_precision", "log_likelihood", "log_marginal_likelihood"):
    np.testing.assert_allclose(fast_info[name], slow_info[name], rtol=1e-4)

  # Predictive: exact logit variances = diag(J Σ Jᵀ) of the generic path; joint draws = μ + J δ exactly.
  test_feats = shared_setup(num=6, seed=1)[2]
  mean, var = pl.shared_text_logit_moments(fast, text, text_jac, test_feats, SCALE, BIAS)
  generic_ctx = (ctx["gain"], classes)
  ref_mean, ref_cov = pl.glm_logit_moments(shared_apply, params, slow, test_feats, context=generic_ctx)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(ref_mean), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(var), np.diagonal(np.asarray(ref_cov), axis1=1, axis2=2), rtol=1e-3,
                             atol=1e-6)
  assert np.all(np.isfinite(np.asarray(var))) and float(jnp.min(var)) > 0
  samples = pl.shared_text_logit_samples(fast, text, text_jac, test_feats, key, 5, SCALE, BIAS)
  deltas = np.asarray(pl.sample_perturbations(fast, key, 5), np.float64)
  test_jac = np.asarray(jax.jacfwd(lambda t: shared_apply(unravel(t), test_feats, None, generic_ctx))(theta),
                        np.float64)
  linearised = np.asarray(mean)[None] + np.einsum("ncp,sp->snc", test_jac, deltas)
  np.testing.assert_allclose(np.asarray(samples), linearised, rtol=1e-4, atol=1e-5)
  probit = pl.shared_text_predictive(fast, text, text_jac, test_feats, key, SCALE, BIAS, method="probit")
  np.testing.assert_allclose(np.asarray(probit), np.asarray(pl.probit_from_moments(ref_mean, ref_cov)),
                             atol=1e-5)


def test_shared_text_bad_inputs_raise():
  params, classes, feats, labels = shared_setup()
  with pytest.raises(ValueError, match="mode"):
    pl.shared_text_jacobian(tiny_text, params, jax.random.key(0), CONTEXT, classes, mode="sideways")
  with pytest.raises(ValueError, match="class axis"):
    pl.shared_text_jacobian(tiny_text, params, jax.random.key(0), CONTEXT, {"emb": classes["emb"],
                                                                            "other": jnp.zeros(3)})
  with pytest.raises(ValueError, match="labels"):
    pl.fit_shared_text(tiny_text, params, feats, labels[:3], jax.random.key(0), CONTEXT, classes, SCALE)
  with pytest.raises(ValueError, match="dimension"):
    pl.fit_shared_text(tiny_text, params, feats[:, :2], labels, jax.random.key(0), CONTEXT, classes, SCALE)


def test_low_rank_shared_text_ggn_is_the_ggn_of_projected_features():
  """rank r: the GGN of the Jacobian with f_n replaced by P_c f_n for class c, P_c the projector on the top-r
  eigenvectors of F_c = Σ_n p_nc f_n f_nᵀ; at r = D the exact GGN. NumPy float64 on both counts."""
  params, classes, feats, labels = shared_setup(num=40, num_classes=4)
  key = jax.random.key(0)
  theta, unravel = ravel_pytree(params)
  text_jac = np.asarray(jax.jacfwd(lambda t: tiny_text(unravel(t), key, CONTEXT, classes))(theta), np.float64)
  text = np.asarray(tiny_text(params, key, CONTEXT, classes), np.float64)
  f = np.asarray(feats, np.float64)
  logits = SCALE * f @ text.T + BIAS
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  eigvals, eigvecs = np.linalg.eigh(np.einsum("nc,nd,ne->cde", probs, f, f))
  hessians = probs[:, :, None] * np.eye(probs.shape[1]) - probs[:, :, None] * probs[:, None, :]
  exact = None
  for rank in (FEATURE_DIM, 2, 1):
    top = eigvecs[:, :, FEATURE_DIM - rank:]
    projector = np.einsum("cdr,cer->cde", top, top)
    jac = SCALE * np.einsum("nd,cde,cep->ncp", f, projector, text_jac)  # [N, C, P]
    ggn = np.einsum("ncp,ncd,ndq->pq", jac, hessians, jac)
    exact = ggn if rank == FEATURE_DIM else exact
    basis, captured = pl.feature_subspace(jnp.asarray(text, jnp.float32), feats, SCALE, BIAS, rank=rank,
                                          chunk_size=16)
    chex.assert_shape(basis, (4, FEATURE_DIM, rank))
    np.testing.assert_allclose(np.einsum("cdr,cer->cde", np.asarray(basis, np.float64),
                                         np.asarray(basis, np.float64)), projector, atol=1e-4)
    kept = eigvals[:, FEATURE_DIM - rank:].sum(-1) / eigvals.sum(-1)
    np.testing.assert_allclose(np.asarray(captured), kept, rtol=1e-4)
    _, projected_jac = pl.shared_text_jacobian(tiny_text, params, key, CONTEXT, classes, basis=basis)
    got, _ = pl.ggn_shared_text(jnp.asarray(text, jnp.float32), projected_jac, feats, SCALE, BIAS,
                                chunk_size=16, basis=basis)
    np.testing.assert_allclose(np.asarray(got), ggn, rtol=1e-3, atol=1e-4 * np.max(np.abs(ggn)))
    posterior, info = pl.fit_shared_text(tiny_text, params, feats, labels, key, CONTEXT, classes, SCALE, BIAS,
                                         prior_precision=2.0, rank=None if rank == FEATURE_DIM else rank)
    np.testing.assert_allclose(np.asarray(pl.covariance(posterior)),
                               np.linalg.inv(ggn + 2.0 * np.eye(len(theta))), rtol=2e-3, atol=1e-5)
    assert info["subspace_rank"] == rank
    np.testing.assert_allclose(info["subspace_captured"], np.min(kept), rtol=1e-4)
  # The brute force at r = D is the exact GGN of the logits.
  generic = lambda t: shared_apply(unravel(t), feats, None, (CONTEXT["gain"], classes))  # noqa: E731
  full_jac = np.asarray(jax.jacfwd(generic)(theta), np.float64)
  np.testing.assert_allclose(exact, np.einsum("ncp,ncd,ndq->pq", full_jac, hessians, full_jac), rtol=1e-4,
                             atol=1e-6 * np.max(np.abs(exact)))


def test_low_rank_bad_inputs_raise():
  params, classes, feats, labels = shared_setup()
  text = tiny_text(params, None, CONTEXT, classes)
  for rank in (0, FEATURE_DIM + 1):
    with pytest.raises(ValueError, match="rank"):
      pl.feature_subspace(text, feats, SCALE, BIAS, rank=rank)
  for rank in (0, -2, True, 1.5):
    with pytest.raises(ValueError, match="rank"):
      pl.fit_shared_text(tiny_text, params, feats, labels, jax.random.key(0), CONTEXT, classes, SCALE,
                         rank=rank)
  with pytest.raises(ValueError, match="basis"):
    pl.shared_text_jacobian(tiny_text, params, jax.random.key(0), CONTEXT, classes,
                            basis=jnp.zeros((2, FEATURE_DIM, 1)))


def test_shared_text_jacobian_rows_equal_single_class_gradients(tmp_path):
  """The text Jacobian of a CoOp on a small CLIP (text width 64, embed 128, 32 classes), exact (rev and fwd)
  and projected on r = 127 directions, row by row against jax.jacrev of one class's text feature alone.
  Regression: with the cotangents vmap-ed inside the vmap over classes, rows ≥ 73 came out wrong (jax 0.10.2,
  CPU), in the exact path too; one cotangent after the other is right."""
  import dataclasses

  import bayesprompt.clip as clip
  from bayesprompt.bayesvlm import prompt_posterior as posterior_lib
  from bayesprompt.data.sandbox import model as sandbox_model
  from bayesprompt.prompts import make_learner
  from tests.test_prompt_run import tiny_config

  config = tiny_config(sandbox_model.TOKENIZER_FILE)
  text = dataclasses.replace(config.text, width=64, layers=1)
  config = dataclasses.replace(config, embed_dim=128, text=text)
  clip.save_checkpoint(tmp_path / "clip", config, clip.init_params(config, jax.random.key(0)))
  sandbox_model.tokenizer().to_json(tmp_path / "clip" / sandbox_model.TOKENIZER_FILE)
  config, clip_params = clip.load_checkpoint(str(tmp_path / "clip"))
  learner = make_learner("coop", config, n_ctx=2)
  names = [f"class {i}" for i in range(32)]
  state = learner.prepare_classes(clip_params, names, templates=["a photo of a {}."], train_classnames=names)
  params = learner.init(jax.random.key(1), clip_params, state)
  classes = posterior_lib._per_class(state)
  text_fn = lambda p, key, cp, cs: learner.shared_text_features(p, cp, cs)  # noqa: E731
  key = jax.random.key(0)
  basis = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (32, 128, 128)))[0][:, :, :127]
  _, projected = pl.shared_text_jacobian(text_fn, params, key, clip_params, classes, basis=basis)
  _, exact = pl.shared_text_jacobian(text_fn, params, key, clip_params, classes, mode="rev")
  _, forward = pl.shared_text_jacobian(text_fn, params, key, clip_params, classes, mode="fwd")
  theta, unravel = ravel_pytree(params)
  for c in (0, 31):
    single = jax.tree.map(lambda x: x[c:c + 1], classes)  # noqa: B023
    feature = lambda t: text_fn(unravel(t), key, clip_params, single)[0]  # noqa: B023, E731
    truth = np.asarray(jax.jacrev(feature)(theta), np.float64)  # [D, P]
    np.testing.assert_allclose(np.asarray(exact[c]), truth, atol=1e-5 * np.max(np.abs(truth)))
    np.testing.assert_allclose(np.asarray(forward[c]), truth, atol=1e-5 * np.max(np.abs(truth)))
    np.testing.assert_allclose(np.asarray(projected[c]), np.asarray(basis[c], np.float64).T @ truth,
                               atol=1e-5 * np.max(np.abs(truth)))


def test_jvp_samples_in_chunks_equal_all_at_once():
  params, inputs, labels = tiny_setup()
  posterior, _ = pl.fit(tiny_apply, params, inputs, labels, jax.random.key(0), CONTEXT, kind="full",
                        prior_precision=1.0)
  key = jax.random.key(3)
  whole = pl.glm_logit_samples(tiny_apply, params, posterior, inputs, key, 7, CONTEXT)
  # Float32: a chunk's batched matmuls may sum in another order than the whole batch's (the classic XLA:CPU
  # emitters of the suite differ by up to 2e-6 on logits of order 1); a wrong chunk would be off by O(1).
  for chunk in (1, 3, 7):
    chex.assert_trees_all_close(pl.glm_logit_samples(tiny_apply, params, posterior, inputs, key, 7, CONTEXT,
                                                     sample_chunk=chunk), whole, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="sample_chunk"):
    pl.glm_logit_samples(tiny_apply, params, posterior, inputs, key, 7, CONTEXT, sample_chunk=0)
