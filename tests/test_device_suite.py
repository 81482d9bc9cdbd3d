"""benchmarks/device_suite.py at --tiny sizes on the CPU (so the GPU suite cannot rot), and the shared timing
harness of the benchmarks (benchmarks/harness.py)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FIXTURES, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import harness  # noqa: E402

# The suite must run where the accelerator image has neither TFDS nor grain: the subprocess makes importing
# them fail before the suite starts.
NO_TFDS_NO_GRAIN = ("import runpy, sys; sys.modules.update(dict.fromkeys(['tensorflow_datasets', 'grain', "
                    "'tensorflow'])); sys.argv = ['benchmarks/device_suite.py'] + sys.argv[1:]; "
                    "runpy.run_path('benchmarks/device_suite.py', run_name='__main__')")


@pytest.fixture(scope="module")
def suite_output(tmp_path_factory):
  out = tmp_path_factory.mktemp("suite")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", NO_TFDS_NO_GRAIN, "--tiny", "--out", str(out), "--fixtures",
                           str(FIXTURES)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return json.loads((out / "device_suite.json").read_text()), (out / "device_suite.md").read_text()


def test_tiny_suite_every_check_passes(suite_output):
  report, markdown = suite_output
  assert report["all_checks_passed"] is True and report["has_nan"] is False
  assert not report["errors"] and not report["skipped"], (report["errors"], report["skipped"])
  names = [c["name"] for c in report["checks"]]
  for expected in ("parity openclip_vit_tiny float32", "parity hf_siglip_tiny bfloat16", "PG(1, 10) sample mean",
                   "OVE-PG loss vs float64", "KFAC N=1"):
    assert any(name.startswith(expected) for name in names), (expected, names)
  for check in report["checks"]:
    assert check["passed"] and math.isfinite(check["error"]) and check["error"] <= check["tolerance"], check
  assert "all correctness checks passed: **True**" in markdown
  assert "| parity openclip_vit_tiny float32 (precision highest) |" in markdown


def test_tiny_suite_times_every_computation(suite_output):
  report, markdown = suite_output
  titles = " / ".join(t["title"] for t in report["timings"])
  for expected in ("image forward, float32", "image forward, bfloat16", "text forward, float32",
                   "CoOp train step (CE, SGD)", "OVE-PG (prior_mean) vs CE"):
    assert expected in titles, titles
  has_torch = report["meta"]["torch"] == "used"
  for timing in report["timings"]:
    comparison = timing["comparison"]
    assert comparison["rounds"] >= 3 and comparison["headline"] in ("cpu", "wall")
    assert math.isfinite(comparison["load_before"]) and math.isfinite(comparison["load_after"])
    names = [c["name"] for c in comparison["candidates"]]
    if "OVE-PG" not in timing["title"]:
      assert any(name.startswith("torch") for name in names) == has_torch, (names, report["meta"]["torch"])
    for candidate in comparison["candidates"]:
      for metric in ("wall_ms", "cpu_ms"):
        spread = candidate[metric]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"] < math.inf, candidate
  if not has_torch:
    assert "PyTorch column" in markdown and report["meta"]["torch"] in markdown
  limits = " / ".join(row["name"] for row in report["limits"])
  for expected in ("matmul bf16", "matmul fp32 default", "elementwise", "KFAC-GGN accumulation", "EPIG pool",
                   "PG(1, c) sampler"):
    assert expected in limits, limits
  # Goals are recorded but only judged at real sizes.
  assert report["goals"] and all(goal["met"] is None for goal in report["goals"])


def _comparison(load_before, load_after, cores=2, accelerator=False):
  samples = {"ref": harness.Samples(wall=[2.0, 4.0, 3.0], cpu=[1.0, 1.0, 1.0], faults=[0, 0, 0]),
             "new": harness.Samples(wall=[1.0, 1.0, 6.0], cpu=[0.5, 0.6, 0.7], faults=[5, 5, 5])}
  return harness.Comparison(samples=samples, rounds=3, warmup=1, load_before=load_before, load_after=load_after,
                            cores=cores, accelerator=accelerator)


def test_harness_headline_is_cpu_time_when_the_load_exceeds_the_cores():
  loaded = _comparison(0.5, 3.1)
  assert loaded.loaded and loaded.headline == "cpu" and "EXCEEDED" in loaded.note()
  quiet = _comparison(0.5, 1.9)
  assert not quiet.loaded and quiet.headline == "wall"
  assert _comparison(9.0, 9.0, accelerator=True).headline == "wall"
  # Per-round ratios (same round), then min / median / max: wall 1/2, 1/4, 6/3.
  ratio = quiet.ratio("new", "ref")
  np.testing.assert_allclose([ratio.min, ratio.median, ratio.max], [0.25, 0.5, 2.0])
  np.testing.assert_allclose(loaded.ratio("new", "ref").median, 0.6)
  table = loaded.markdown("ref")
  assert "cpu ms (headline)" in table and "0.60 (0.50–0.70)" in table and "EXCEEDED" in table


def test_harness_interleaves_rounds_and_rotates_the_order():
  calls = []
  comparison = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                                    "c": lambda: calls.append("c")}, rounds=3, warmup=1)
  assert calls[:3] == ["a", "b", "c"]  # warm-up
  assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
  assert all(len(s.wall) == 3 and len(s.cpu) == 3 for s in comparison.samples.values())
  assert comparison.cores == len(os.sched_getaffinity(0))
  with pytest.raises(ValueError, match="rounds must be >= 1"):
    harness.interleaved({"a": lambda: None}, rounds=0)


def test_report_check_fails_on_nan_and_on_excess():
  import device_suite

  report = device_suite.Report(meta={"tiny": True})
  report.check("fine", 1e-6, 1e-4)
  assert report.all_passed
  report.check("nan", float("nan"), 1e-4)
  assert not report.all_passed and report.has_nan()
  report = device_suite.Report(meta={"tiny": True})
  report.check("too large", 2e-4, 1e-4)
  assert not report.all_passed


def test_ove_pg_float64_oracle_matches_a_loop():
  """The suite's vectorised float64 OVE-PG formula against a plain loop over samples, rows and classes."""
  import device_suite

  rng = np.random.default_rng(0)
  logits, teacher = rng.normal(size=(2, 3, 4)) * 3
  teacher[0, 1] = teacher[0, 0]  # a zero teacher difference: ω = 1/4
  labels = np.array([0, 3, 1])
  eps = rng.normal(size=(2, 3, 4))
  alpha, weight = 1.5, 0.2
  total = 0.0
  for m in range(2):
    for i in range(3):
      for c in range(4):
        if c == labels[i]:
          continue
        psi = logits[i, labels[i]] - logits[i, c]
        psi0 = abs(teacher[i, labels[i]] - teacher[i, c])
        omega = 0.25 if psi0 == 0 else math.tanh(psi0 / 2) / (2 * psi0)
        sample = (alpha * psi + 0.5) / (omega + alpha) + eps[m, i, c] / math.sqrt(omega + alpha)
        total += math.log1p(math.exp(-sample))
  expected = total / 6 + weight * np.mean((logits - teacher) ** 2)
  got = device_suite.ove_pg_float64(logits, teacher, labels, eps, alpha=alpha, weight=weight)
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_pg_closed_form_moments_match_the_series():
  """PG(1, c) = (1/2π²) Σ_k g_k / ((k − ½)² + c²/4π²): mean and variance of the series, summed directly."""
  import device_suite

  k = np.arange(1, 200_001, dtype=np.float64)
  for c in (0.0, 0.7, 3.0, 20.0):
    d = (k - 0.5) ** 2 + c**2 / (4 * math.pi**2)
    tail = 1 / k[-1]  # Σ_{k>K} 1/(k − ½)² ≈ 1/K: the mean's truncated tail (the variance's is O(1/K³))
    mean, var = (np.sum(1 / d) + tail) / (2 * math.pi**2), np.sum(1 / d**2) / (4 * math.pi**4)
    got_mean, got_var = device_suite.pg_closed_form(c)
    np.testing.assert_allclose([got_mean, got_var], [mean, var], rtol=1e-7)
