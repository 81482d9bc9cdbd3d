"""Tests of bayesprompt.bayes.polya_gamma: polyagamma's Devroye sampler (KS), analytic moments, series sums.

The oracle is always `polyagamma.random_polyagamma(h, z, method="devroye")`: its default hybrid method, and
its "alternate"/"saddle"/"gamma" methods for real h, are biased in polyagamma 2.0.2 (mean z-scores of 9–47 at
4·10⁶ draws, e.g. "alternate" at h = 2.7, z = 0), so real b is tested through the convolution
PG(b₁) + PG(b₂) = PG(b₁ + b₂). Its Devroye sampler itself breaks for tilts |c| ≳ 175 (every draw ≈ 0.16 =
t/4, mean 60x too large, checked below), so KS tests stop at |c| = 150; larger tilts are checked against the
moments.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from polyagamma import random_polyagamma

from bayesprompt.bayes.polya_gamma import polya_gamma_mean, polya_gamma_variance, sample_polya_gamma

# Tilts from the issue, plus |c| = 1e3 (no NaN/inf, and KS there too).
# Includes both sides of the sampler's proposal switch at |c| = 2/0.64 = 3.125 (the default tier's check of it;
# test_big_sweep repeats it with 10⁶ draws).
C_VALUES = (0.0, 1e-3, -1e-3, 0.5, -0.5, 2.0, -2.0, 3.0, 3.125, -3.125, 3.2, 10.0, -10.0, 50.0, -50.0, 1e3, -1e3)
NUM_DRAWS = 100_000  # per (b, c): 1.7e6 draws per b, ~0.15 s of sampling
KS_P_MIN = 1e-4  # 45 fixed-seed KS tests; a correct sampler fails one with probability < 0.5%
ORACLE_MAX_TILT = 150.0  # polyagamma 2.0.2's Devroye sampler is wrong beyond |c| ≈ 175


def ks_2samp(x, y):
  """Two-sample Kolmogorov–Smirnov statistic D and its asymptotic p-value (Kolmogorov distribution).

  Written out rather than imported: scipy is not a dependency of the package.
  """
  x, y = np.sort(np.asarray(x, np.float64)), np.sort(np.asarray(y, np.float64))
  both = np.concatenate([x, y])
  d = np.max(np.abs(np.searchsorted(x, both, "right") / x.size - np.searchsorted(y, both, "right") / y.size))
  ne = x.size * y.size / (x.size + y.size)
  lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
  k = np.arange(1, 101)
  p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * (k * lam) ** 2))
  return d, float(np.clip(p, 0.0, 1.0))


def series_moments(b, c, terms=200_000):
  """E and Var of PG(b, c) from its definition ω = Σ_k g_k / (2π²((k−½)² + d²)), g_k ~ Gamma(b, 1), d = c/2π.

  Float64 NumPy: the first `terms` terms summed exactly, the remainder by its integral (error O(terms⁻³)).
  """
  d2 = (c / (2 * math.pi)) ** 2
  k = np.arange(1, terms + 1) - 0.5
  inv = 1.0 / (k * k + d2)
  d = math.sqrt(d2)
  tail1 = math.atan(d / terms) / d if d > 0 else 1.0 / terms
  if d > 1e-3:
    tail2 = (math.atan(d / terms) - d * terms / (terms**2 + d2)) / (2 * d**3)
  else:
    tail2 = 1.0 / (3 * terms**3)
  mean = b * (np.sum(inv) + tail1) / (2 * math.pi**2)
  var = b * (np.sum(inv * inv) + tail2) / (4 * math.pi**4)
  return mean, var


def oracle(b, c, size, seed):
  return random_polyagamma(b, c, size=size, method="devroye", random_state=np.random.default_rng(seed))


_draws_cache = {}


def jax_draws(b):
  """NUM_DRAWS draws of PG(b, c) for each c in C_VALUES: [len(C_VALUES), NUM_DRAWS] (one compile per path)."""
  if b not in _draws_cache:
    c = jnp.asarray(C_VALUES, jnp.float32)[:, None]
    draws = sample_polya_gamma(jax.random.key(100 + b), b, c, shape=(len(C_VALUES), NUM_DRAWS))
    _draws_cache[b] = np.asarray(draws)
  return _draws_cache[b]


class SamplerDistributionTest(parameterized.TestCase):
  @parameterized.parameters(1, 2, 5)
  def test_ks_against_polyagamma_devroye(self, b):
    draws = jax_draws(b)
    self.assertEqual(draws.dtype, np.float32)
    self.assertTrue(np.all(np.isfinite(draws)) and np.all(draws > 0))
    for row, c in enumerate(C_VALUES):
      if abs(c) > ORACLE_MAX_TILT:
        continue
      d, p = ks_2samp(draws[row], oracle(b, c, NUM_DRAWS, seed=row))
      self.assertGreater(p, KS_P_MIN, msg=f"b={b} c={c}: KS D={d:.4f} p={p:.2e}")

  @parameterized.parameters(1, 2, 5)
  def test_sample_moments_within_4_standard_errors(self, b):
    draws = jax_draws(b).astype(np.float64)
    for row, c in enumerate(C_VALUES):
      x = draws[row]
      mean, var = series_moments(b, c)
      centred = x - x.mean()
      se_mean = math.sqrt(var / x.size)
      se_var = math.sqrt(max(np.mean(centred**4) - np.mean(centred**2) ** 2, 0.0) / x.size)
      self.assertLess(abs(x.mean() - mean), 4 * se_mean, msg=f"b={b} c={c} mean {x.mean()} vs {mean}")
      self.assertLess(abs(np.var(x) - var), 4 * se_var, msg=f"b={b} c={c} var {np.var(x)} vs {var}")

  def test_oracle_is_broken_at_large_tilt(self):
    # Documents why KS stops at ORACLE_MAX_TILT (if polyagamma gets fixed, the cap can go).
    self.assertGreater(oracle(1, 200.0, 1000, seed=0).mean() * 400.0, 10.0)

  def test_large_tilt_is_finite_and_matches_the_mean(self):
    draws = jax_draws(1)
    for row, c in enumerate(C_VALUES):
      if abs(c) == 1e3:
        x = draws[row].astype(np.float64)
        self.assertTrue(np.all(np.isfinite(x)) and np.all(x > 0))
        mean, var = series_moments(1, c)
        self.assertLess(abs(x.mean() - mean), 4 * math.sqrt(var / x.size))

  def test_float64(self):
    cs = np.asarray([0.0, 0.5, -2.0, 10.0, 150.0])
    with jax.enable_x64(True):
      draws = sample_polya_gamma(jax.random.key(7), 1, jnp.asarray(cs)[:, None], shape=(cs.size, 50_000))
      self.assertEqual(draws.dtype, jnp.float64)
      draws = np.asarray(draws)
    for row, c in enumerate(cs):
      _, p = ks_2samp(draws[row], oracle(1, c, 50_000, seed=50 + row))
      self.assertGreater(p, KS_P_MIN, msg=f"float64 c={c}")

  @pytest.mark.slow
  def test_real_b_through_convolution(self):
    # PG(0.5, c) + PG(0.5, c) = PG(1, c) and PG(0.3, c) + PG(1.7, c) = PG(2, c) exactly; the fractional parts
    # use the truncated Gamma series, so this measures the approximation against an exact sampler.
    n = 20_000
    cs = jnp.asarray([0.0, 2.0, 10.0], jnp.float32)[:, None]
    for (b1, b2), seed in (((0.5, 0.5), 1), ((0.3, 1.7), 2)):
      k1, k2 = jax.random.split(jax.random.key(seed))
      total = sample_polya_gamma(k1, b1, cs, shape=(3, n)) + sample_polya_gamma(k2, b2, cs, shape=(3, n))
      total = np.asarray(total)
      for row, c in enumerate(np.asarray(cs[:, 0])):
        _, p = ks_2samp(total[row], oracle(int(b1 + b2), float(c), n, seed=seed * 10 + row))
        self.assertGreater(p, KS_P_MIN, msg=f"PG({b1})+PG({b2}) at c={c}")

  @pytest.mark.slow
  def test_big_sweep(self):
    # 10⁶ draws per case: KS resolves D ≈ 2.5e-3 at p = 1e-4. Includes the proposal-switch point |c| = 2/0.64.
    n = 1_000_000
    cs = (0.0, 1e-3, 0.5, 1.0, 2.0, 3.0, 3.125, 3.2, 5.0, 10.0, 50.0, 150.0, 1e3, 1e4)
    for b in (1, 2, 3, 5, 10):
      c = jnp.asarray(cs)[:, None]
      draws = np.asarray(sample_polya_gamma(jax.random.key(b), b, c, shape=(len(cs), n)))
      for row, c in enumerate(cs):
        x = draws[row].astype(np.float64)
        self.assertTrue(np.all(np.isfinite(x)) and np.all(x > 0))
        mean, var = series_moments(b, c)
        self.assertLess(abs(x.mean() - mean), 4 * math.sqrt(var / n), msg=f"b={b} c={c}")
        if abs(c) <= ORACLE_MAX_TILT:
          d, p = ks_2samp(x, oracle(b, c, n, seed=1000 * b + row))
          self.assertGreater(p, KS_P_MIN, msg=f"b={b} c={c}: D={d:.2e}")

  @pytest.mark.slow
  def test_real_b_approximation_error(self):
    # The figures quoted in the module docstring: convolution KS against Devroye and moments, 2·10⁵ draws.
    n = 200_000
    cs = (0.0, 2.0, 10.0)
    for b in (0.3, 0.5, 2.7):
      complement = math.ceil(b) - b
      k1, k2 = jax.random.split(jax.random.key(int(10 * b)))
      c = jnp.asarray(cs, jnp.float32)[:, None]
      x = np.asarray(sample_polya_gamma(k1, b, c, shape=(3, n)), np.float64)
      total = x + np.asarray(sample_polya_gamma(k2, complement, c, shape=(3, n)))
      for row, cv in enumerate(cs):
        d, p = ks_2samp(total[row], oracle(math.ceil(b), cv, n, seed=row))
        mean, var = series_moments(b, cv)
        print(f"b={b} c={cv}: convolution KS D={d:.2e} p={p:.2f}; mean rel {x[row].mean() / mean - 1:+.1e}, "
              f"var rel {x[row].var() / var - 1:+.1e}")
        self.assertGreater(p, KS_P_MIN)
        self.assertLess(abs(x[row].mean() - mean), 4 * math.sqrt(var / n))


class SamplerTransformTest(chex.TestCase):
  C = np.linspace(-20.0, 20.0, 257).astype(np.float32)

  def test_vmap_over_keys_equals_loop(self):
    keys = jax.random.split(jax.random.key(3), 4)
    c = jnp.asarray(self.C)
    batched = jax.vmap(lambda key: sample_polya_gamma(key, 1, c))(keys)
    looped = jnp.stack([sample_polya_gamma(key, 1, c) for key in keys])
    self.assertTrue(bool(jnp.all(jnp.isfinite(batched))))
    # Same keys, same accept/reject decisions; only the last ulp may differ between the two compiled programs.
    chex.assert_trees_all_close(batched, looped, atol=0.0, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    c = jnp.asarray(self.C)
    reference = sample_polya_gamma(jax.random.key(3), 1, c)
    out = self.variant(lambda key, c: sample_polya_gamma(key, 1, c))(jax.random.key(3), c)
    chex.assert_trees_all_close(out, reference, atol=0.0, rtol=1e-6)

  def test_broadcasting_traced_b_and_bad_values_under_jit(self):
    # b [3, 1] and c [1, 4] broadcast to shape (2, 3, 4). Under jit b is traced (the exact loop path), and
    # traced bad values cannot raise: b = 0 or c = inf give NaN for exactly those elements.
    b = jnp.asarray([[2], [0], [3]], jnp.int32)
    c = jnp.asarray([[0.0, 1.0, jnp.inf, -30.0]], jnp.float32)
    sample = jax.jit(sample_polya_gamma, static_argnames=("shape", "dtype"))
    out = np.asarray(sample(jax.random.key(5), b, c, shape=(2, 3, 4), dtype=jnp.bfloat16).astype(jnp.float32))
    self.assertEqual(out.shape, (2, 3, 4))
    bad = np.broadcast_to((np.asarray(b) == 0) | ~np.isfinite(np.asarray(c)), out.shape)
    self.assertTrue(np.all(np.isnan(out[bad])))
    self.assertTrue(np.all(np.isfinite(out[~bad]) & (out[~bad] > 0)))

  @pytest.mark.slow
  def test_traced_integer_b_distribution(self):
    n = 100_000
    out = np.asarray(jax.jit(sample_polya_gamma)(jax.random.key(6), jnp.full((n,), 3), jnp.full((n,), 1.5)))
    _, p = ks_2samp(out, oracle(3, 1.5, n, seed=6))
    self.assertGreater(p, KS_P_MIN)


class MomentsTest(parameterized.TestCase):
  # Around every branch point of the implementation: series thresholds 1e-3, 0.5 and 1.0, and large |c|.
  CS = (0.0, 1e-8, 1e-3, 0.01, 0.3, 0.4999, 0.5001, 0.9999, 1.0001, 2.0, -3.0, 10.0, 50.0, 300.0, -1e3)

  def test_float64_against_series(self):
    with jax.enable_x64(True):
      for b in (1.0, 2.5):
        for c in self.CS:
          mean, var = series_moments(b, c)
          got_mean = float(polya_gamma_mean(b, jnp.float64(c)))
          got_var = float(polya_gamma_variance(b, jnp.float64(c)))
          self.assertAlmostEqual(got_mean / mean, 1.0, delta=1e-12, msg=f"c={c}")
          self.assertAlmostEqual(got_var / var, 1.0, delta=1e-11, msg=f"c={c}")

  def test_float32_against_series(self):
    cs = np.asarray(self.CS, np.float32)
    mean = polya_gamma_mean(1, jnp.asarray(cs))
    var = polya_gamma_variance(1, jnp.asarray(cs))
    self.assertEqual(mean.dtype, jnp.float32)
    expected = np.asarray([series_moments(1, float(c)) for c in cs])
    chex.assert_trees_all_close(np.asarray(mean) / expected[:, 0], np.ones(cs.size), atol=1e-6)
    chex.assert_trees_all_close(np.asarray(var) / expected[:, 1], np.ones(cs.size), atol=3e-6)

  def test_limits_and_broadcasting(self):
    self.assertAlmostEqual(float(polya_gamma_mean(3, 0.0)), 0.75, places=7)
    self.assertAlmostEqual(float(polya_gamma_variance(3, 0.0)), 3 / 24, places=7)
    out = polya_gamma_variance(np.asarray([[1.0], [2.0]]), np.asarray([0.0, 1e3], np.float32))
    self.assertEqual(out.shape, (2, 2))
    self.assertTrue(bool(jnp.all(jnp.isfinite(out)) & jnp.all(out > 0)))


class BadInputTest(parameterized.TestCase):
  @parameterized.parameters((0, 1.0, "b = 0"), (-1.5, 1.0, "b = -1.5"), (np.nan, 1.0, "b = nan"),
                            (1, np.inf, "c = inf"), (1, [0.0, np.nan], "c = nan"), ([1, 0], 1.0, "b = 0"))
  def test_bad_values_raise_naming_them(self, b, c, message):
    for fn in (lambda: sample_polya_gamma(jax.random.key(0), b, c), lambda: polya_gamma_mean(b, c),
               lambda: polya_gamma_variance(b, c)):
      with self.assertRaisesRegex(ValueError, message):
        fn()

  def test_bad_types_and_shapes(self):
    with self.assertRaisesRegex(TypeError, "b must be a real"):
      sample_polya_gamma(jax.random.key(0), True, 1.0)
    with self.assertRaisesRegex(TypeError, "floating dtype"):
      sample_polya_gamma(jax.random.key(0), 1, 1.0, dtype=jnp.int32)
    with self.assertRaisesRegex(ValueError, "do not broadcast"):
      sample_polya_gamma(jax.random.key(0), np.ones(3), np.ones(4))
    with self.assertRaisesRegex(ValueError, "do not broadcast"):
      sample_polya_gamma(jax.random.key(0), 1, np.ones(4), shape=(3,))


if __name__ == "__main__":
  absltest.main()
