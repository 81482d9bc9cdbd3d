"""Tests of bayesprompt.bayes.acquisition against brute-force loops in NumPy."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from bayesprompt.bayes import acquisition

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _random_probs(rng, shape, temperature=1.0):
  logits = rng.normal(size=shape) * temperature
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _h(p):
  p = np.asarray(p, np.float64).ravel()
  p = p[p > 0]
  return -np.sum(p * np.log(p))


def _bald_loop(probs):
  out = []
  for samples in probs:
    out.append(_h(samples.mean(0)) - np.mean([_h(s) for s in samples]))
  return np.array(out)


def _epig_loop(pool, targets):
  """EPIG by its definition: mean over targets of the mutual information of the K-sample joint predictive."""
  num_samples = pool.shape[1]
  scores = []
  for x in pool:
    mi = []
    for t in targets:
      joint = sum(np.outer(x[k], t[k]) for k in range(num_samples)) / num_samples
      mi.append(_h(joint.sum(1)) + _h(joint.sum(0)) - _h(joint))
    scores.append(np.mean(mi))
  return np.array(scores)


def _scaled(probs: np.ndarray, index: tuple, factor: float) -> np.ndarray:
  out = probs.copy()
  out[index] *= factor
  return out


class EntropyBaldTest(parameterized.TestCase):
  def test_entropy_and_bald_match_loops(self):
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, (9, 6, 5), temperature=2.0)
    probs[0, :, 1] = 0.0  # zero probabilities must not give NaN (0·log 0 = 0)
    probs[0] /= probs[0].sum(-1, keepdims=True)
    chex.assert_trees_all_close(
      acquisition.bald(jnp.asarray(probs, jnp.float32)), _bald_loop(probs), atol=1e-5
    )
    chex.assert_trees_all_close(
      acquisition.predictive_entropy(jnp.asarray(probs)), np.array([_h(s.mean(0)) for s in probs]), atol=1e-5
    )
    chex.assert_trees_all_close(
      acquisition.entropy(jnp.asarray(probs[:, 0])), np.array([_h(s[0]) for s in probs]), atol=1e-5
    )
    self.assertTrue(bool(jnp.all(acquisition.bald(jnp.asarray(probs)) >= -1e-6)))

  def test_bald_is_zero_when_samples_agree(self):
    probs = np.repeat(_random_probs(np.random.default_rng(1), (4, 1, 7)), 10, axis=1)
    chex.assert_trees_all_close(acquisition.bald(jnp.asarray(probs)), np.zeros(4), atol=1e-6)

  def test_bad_input(self):
    with pytest.raises(ValueError, match=r"\[N, K, C\]"):
      acquisition.bald(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="empty"):
      acquisition.bald(jnp.ones((0, 4, 3)))
    probs = np.full((2, 4, 3), 1 / 3, np.float32)
    negative = probs.copy()
    negative[1, 2] = [0.5, 0.7, -0.2]  # sums to 1, one entry negative
    with pytest.raises(ValueError, match=r"probs must be ≥ 0 \(probabilities\).*probs\[1, 2, 2\] = -0.2"):
      acquisition.bald(jnp.asarray(negative))
    with pytest.raises(ValueError, match=r"must sum to 1 .*probs\[0, 1\] sums to 2"):
      acquisition.bald(jnp.asarray(_scaled(probs, (0, 1), 2.0)))
    with pytest.raises(ValueError, match="pool_probs must sum to 1"):
      acquisition.epig(jnp.asarray(2 * probs), jnp.asarray(probs))
    np.testing.assert_allclose(jax.jit(acquisition.bald)(jnp.asarray(probs)), 0.0, atol=1e-6)  # jit: no check


class EpigTest(chex.TestCase):
  def _data(self, seed=2, pool=7, targets=5, samples=6, classes=4, target_classes=3):
    rng = np.random.default_rng(seed)
    return (
      _random_probs(rng, (pool, samples, classes), 2.0),
      _random_probs(rng, (targets, samples, target_classes), 2.0),
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_brute_force_for_any_chunking(self):
    pool, targets = self._data()
    expected = _epig_loop(pool, targets)
    for pool_chunk, target_chunk in ((1, 1), (3, 2), (7, 5), (100, 100)):
      fn = self.variant(functools.partial(acquisition.epig, pool_chunk=pool_chunk, target_chunk=target_chunk))
      got = fn(jnp.asarray(pool, jnp.float32), jnp.asarray(targets, jnp.float32))
      chex.assert_trees_all_close(got, expected, atol=2e-5)
    self.assertTrue(np.all(expected >= 0) and np.max(expected) > 1e-3)

  def test_non_negative_and_zero_when_samples_agree(self):
    pool, targets = self._data(seed=3, pool=20, targets=9)
    scores = acquisition.epig(jnp.asarray(pool), jnp.asarray(targets), pool_chunk=6, target_chunk=4)
    self.assertTrue(bool(jnp.all(scores >= -1e-6)))
    agree_pool = np.repeat(pool[:, :1], pool.shape[1], axis=1)
    agree_targets = np.repeat(targets[:, :1], pool.shape[1], axis=1)
    chex.assert_trees_all_close(
      acquisition.epig(jnp.asarray(agree_pool), jnp.asarray(agree_targets)), np.zeros(20), atol=1e-6
    )
    # Targets whose prediction does not depend on θ carry no information either.
    chex.assert_trees_all_close(
      acquisition.epig(jnp.asarray(pool), jnp.asarray(agree_targets)), np.zeros(20), atol=1e-6
    )

  def test_default_chunks_respect_the_memory_budget(self):
    for classes, budget in ((10, 2**28), (100, 2**28), (1000, 2**26)):
      pc, tc = acquisition.epig_chunks(40_000, 20_000, classes, classes, max_working_bytes=budget)
      self.assertLessEqual(3 * pc * tc * classes**2 * 4, budget)
      self.assertGreaterEqual(pc, 1)
    self.assertEqual(acquisition.epig_chunks(5, 3, 10, 10), (5, 3))  # small inputs: one chunk each
    pool, targets = self._data()
    chex.assert_trees_all_close(
      acquisition.epig(jnp.asarray(pool), jnp.asarray(targets), max_working_bytes=3 * 5 * 4 * 3 * 4 * 2),
      _epig_loop(pool, targets),
      atol=2e-5,
    )

  def test_bad_input(self):
    pool, targets = self._data()
    with pytest.raises(ValueError, match="same draws"):
      acquisition.epig(jnp.asarray(pool), jnp.asarray(targets[:, :3]))
    with pytest.raises(ValueError, match="empty"):
      acquisition.epig(jnp.zeros((0, 6, 4)), jnp.asarray(targets))
    with pytest.raises(ValueError, match="pool_chunk"):
      acquisition.epig(jnp.asarray(pool), jnp.asarray(targets), pool_chunk=0)


def _knn_data(seed=4, queries=6, pool=23, dim=5):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(queries, dim)),
    rng.uniform(0, 0.3, (queries, dim)),
    rng.normal(size=(pool, dim)),
    rng.uniform(0, 0.3, (pool, dim)),
  )


class KnnTest(parameterized.TestCase):
  @parameterized.parameters((1, 4), (3, 5), (5, 23), (4, 100))
  def test_wasserstein_matches_direct_computation(self, k, pool_chunk):
    qm, qv, pm, pv = _knn_data()
    direct = np.array(
      [
        [
          np.sum((a - b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
          for b, vb in zip(pm, pv, strict=True)
        ]
        for a, va in zip(qm, qv, strict=True)
      ]
    )
    dists, idx = acquisition.knn_wasserstein(
      *(jnp.asarray(x, jnp.float32) for x in (qm, qv, pm, pv)), k, pool_chunk=pool_chunk
    )
    order = np.argsort(direct, axis=1)[:, :k]
    np.testing.assert_array_equal(np.asarray(idx), order)
    chex.assert_trees_all_close(dists, np.take_along_axis(direct, order, 1), atol=1e-4)
    chex.assert_trees_all_close(
      acquisition.wasserstein_sq_distances(*(jnp.asarray(x) for x in (qm, qv, pm, pv))), direct, atol=1e-4
    )

  @parameterized.parameters((1, 4), (3, 5), (6, 100))
  def test_expected_cosine_matches_direct_computation(self, k, pool_chunk):
    qm, qv, pm, pv = _knn_data(seed=5)
    direct = np.array(
      [
        [a @ b / math.sqrt(np.sum(a**2 + va) * np.sum(b**2 + vb)) for b, vb in zip(pm, pv, strict=True)]
        for a, va in zip(qm, qv, strict=True)
      ]
    )
    sims, idx = acquisition.knn_expected_cosine(
      *(jnp.asarray(x, jnp.float32) for x in (qm, qv, pm, pv)), k, pool_chunk=pool_chunk
    )
    order = np.argsort(-direct, axis=1)[:, :k]
    np.testing.assert_array_equal(np.asarray(idx), order)
    chex.assert_trees_all_close(sims, np.take_along_axis(direct, order, 1), atol=1e-5)

  def test_variance_changes_the_wasserstein_neighbour(self):
    # Same means, different uncertainty: W₂ prefers the pool point whose σ matches the query's.
    query_mean, query_var = jnp.zeros((1, 2)), jnp.full((1, 2), 1.0)
    pool_mean = jnp.asarray([[0.3, 0.0], [0.3, 0.0]])
    pool_var = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
    _, idx = acquisition.knn_wasserstein(query_mean, query_var, pool_mean, pool_var, 1)
    self.assertEqual(int(idx[0, 0]), 1)

  def test_bad_input(self):
    qm, qv, pm, pv = (jnp.asarray(x) for x in _knn_data())
    for fn in (acquisition.knn_wasserstein, acquisition.knn_expected_cosine):
      with pytest.raises(ValueError, match="pool is empty"):
        fn(qm, qv, pm[:0], pv[:0], 1)
      with pytest.raises(ValueError, match="larger than the pool"):
        fn(qm, qv, pm, pv, 24)
      with pytest.raises(ValueError, match="positive integer"):
        fn(qm, qv, pm, pv, 0)
      with pytest.raises(ValueError, match="dimension"):
        fn(qm, qv, pm[:, :3], pv[:, :3], 1)
      with pytest.raises(ValueError, match="same shape"):
        fn(qm, qv[:, :3], pm, pv, 1)


def test_epig_is_jit_compatible_with_bounded_intermediates():
  """No intermediate grows with pool × targets: the largest scales with the chunk sizes only."""
  pool, targets = jnp.ones((64, 4, 3)) / 3, jnp.ones((48, 4, 3)) / 3
  jaxpr = jax.make_jaxpr(lambda p, t: acquisition.epig(p, t, pool_chunk=8, target_chunk=8))(pool, targets)

  def sizes(jaxpr):  # every intermediate, descending into scan / map / jit bodies
    for eqn in jaxpr.eqns:
      yield from (math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          yield from sizes(inner)

  all_sizes = set(sizes(jaxpr.jaxpr))
  assert 8 * 3 * 8 * 3 in all_sizes  # the walk reached the chunk's joint [pool_chunk, C, target_chunk, C*]
  assert max(all_sizes) < 64 * 48, max(all_sizes)  # nothing of size pool × targets (or larger)
