"""Metrics against hand-worked examples and a brute-force ECE; the results writer's aggregation."""

import csv
import json
import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from bayesprompt.eval import metrics, results

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

# Four examples, confidences in four different 20-bins, away from bin edges (worked by hand below).
PROBS = np.array([[0.72, 0.18, 0.10], [0.09, 0.61, 0.30], [0.24, 0.24, 0.52], [0.43, 0.41, 0.16]], np.float32)
LABELS = np.array([0, 2, 2, 1], np.int32)


class HandWorkedTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_accuracy_nll_brier_ece(self):
    # argmax = [0, 1, 2, 0] -> correct [1, 0, 1, 0].
    chex.assert_trees_all_close(self.variant(metrics.accuracy)(PROBS, LABELS), 0.5, atol=0)
    chex.assert_trees_all_close(
      self.variant(metrics.nll)(PROBS, LABELS),
      -(math.log(0.72) + math.log(0.30) + math.log(0.52) + math.log(0.41)) / 4,
      atol=1e-6,
    )
    # Rows: .28²+.18²+.10² = .1208; .09²+.61²+.70² = .8702; .24²+.24²+.48² = .3456; .43²+.59²+.16² = .5586.
    chex.assert_trees_all_close(self.variant(metrics.brier)(PROBS, LABELS), 1.8952 / 4, atol=1e-6)
    # One example per bin: ECE = mean |correct - confidence| = (.28 + .61 + .48 + .43) / 4.
    chex.assert_trees_all_close(self.variant(metrics.ece)(PROBS, LABELS), 0.45, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ece_shared_bin(self):
    probs = np.array([[0.91, 0.09], [0.07, 0.93], [0.60, 0.40]], np.float32)
    labels = np.array([0, 0, 0])
    # Bin (.90, .95]: two examples, accuracy 1/2, confidence .92; bin (.55, .60]: one correct at .60.
    expected = 2 / 3 * abs(0.5 - 0.92) + 1 / 3 * abs(1 - 0.60)
    chex.assert_trees_all_close(self.variant(metrics.ece)(probs, labels), expected, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nll_from_logits(self):
    logits = jnp.log(jnp.array([[1.0, 2.0, 3.0], [4.0, 4.0, 2.0]])) + 7.0  # softmax: [1,2,3]/6, [.4,.4,.2]
    chex.assert_trees_all_close(
      self.variant(metrics.nll_from_logits)(logits, jnp.array([2, 2])),
      -(math.log(0.5) + math.log(0.2)) / 2,
      atol=1e-6,
    )

  def test_harmonic_mean(self):
    chex.assert_trees_all_close(metrics.harmonic_mean(0.8, 0.6), 2 * 0.48 / 1.4, atol=1e-7)
    chex.assert_trees_all_close(metrics.harmonic_mean(0.0, 0.0), 0.0, atol=0)
    chex.assert_trees_all_close(metrics.harmonic_mean(1.0, 0.0), 0.0, atol=0)
    chex.assert_trees_all_close(
      metrics.harmonic_mean(jnp.array([0.5, 1.0]), jnp.array([0.5, 1.0])), jnp.array([0.5, 1.0]), atol=1e-7
    )

  def test_classification_metrics_from_logits(self):
    logits = np.log(PROBS) + 3.0
    out = metrics.classification_metrics(logits, LABELS)
    chex.assert_trees_all_close(
      out, {"accuracy": 0.5, "nll": metrics.nll(PROBS, LABELS), "ece": 0.45, "brier": 1.8952 / 4}, atol=1e-5
    )


def _brute_force_ece(probs, labels, num_bins):
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    members = [i for i in range(len(conf)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
    if members:
      total += len(members) / len(conf) * abs(np.mean(correct[members]) - np.mean(conf[members]))
  return total


@pytest.mark.parametrize("seed,num_classes,num_bins", [(0, 3, 20), (1, 10, 20), (2, 100, 20), (3, 5, 7)])
def test_ece_and_diagram_against_brute_force(seed, num_classes, num_bins):
  rng = np.random.default_rng(seed)
  # Dirichlet with small concentration -> a spread of confidences (float32, as the metrics compute).
  probs = rng.dirichlet(np.full(num_classes, 0.3), size=500).astype(np.float32)
  labels = rng.integers(0, num_classes, 500)
  value = metrics.ece(probs, labels, num_bins)
  diagram = metrics.reliability_diagram(probs, labels, num_bins)
  np.testing.assert_allclose(value, _brute_force_ece(probs, labels, num_bins), atol=1e-6)
  assert diagram["count"].sum() == 500 and diagram["edges"].shape == (num_bins + 1,)
  conf = probs.max(-1)
  for b in range(num_bins):
    inside = (conf > b / num_bins) & (conf <= (b + 1) / num_bins)
    assert diagram["count"][b] == inside.sum()
    if inside.any():
      np.testing.assert_allclose(diagram["confidence"][b], conf[inside].mean(), atol=1e-6)


def test_probability_metrics_is_the_hand_worked_record():
  """The one evaluation record (prompt_run and the sharded evaluate): the hand-worked values above, a zero
  probability on the true class clipped at 1e-12 instead of inf, and the example count."""
  record = metrics.probability_metrics(PROBS, LABELS)
  assert set(record) == {"accuracy", "nll", "ece", "brier", "num_examples"} and record["num_examples"] == 4
  np.testing.assert_allclose(record["accuracy"], 0.5, atol=0)
  np.testing.assert_allclose(record["nll"], -(math.log(0.72) + math.log(0.30) + math.log(0.52) + math.log(0.41)) / 4,
                             atol=1e-6)
  np.testing.assert_allclose(record["brier"], 1.8952 / 4, atol=1e-6)
  np.testing.assert_allclose(record["ece"], float(metrics.ece(PROBS, LABELS)), atol=0)
  zero = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
  clipped = metrics.probability_metrics(zero, np.array([1, 0], np.int32))
  np.testing.assert_allclose(clipped["nll"], (-math.log(1e-12) - math.log(0.5)) / 2, rtol=1e-5)


def test_ece_is_zero_when_calibrated_and_one_hot():
  probs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1]]
  chex.assert_trees_all_close(metrics.ece(probs, np.array([0, 1, 2, 3, 1])), 0.0, atol=0)
  chex.assert_trees_all_close(metrics.ece(probs, np.array([1, 0, 3, 2, 0])), 1.0, atol=0)  # sure and wrong


def test_metric_input_errors():
  with pytest.raises(ValueError, match=r"labels must be \[N\] with N = 4"):
    metrics.accuracy(PROBS, LABELS[:3])
  with pytest.raises(ValueError, match=r"must be \[N, C\]"):
    metrics.ece(PROBS[0], LABELS[:1])
  with pytest.raises(TypeError, match="labels must be integers"):
    metrics.brier(PROBS, LABELS.astype(np.float32))
  with pytest.raises(ValueError, match="empty"):
    metrics.nll(PROBS[:0], LABELS[:0])
  with pytest.raises(ValueError, match="num_bins must be a positive int"):
    metrics.ece(PROBS, LABELS, num_bins=0)


# --------------------------------------------------------------------------------------------------------
# Results writer.

BASE = {"pets": [0.90, 0.92, 0.94], "cars": [0.60, 0.70, 0.65]}
NEW = {"pets": [0.95, 0.97, 0.99], "cars": [0.70, 0.50, 0.90]}


def _writer(tmp_path):
  writer = results.ResultsWriter(tmp_path / "run", title="toy")
  for dataset in BASE:
    for seed in range(3):
      writer.add(dataset, seed + 1, {"accuracy": BASE[dataset][seed], "ece": 0.01 * (seed + 1)}, split="base")
      writer.add(dataset, seed + 1, {"accuracy": NEW[dataset][seed], "ece": 0.02 * (seed + 1)}, split="new")
  return writer


def _row(summary, dataset, split, metric):
  (row,) = [r for r in summary if (r["dataset"], r["split"], r["metric"]) == (dataset, split, metric)]
  return row


def test_writer_aggregates_seeds_and_datasets(tmp_path):
  summary = _writer(tmp_path).summary()
  hm = lambda a, b: 2 * a * b / (a + b)  # noqa: E731
  for dataset in BASE:
    base = _row(summary, dataset, "base", "accuracy")
    assert base["mean"] == pytest.approx(np.mean(BASE[dataset])) and base["num_seeds"] == 3
    assert base["std"] == pytest.approx(np.std(BASE[dataset], ddof=1))
    h = _row(summary, dataset, "hm", "accuracy")
    assert h["mean"] == pytest.approx(hm(np.mean(BASE[dataset]), np.mean(NEW[dataset])))  # HM of the means
    assert h["std"] == pytest.approx(
      np.std([hm(b, n) for b, n in zip(BASE[dataset], NEW[dataset], strict=True)], ddof=1)
    )
  # cars: HM of means (0.65, 0.70) != mean of per-seed HMs -- the writer uses the former.
  per_seed = np.mean([hm(b, n) for b, n in zip(BASE["cars"], NEW["cars"], strict=True)])
  assert abs(_row(summary, "cars", "hm", "accuracy")["mean"] - per_seed) > 1e-3
  avg_base = np.mean([np.mean(v) for v in BASE.values()])
  avg_new = np.mean([np.mean(v) for v in NEW.values()])
  assert _row(summary, "average", "base", "accuracy")["mean"] == pytest.approx(avg_base)
  assert _row(summary, "average", "hm", "accuracy")["mean"] == pytest.approx(hm(avg_base, avg_new))
  assert _row(summary, "average", "new", "ece")["mean"] == pytest.approx(0.04)


def test_writer_files(tmp_path):
  writer = _writer(tmp_path)
  paths = writer.write()
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(writer.summary())
  pets_base = [r for r in rows if (r["dataset"], r["split"], r["metric"]) == ("pets", "base", "accuracy")][0]
  assert float(pets_base["mean"]) == pytest.approx(0.92)
  with open(paths["json"]) as f:
    blob = json.load(f)
  assert len(blob["runs"]) == 12 and blob["runs"][0]["metrics"]["accuracy"] == 0.90
  table = open(paths["md"]).read()
  assert "| pets | 92.00 ± 2.00 | 97.00 ± 2.00 |" in table
  assert table.count("\n| average |") == 1


def test_writer_bad_input(tmp_path):
  writer = results.ResultsWriter(tmp_path)
  writer.add("pets", 1, {"accuracy": 0.5})
  with pytest.raises(ValueError, match="already added"):
    writer.add("pets", 1, {"accuracy": 0.6})
  with pytest.raises(ValueError, match="finite"):
    writer.add("pets", 2, {"accuracy": float("nan")})
  with pytest.raises(ValueError, match="computed from 'base' and 'new'"):
    writer.add("pets", 3, {"accuracy": 0.5}, split="hm")
  with pytest.raises(ValueError, match="no metrics"):
    writer.add("pets", 4, {})
  with pytest.raises(ValueError, match="other than 'average'"):
    writer.add("average", 1, {"accuracy": 0.5})
  single = writer.summary()
  assert single == [dict(dataset="pets", split="all", metric="accuracy", mean=0.5, std=0.0, num_seeds=1)]
