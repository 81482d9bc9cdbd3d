"""Tests of bayesprompt.bayes.ove: brute-force NumPy loops, OVE ≤ softmax, the official code's behaviours.

The faithful-mode oracle `official_loss_numpy` transliterates the authors' Dassl trainer (`APEX_OVE_PG`:
affine_matrix, ove_logit, polya_gamma_mean, kappa `.repeat`,
conditional_posterior_weights_2, gaussian_rsample, log_softmax_ove + nll_loss) into NumPy, including its
n×C×(C−1) OVE tensor, on tiny sizes.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from jax.test_util import check_grads

from bayesprompt.bayes import ove
from bayesprompt.bayes.polya_gamma import sample_polya_gamma

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

N, C, M = 4, 5, 3  # one batch shape for the loss tests, so the PG sampler compiles once per dtype


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def random_batch(seed, n=N, num_classes=C, scale=3.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((n, num_classes))).astype(dtype)
  teacher = (scale * rng.standard_normal((n, num_classes))).astype(dtype)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return logits, teacher, labels


def reference_noise(rng, n, num_classes, num_samples, omega_source, psi0_full, dtype):
  """The random numbers `ove_pg_loss` documents, in its [n, C] pair layout (pair (i, c) at column c ≠ y_i):
  ε[m] = normal(split(k_eps, M)[m], [n, C]); sampled ω = sample_polya_gamma(k_omega, 1, ψ⁰_full, [M, n, C]).
  """
  k_omega, k_eps = jax.random.split(rng)
  keys = jax.random.split(k_eps, num_samples)
  eps = np.stack([np.asarray(jax.random.normal(k, (n, num_classes), dtype)) for k in keys])
  omega = None
  if omega_source != "prior_mean":
    shape = (num_samples, n, num_classes)
    omega = np.asarray(sample_polya_gamma(k_omega, 1, psi0_full, shape=shape, dtype=dtype))
  return eps.astype(np.float64), omega


def full_differences(logits, labels):
  """ψ⁰_full[i, c] = f_{i,y_i} − f_{i,c} (0 in column y_i), by a loop."""
  out = np.zeros(logits.shape, np.float32)
  for i, y in enumerate(labels):
    for c in range(logits.shape[1]):
      out[i, c] = logits[i, y] - logits[i, c]
  return out


def corrected_loss_numpy(logits, teacher, labels, eps, sampled_omega, *, alpha, weight, omega_source):
  """Brute force over samples m, rows i and classes c ≠ y_i (increasing c)."""
  logits, eps = np.asarray(logits, np.float64), np.asarray(eps, np.float64)
  teacher = None if teacher is None else np.asarray(teacher, np.float64)
  num_samples, n = eps.shape[0], logits.shape[0]
  total = 0.0
  for m in range(num_samples):
    for i in range(n):
      y = labels[i]
      for c in range(logits.shape[1]):
        if c == y:
          continue
        psi = logits[i, y] - logits[i, c]
        use_teacher = teacher is not None and omega_source != "posterior_gibbs"
        psi0 = teacher[i, y] - teacher[i, c] if use_teacher else psi
        if omega_source == "prior_mean":
          omega = 0.25 if psi0 == 0 else math.tanh(abs(psi0) / 2) / (2 * abs(psi0))
        else:
          omega = float(sampled_omega[m, i, c])
        mean = (alpha * psi + 0.5) / (omega + alpha)
        sample = mean + math.sqrt(1.0 / (omega + alpha)) * eps[m, i, c]
        total -= log_sigmoid(sample)
  loss = total / (num_samples * n)
  if teacher is not None:
    loss += weight * np.mean((logits - teacher) ** 2)
  return loss


def official_loss_numpy(pred, learned_pred, label, eps, *, alpha, lambda_1):
  """The official trainer's forward pass (fp32 branch), in NumPy.

  eps [M, n, C] (pair (i, c) at column c) feeds the true-class rows.
  """
  pred, learned_pred = np.asarray(pred, np.float64), np.asarray(learned_pred, np.float64)
  n, n_cls = pred.shape

  def affine_matrix(y):  # N = 1 as in batch_affine_matrix
    a = np.zeros((n_cls - 1, n_cls))
    a[np.arange(n_cls - 1), y] = 1.0
    a[np.arange(n_cls - 1), [c for c in range(n_cls) if c != y]] = -1.0
    return a

  batch_a = np.stack([affine_matrix(j) for j in range(n_cls)])  # [C, C-1, C]
  kappa = np.eye(n_cls)[label] - 0.5
  losses = []
  for m in range(eps.shape[0]):
    ove_logits = np.einsum("nk,jhk->njh", pred, batch_a)  # n × C × (C-1): the tensor we never build
    learned_ove_logits = np.einsum("nk,jhk->njh", learned_pred, batch_a)
    new_logits = []
    for cls_idx in range(n_cls):
      logit, learned_ove_logit = ove_logits[:, cls_idx], learned_ove_logits[:, cls_idx]
      kappa_c = np.tile(kappa[..., cls_idx], (1, n_cls - 1))  # torch .repeat(1, C-1) of a 1-D [n] tensor
      c_clamped = np.clip(learned_ove_logit, 1e-8, 20)
      omega = 1.0 / (c_clamped + 1e-8) * np.tanh(np.minimum(0.5 * c_clamped, 10))
      logit = logit.reshape(n * (n_cls - 1), -1)
      kappa_c = kappa_c.reshape(n * (n_cls - 1), -1)
      omega = omega.flatten()
      sigma_inv_diag = (omega + alpha)[:, None]
      mu = (alpha * logit + kappa_c) / sigma_inv_diag
      sigma = 1 / sigma_inv_diag
      noise = np.zeros((n, n_cls - 1))
      rows = np.nonzero(label == cls_idx)[0]
      for i in rows:  # our ε on the true-class rows; other rows never reach the loss
        noise[i] = [eps[m, i, c] for c in range(n_cls) if c != cls_idx]
      new_logits.append((mu + np.sqrt(sigma) * noise.reshape(-1, 1)).reshape(n, n_cls - 1))
    new_logits = np.stack(new_logits, axis=-1).transpose(0, 2, 1)  # n × C × (C-1)
    log_prob = log_sigmoid(new_logits).sum(-1)
    nll_loss = -np.mean(log_prob[np.arange(n), label])
    reg_loss = 0.0 if lambda_1 == 0 else np.mean((learned_pred - pred) ** 2)
    losses.append(nll_loss + lambda_1 * reg_loss)
  return float(np.mean(losses))


class OneVsEachTest(parameterized.TestCase):
  def test_differences_and_log_likelihood_vs_loop(self):
    logits, _, labels = random_batch(0, n=6, num_classes=7)
    psi = np.asarray(ove.one_vs_each_differences(jnp.asarray(logits), jnp.asarray(labels)))
    loglik = np.asarray(ove.one_vs_each_log_likelihood(jnp.asarray(logits), jnp.asarray(labels)))
    self.assertEqual(psi.shape, (6, 6))
    for i in range(6):
      expected = [float(logits[i, labels[i]]) - float(logits[i, c]) for c in range(7) if c != labels[i]]
      np.testing.assert_allclose(psi[i], expected, atol=1e-5)
      self.assertAlmostEqual(float(loglik[i]), sum(log_sigmoid(np.asarray(expected))), delta=1e-4)

  @parameterized.parameters(0.1, 3.0, 30.0)
  def test_bound_below_softmax_likelihood(self, scale):
    with jax.enable_x64(True):
      logits, _, labels = random_batch(int(scale * 10), n=200, num_classes=12, scale=scale, dtype=np.float64)
      bound = ove.one_vs_each_log_likelihood(jnp.asarray(logits), jnp.asarray(labels))
      exact = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1)[:, 0]
      self.assertTrue(bool(jnp.all(bound <= exact + 1e-12)))

  def test_never_builds_the_n_c_c_tensor(self):
    n, num_classes = 8, 50
    logits, teacher, labels = random_batch(1, n=n, num_classes=num_classes)

    def loss(logits, key):
      return ove.ove_pg_loss(key, logits, teacher, labels, num_samples=1)[0]

    for fn in (loss, jax.value_and_grad(loss)):
      jaxpr = jax.make_jaxpr(fn)(jnp.asarray(logits), jax.random.key(0))
      sizes = [math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")]
      self.assertLessEqual(max(sizes), n * num_classes)  # n·C·(C−1) = 19,600 would be the official tensor


class PosteriorTest(parameterized.TestCase):
  def test_posterior_formula_and_reparameterised_samples(self):
    m = jnp.asarray([[-2.0, 0.0, 1.5]])
    omega = jnp.asarray([[0.2, 0.25, 0.1]])
    mean, var = ove.pg_posterior(m, 2.0, omega, 0.5)
    chex.assert_trees_all_close(mean, (2.0 * m + 0.5) / (omega + 2.0), atol=1e-6)
    chex.assert_trees_all_close(var, 1.0 / (omega + 2.0), atol=1e-6)
    rng = jax.random.key(0)
    samples = ove.pg_posterior_sample(rng, mean, var, num_samples=10_000)
    self.assertEqual(samples.shape, (10_000, 1, 3))
    second = mean + jnp.sqrt(var) * jax.random.normal(jax.random.split(rng, 10_000)[1], (1, 3))
    chex.assert_trees_all_close(samples[1], second, atol=1e-6)
    se = jnp.sqrt(var / 10_000)
    self.assertTrue(bool(jnp.all(jnp.abs(samples.mean(0) - mean) < 4 * se)))
    self.assertTrue(bool(jnp.all(jnp.abs(samples.var(0) / var - 1) < 4 * math.sqrt(2 / 10_000))))

  def test_official_pg_mean_and_kappa_on_a_hand_worked_batch(self):
    # "PG mean" of the official code: 2× the true mean for c > 0, 0.25 for c ≤ 0, frozen above c = 20.
    c = jnp.asarray([-3.0, 0.0, 1.0, 2.0, 25.0])
    expected = [0.25, 0.25, math.tanh(0.5), math.tanh(1.0) / 2, math.tanh(10.0) / 20]
    chex.assert_trees_all_close(ove.official_pg_mean(c), jnp.asarray(expected), atol=1e-6)
    true_mean = [math.tanh(1.5) / 6, 0.25, math.tanh(0.5) / 2, math.tanh(1.0) / 4, math.tanh(12.5) / 50]
    self.assertAlmostEqual(expected[2] / true_mean[2], 2.0, places=5)
    # κ for labels (0, 1, 2), C = 3: flat t = 2i + h takes κ of sample t mod 3 (worked out by hand).
    kappa = ove.official_kappa(jnp.asarray([0, 1, 2]), 3)
    chex.assert_trees_all_close(kappa, jnp.asarray([[0.5, -0.5], [-0.5, -0.5], [-0.5, 0.5]]), atol=0.0)
    chex.assert_trees_all_close(ove.official_kappa(jnp.asarray([2]), 3), jnp.full((1, 2), 0.5), atol=0.0)


class LossTest(parameterized.TestCase):
  @parameterized.product(omega_source=ove.OMEGA_SOURCES, with_teacher=(True, False))
  def test_corrected_loss_vs_brute_force(self, omega_source, with_teacher):
    logits, teacher, labels = random_batch(2)
    teacher = teacher if with_teacher else None
    weight = 0.2 if with_teacher else 0.0
    rng = jax.random.key(11)
    loss, aux = ove.ove_pg_loss(rng, jnp.asarray(logits), teacher, jnp.asarray(labels), prior_precision=1.5,
                                teacher_weight=weight, num_samples=M, omega_source=omega_source)
    psi0_source = teacher if (with_teacher and omega_source != "posterior_gibbs") else logits
    psi0_full = full_differences(psi0_source, labels)
    eps, omega = reference_noise(rng, N, C, M, omega_source, psi0_full, jnp.float32)
    expected = corrected_loss_numpy(logits, teacher, labels, eps, omega, alpha=1.5, weight=weight,
                                    omega_source=omega_source)
    self.assertAlmostEqual(float(loss), expected, delta=1e-4 * max(1.0, abs(expected)))
    self.assertAlmostEqual(float(aux["nll"]) + weight * float(aux["teacher_reg"]), float(loss), delta=1e-4)

  def test_faithful_reproduces_the_official_code_and_corrected_does_not(self):
    # Hand-picked batch: negative and > 20 teacher OVE logits (ω = 0.25 and clipped), repeated labels, n > 1.
    logits = np.asarray([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 4.0], [-1.0, 2.0, 0.0]], np.float32)
    teacher = np.asarray([[1.0, 3.0, -22.0], [0.5, 1.0, 2.0], [0.0, -1.0, 2.5], [1.0, 0.0, -0.5]], np.float32)
    labels = np.asarray([0, 1, 2, 1], np.int32)
    rng = jax.random.key(5)
    eps, _ = reference_noise(rng, 4, 3, 2, "prior_mean", None, jnp.float32)
    expected = official_loss_numpy(logits, teacher, labels, eps, alpha=1.0, lambda_1=0.2)
    kwargs = dict(prior_precision=1.0, teacher_weight=0.2, num_samples=2)
    faithful, _ = ove.ove_pg_loss(rng, logits, teacher, labels, mode="faithful", **kwargs)
    corrected, _ = ove.ove_pg_loss(rng, logits, teacher, labels, mode="corrected", **kwargs)
    self.assertAlmostEqual(float(faithful), expected, delta=1e-5)
    self.assertGreater(abs(float(corrected) - expected), 0.05)
    # Each defect on its own: the official κ alone, and the official ω alone, change the loss.
    psi = ove.one_vs_each_differences(logits, labels)
    psi0 = ove.one_vs_each_differences(teacher, labels)
    kappa = np.asarray(ove.official_kappa(labels, 3))
    self.assertTrue(np.any(kappa < 0))  # the mis-broadcast hits this batch
    self.assertFalse(np.allclose(ove.official_pg_mean(psi0), ove.polya_gamma_mean(1, psi0)))
    self.assertEqual(psi.shape, (4, 2))

  def test_faithful_single_sample_batch_has_correct_kappa(self):
    logits, teacher, labels = random_batch(3, n=1)
    rng = jax.random.key(2)
    eps, _ = reference_noise(rng, 1, C, 1, "prior_mean", None, jnp.float32)
    faithful, _ = ove.ove_pg_loss(rng, logits, teacher, labels, mode="faithful")
    expected = official_loss_numpy(logits, teacher, labels, eps, alpha=1.0, lambda_1=0.2)
    self.assertAlmostEqual(float(faithful), expected, delta=1e-5)

  @parameterized.parameters("prior_mean", "prior_sample")
  def test_gradients_float64(self, omega_source):
    with jax.enable_x64(True):
      logits, teacher, labels = random_batch(4, dtype=np.float64)
      rng = jax.random.key(9)

      def loss(logits):
        return ove.ove_pg_loss(rng, logits, teacher, labels, num_samples=M, omega_source=omega_source)[0]

      check_grads(loss, (jnp.asarray(logits),), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
      grad = jax.grad(loss)(jnp.asarray(logits))
      self.assertGreater(float(jnp.abs(grad).max()), 1e-3)

  def test_teacher_weight_zero_without_teacher(self):
    logits, _, labels = random_batch(5)
    for omega_source in ove.OMEGA_SOURCES:
      def fn(f, rng, source=omega_source):
        return ove.ove_pg_loss(rng, f, None, labels, teacher_weight=0.0, num_samples=M, omega_source=source)

      (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logits), jax.random.key(0))
      self.assertTrue(bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad))), msg=omega_source)
      self.assertGreater(float(jnp.abs(grad).max()), 1e-4)
      self.assertEqual(float(aux["teacher_reg"]), 0.0)
      if omega_source == "prior_mean":  # and under jit
        jitted = jax.jit(jax.value_and_grad(fn, has_aux=True))
        (jit_loss, _), _ = jitted(jnp.asarray(logits), jax.random.key(0))
        self.assertAlmostEqual(float(jit_loss), float(loss), delta=1e-5)

  def test_bad_values_under_jit_give_nan(self):
    logits, teacher, _ = random_batch(6)

    @jax.jit
    def loss(labels, alpha):
      return ove.ove_pg_loss(jax.random.key(0), logits, teacher, labels, prior_precision=alpha)[0]

    self.assertTrue(bool(jnp.isfinite(loss(jnp.asarray([0, 1, 2, 3]), 1.0))))
    self.assertTrue(bool(jnp.isnan(loss(jnp.asarray([0, 1, 5, 3]), 1.0))))
    self.assertTrue(bool(jnp.isnan(loss(jnp.asarray([0, -1, 2, 3]), 1.0))))
    self.assertTrue(bool(jnp.isnan(loss(jnp.asarray([0, 1, 2, 3]), -1.0))))


class PaddedRowsTest(parameterized.TestCase):
  @parameterized.parameters("corrected", "faithful")
  def test_masked_rows_leave_every_mean_under_jit(self, mode):
    """A batch with padded rows (mask False, label −1, NaN logits) at its end gives, under jit, the loss,
    metrics and gradient of the batch without them (the padded rows' gradient is 0). Faithful mode's κ
    pattern depends on n, so there only finiteness and the zero gradient hold."""
    logits, teacher, labels = random_batch(11, n=3)
    pad = 2
    padded_logits = np.concatenate([logits, np.full((pad, C), np.nan, np.float32)])
    padded_teacher = np.concatenate([teacher, np.zeros((pad, C), np.float32)])
    padded_labels = np.concatenate([labels, np.full(pad, -1, np.int32)])
    mask = padded_labels >= 0

    @jax.jit
    def loss_and_grad(logits, teacher, labels, mask):
      def loss(z):
        value, aux = ove.ove_pg_loss(jax.random.key(4), z, teacher, labels, num_samples=2, mode=mode,
                                     row_mask=mask)
        return value, aux
      return jax.value_and_grad(loss, has_aux=True)(logits)

    (loss_pad, aux_pad), grad_pad = loss_and_grad(padded_logits, padded_teacher, padded_labels, mask)
    (loss_ref, aux_ref), grad_ref = loss_and_grad(logits, teacher, labels, np.ones(3, bool))
    for value in (loss_pad, grad_pad, *aux_pad.values()):
      self.assertTrue(bool(jnp.all(jnp.isfinite(value))), msg=str(value))
    np.testing.assert_array_equal(grad_pad[3:], 0.0)
    if mode == "corrected":
      np.testing.assert_allclose(loss_pad, loss_ref, rtol=1e-6)
      np.testing.assert_allclose(grad_pad[:3], grad_ref, rtol=1e-5, atol=1e-7)
      for name in aux_ref:
        np.testing.assert_allclose(aux_pad[name], aux_ref[name], rtol=1e-6, err_msg=name)

  def test_the_objective_masks_label_minus_one_as_ce_does(self):
    from bayesprompt.objectives import make_objective

    class Output:
      def __init__(self, logits):
        self.logits, self.kl = logits, jnp.zeros(())

    logits, teacher, labels = random_batch(12, n=3)
    padded = np.concatenate([logits, np.full((1, C), np.nan, np.float32)])[None]  # [S=1, 4, C]
    padded_teacher = np.concatenate([teacher, np.zeros((1, C), np.float32)])
    padded_labels = np.concatenate([labels, [-1]]).astype(np.int32)
    objective = make_objective("ove_pg")
    step = jax.jit(jax.value_and_grad(lambda z, t, y: objective(Output(z), y, jax.random.key(0), t), has_aux=True))
    (loss_pad, metrics_pad), grad_pad = step(jnp.asarray(padded), jnp.asarray(padded_teacher), padded_labels)
    (loss_ref, metrics_ref), grad_ref = step(jnp.asarray(logits[None]), jnp.asarray(teacher), labels)
    np.testing.assert_allclose(loss_pad, loss_ref, rtol=1e-6)
    np.testing.assert_allclose(grad_pad[:, :3], grad_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad_pad[:, 3], 0.0)
    for name, value in metrics_ref.items():
      np.testing.assert_allclose(metrics_pad[name], value, rtol=1e-6, err_msg=name)


class BadInputTest(parameterized.TestCase):
  def test_errors_name_the_bad_value(self):
    logits, teacher, labels = random_batch(7)
    key = jax.random.key(0)
    cases = [
        (dict(labels=np.asarray([0, 1, 7, 2])), r"labels\[2\] = 7"),
        (dict(labels=np.asarray([0, -1, 1, 2])), r"labels\[1\] = -1"),
        (dict(logits=logits[:, :1], teacher=teacher[:, :1]), "C = 1"),
        (dict(num_samples=0), "num_samples.*0"),
        (dict(prior_precision=-1.0), "prior_precision = -1.0"),
        (dict(teacher_weight=-0.1), "teacher_weight = -0.1"),
        (dict(teacher=None), "teacher_logits is None but teacher_weight = 0.2"),
        (dict(omega_source="prior_sample", mode="faithful"), "omega_source must be 'prior_mean'"),
        (dict(mode="official"), "mode must be one of"),
        (dict(omega_source="posterior"), "omega_source must be one of"),
        (dict(labels=np.asarray([0, 1, 2])), r"labels must be \[n\] = \[4\]"),
        (dict(teacher=teacher[:2]), "teacher_logits .* must match"),
    ]
    for overrides, message in cases:
      args = dict(logits=logits, teacher=teacher, labels=labels)
      args.update({k: v for k, v in overrides.items() if k in args})
      options = {k: v for k, v in overrides.items() if k not in args}
      with self.assertRaisesRegex(ValueError, message, msg=str(overrides)):
        ove.ove_pg_loss(key, args["logits"], args["teacher"], args["labels"], **options)
    with self.assertRaisesRegex(TypeError, "labels must be integers"):
      ove.one_vs_each_log_likelihood(logits, labels.astype(np.float32))
    with self.assertRaisesRegex(ValueError, "prior_precision = -2.0"):
      ove.pg_posterior(jnp.zeros(3), -2.0, jnp.ones(3))

  def test_empty_batch_and_negative_omega(self):
    with self.assertRaisesRegex(ValueError, r"at least one example.*n = 0"):
      ove.ove_pg_loss(jax.random.key(0), np.zeros((0, C), np.float32), np.zeros((0, C), np.float32),
                      np.zeros((0,), np.int32))
    with self.assertRaisesRegex(ValueError, r"omega must be ≥ 0.*omega\[1\] = -0.5"):
      ove.pg_posterior(jnp.zeros(3), 1.0, jnp.asarray([0.2, -0.5, 1.0]))
    with self.assertRaisesRegex(ValueError, r"omega\[0\] = nan"):
      ove.pg_posterior(jnp.zeros(2), 1.0, jnp.asarray([np.nan, 1.0]))
    # Under jit nothing is checked (tracers), and valid values pass.
    mean, var = jax.jit(ove.pg_posterior)(jnp.zeros(3), 1.0, jnp.asarray([0.2, 0.5, 1.0]))
    np.testing.assert_allclose(var, 1.0 / np.asarray([1.2, 1.5, 2.0]), rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
