"""The BayesVLM binaries data-parallel: estimate_hessian and active_learning (EPIG) on simulated devices equal
one device, and only process 0 writes.

As in tests/test_distributed.py, multi-device runs happen in subprocesses started with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the pytest process has one CPU device): the
estimate_hessian binary itself (`python -m experiments.estimate_hessian`, no mesh flag: 4 devices are used
because they are there; `--mesh_data=1` for the one-device run in the same environment; two processes on
loopback with --coordinator_address), and an EPIG scenario (`python -m tests.test_distributed_binaries epig`)
that writes what it measured to a JSON file.

Model: a tiny random CLIP with the sandbox tokenizer; pairs: the sandbox's generated 190 of 192 smoke pairs in
class batches of 64 and forward batches of 24, so padded forward batches and class batches that are not a
multiple of the device count both occur. Oracles: the one-device run of the same binary (factors: relative
max error < 1e-5 in float32; the sharded run only sums in another order), EPIG scores of the one-device
`active.acquisition_scores` (atol 1e-5), and the one-device active-learning run (same selections).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import xla_flags
from tests.test_distributed import REPO_ROOT, wait

# Tiny towers, in process as in the subprocesses (`environment`): tests/conftest.py::fast_compiles.
pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_PAIRS, CLASS_BATCH, FORWARD_BATCH = 190, 64, 24
RELATIVE_TOLERANCE = 1e-5


def save_tiny_clip(root: pathlib.Path) -> str:
  """A tiny random CLIP (sandbox tokenizer, vision width 32, text width 24, embed 16) in open_clip layout."""
  from bayesprompt import clip
  from bayesprompt.data.sandbox import model as sandbox_model

  root.mkdir(parents=True, exist_ok=True)
  sandbox_model.tokenizer().to_json(root / "tok.json")
  cfg = sandbox_model.config(str(root / "tok.json"), width=32, layers=1, heads=1, mlp_dim=64)
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, width=24, layers=1, heads=1, mlp_dim=48), embed_dim=16)
  clip.save_checkpoint(root / "ckpt", cfg, clip.init_params(cfg, jax.random.key(0)))
  return str(root / "ckpt")


def environment(devices: int, data_dir: str) -> dict:
  # A tiny CLIP: XLA's optimisation passes cost more compile time than they save (tests/conftest.py::
  # fast_compiles), in every binary and scenario subprocess.
  return dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"), JAX_PLATFORMS="cpu",
              BAYESPROMPT_DATA_DIR=data_dir, PYTHONPATH=str(REPO_ROOT), JAX_DISABLE_MOST_OPTIMIZATIONS="true")


def start(args: list[str], devices: int, data_dir: str, cwd: pathlib.Path = REPO_ROOT) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=environment(devices, data_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def hessian_args(checkpoint: str, *extra: str) -> list[str]:
  """estimate_hessian --runlocal (the generated 192-pair corpus); it writes a fresh smoke directory under its
  working directory's runs/runlocal/estimate_hessian (see `smoke_run`)."""
  return ["experiments.estimate_hessian", f"--checkpoint={checkpoint}", "--runlocal", "--noprogress",
          "--num_threads=2", f"--num_pairs={NUM_PAIRS}", f"--class_batch_size={CLASS_BATCH}",
          f"--hessian_batch_size={FORWARD_BATCH}", *extra]


def smoke_run(cwd: pathlib.Path) -> pathlib.Path:
  """The one --runlocal directory estimate_hessian wrote when run in `cwd`."""
  (run_dir,) = (cwd / "runs" / "runlocal" / "estimate_hessian").iterdir()
  return run_dir


def assert_factors_equal(expected_dir: pathlib.Path, got_dir: pathlib.Path) -> None:
  from bayesprompt.bayes import laplace

  expected, expected_info = laplace.load_factors(expected_dir / "factors")
  got, got_info = laplace.load_factors(got_dir / "factors")
  for tower in ("img", "txt"):
    assert float(got[tower].num_data) == float(expected[tower].num_data) == NUM_PAIRS
    for name in ("a", "b"):
      want, have = np.asarray(getattr(expected[tower], name)), np.asarray(getattr(got[tower], name))
      assert np.max(np.abs(want)) > 1e-2, (tower, name)  # a non-trivial factor
      error = np.max(np.abs(have - want)) / np.max(np.abs(want))
      assert error < RELATIVE_TOLERANCE, (tower, name, error)
    np.testing.assert_allclose(got_info[f"lambda_{tower}"], expected_info[f"lambda_{tower}"], rtol=1e-4)


def devices_used(run_dir: pathlib.Path) -> int:
  from bayesprompt.train.run_dir import read_metrics

  return int(read_metrics(run_dir)[-1]["devices"])


@pytest.fixture(scope="module")
def hessian_runs(tmp_path_factory):
  """The estimate_hessian binary on 4 simulated devices (no flag) and on one (--mesh_data=1), concurrently."""
  root = tmp_path_factory.mktemp("hessian")
  data_dir = str(root / "data")
  checkpoint = save_tiny_clip(root / "tiny")
  # Both generate the smoke corpus into one data dir: sandbox prepare() locks it, so one writes, the other waits.
  for name in ("one", "four"):
    (root / name).mkdir()
  one = start(hessian_args(checkpoint, "--mesh_data=1"), 4, data_dir, cwd=root / "one")
  four = start(hessian_args(checkpoint), 4, data_dir, cwd=root / "four")
  wait(one)
  wait(four)
  return {"root": root, "checkpoint": checkpoint, "data_dir": data_dir, "one": smoke_run(root / "one"),
          "four": smoke_run(root / "four")}


def test_estimate_hessian_on_four_devices_equals_one_device(hessian_runs):
  assert devices_used(hessian_runs["one"]) == 1 and devices_used(hessian_runs["four"]) == 4
  assert_factors_equal(hessian_runs["one"], hessian_runs["four"])


def test_partial_sums_written_on_four_devices_resume_on_one(hessian_runs, tmp_path, monkeypatch):
  """The 4-device run's last partial checkpoint, resumed by a 1-device estimate: nothing left to read, the
  factors are the 4-device ones (host arrays restore on any device count)."""
  from bayesprompt import clip
  from bayesprompt.bayes import laplace
  from bayesprompt.bayesvlm import hessian

  monkeypatch.setenv("BAYESPROMPT_DATA_DIR", hessian_runs["data_dir"])
  shutil.copytree(hessian_runs["four"] / "partial", tmp_path / "partial")
  config, params = clip.load_checkpoint(hessian_runs["checkpoint"])
  pairs = hessian.open_caption_pairs("sandbox_world/captions", "train", sandbox_count=192)
  monkeypatch.setattr(pairs, "read", lambda *_: pytest.fail("a resumed, finished estimate read pairs"))
  factors, _ = hessian.estimate_pair_factors(params, config, pairs, tokenizer=clip.get_tokenizer(config),
                                             num_pairs=NUM_PAIRS, class_batch_size=CLASS_BATCH,
                                             batch_size=FORWARD_BATCH, checkpoint_dir=tmp_path / "partial",
                                             progress=False)
  four, _ = laplace.load_factors(hessian_runs["four"] / "factors")
  for tower in ("img", "txt"):
    np.testing.assert_allclose(factors[tower].a, four[tower].a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(factors[tower].b, four[tower].b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_estimate_hessian_two_processes_on_loopback_equals_one_device(hessian_runs):
  """2 processes x 2 devices, each reading only its own block of every forward batch."""
  import portpicker

  port = portpicker.pick_unused_port()
  cwd = hessian_runs["root"] / "two_processes"
  cwd.mkdir()
  processes = [start(hessian_args(hessian_runs["checkpoint"], f"--coordinator_address=127.0.0.1:{port}",
                                  "--num_processes=2", f"--process_id={i}"), 2, hessian_runs["data_dir"], cwd=cwd)
               for i in range(2)]
  outputs = [wait(p) for p in processes]
  out = smoke_run(cwd)
  assert all("4 devices, 2 process(es)" in o for o in outputs), outputs[0][-2000:]
  assert devices_used(out) == 4
  assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # process 0 alone wrote its record
  assert_factors_equal(hessian_runs["one"], out)


# ------------------------------------------------------------------------------------------ EPIG


def scenario_epig(out_dir: pathlib.Path, checkpoint: str, factors_dir: str) -> None:
  """In a 4-device process: EPIG scores with and without a mesh, and the active_learning binary (EPIG,
  --runlocal, the mesh its flags give: all 4 devices) against its one-device run; into results.json."""
  import tensorflow_datasets as tfds
  from absl import flags

  from bayesprompt import clip
  from bayesprompt.bayes import distributed as bayes_distributed
  from bayesprompt.bayes import laplace
  from bayesprompt.bayesvlm import active, vlm
  from bayesprompt.bayesvlm import active_learning as bv_active_learning
  from bayesprompt.train import distributed
  from experiments import active_learning, bayesvlm_flags, common  # noqa: F401  (the binary defines its flags)

  assert jax.device_count() == 4, jax.devices()
  results: dict = {}
  # Library: 13 candidates (padded to 16 over 4 devices) against 7 targets, K = 6 joint draws.
  config, params = clip.load_checkpoint(checkpoint)
  factors, _ = laplace.load_factors(pathlib.Path(factors_dir) / "factors")
  head = active.head_from_params(params, config)
  post = active.head_posterior(factors["img"], head, pseudo_data_count=10.0, prior_precision=1.0)
  text_post = vlm.tower_posterior(factors["txt"], params, config, "txt", pseudo_data_count=10.0,
                                  prior_precision=1.0)[0]
  rng = np.random.default_rng(0)
  text_phi = rng.normal(size=(5, 24)).astype(np.float32)
  text = {"pre_projection": text_phi, "embeddings": np.asarray(clip.project_text(params, text_phi, config=config))}
  problem = active.Problem(text, text_post, float(params["logit_scale"]), None)

  def inputs(num):
    phi = rng.normal(size=(num, 32)).astype(np.float32)
    return {"pre_projection": phi, "embeddings": np.asarray(active.head_embeddings(head, phi, 0.0))}

  candidates, targets = inputs(13), inputs(7)
  key = jax.random.key(4)
  one = active.acquisition_scores("epig", key, post, problem, candidates, targets, num_samples=6)
  many = active.acquisition_scores("epig", key, post, problem, candidates, targets, num_samples=6,
                                   mesh=distributed.make_mesh())
  results["scores"] = {"one": np.asarray(one).tolist(), "many": np.asarray(many).tolist(),
                       "replicated": bool(many.sharding.is_fully_replicated)}

  # The binary: flags as a user passes them (no mesh flag), mesh from common.mesh_from_flags.
  calls = []
  real = bayes_distributed.epig_sharded
  active.bayes_distributed.epig_sharded = lambda *a, **k: calls.append(1) or real(*a, **k)
  flags.FLAGS(["active_learning", f"--checkpoint={checkpoint}", "--runlocal", f"--factors_dir={factors_dir}",
               "--acquisitions=epig", "--rounds=2", "--noprogress", "--num_threads=2",
               f"--feature_cache_dir={out_dir / 'features'}"])  # the second run reads the first one's features
  flag_mesh = common.mesh_from_flags()
  results["flag_mesh"] = None if flag_mesh is None else dict(flag_mesh.shape)
  cfg = bayesvlm_flags.active_config()
  with tfds.testing.mock_data(num_examples=48):
    many = bv_active_learning.run_active_learning(cfg, out_dir / "al_four", mesh=flag_mesh)
    results["sharded_calls"] = len(calls)
    one = bv_active_learning.run_active_learning(cfg, out_dir / "al_one", mesh=None)
  results["calls_after_one_device_run"] = len(calls)
  results["selections"] = {"one": one["selections"], "many": many["selections"]}
  results["accuracy"] = {name: [r["accuracy"] for per in run["curves"].values() for rows in per.values()
                                for r in rows] for name, run in (("one", one), ("many", many))}
  (out_dir / "results.json").write_text(json.dumps(results, indent=1))


def test_active_learning_epig_on_four_devices_equals_one_device(hessian_runs, tmp_path):
  wait(start(["tests.test_distributed_binaries", "epig", str(tmp_path), hessian_runs["checkpoint"],
              str(hessian_runs["four"])], 4, hessian_runs["data_dir"]))
  results = json.loads((tmp_path / "results.json").read_text())
  scores = results["scores"]
  assert len(scores["many"]) == 13 and scores["replicated"] and np.max(scores["one"]) > 1e-4
  assert np.all(np.isfinite(scores["one"])) and np.all(np.isfinite(scores["many"]))
  np.testing.assert_allclose(scores["many"], scores["one"], atol=1e-5)
  assert results["flag_mesh"] == {"data": 4, "model": 1}
  # The sharded run scored EPIG sharded (once per round), the one-device run never did.
  assert results["sharded_calls"] == 2 and results["calls_after_one_device_run"] == 2
  assert results["selections"]["many"] == results["selections"]["one"]
  np.testing.assert_allclose(results["accuracy"]["many"], results["accuracy"]["one"], atol=1e-6)


def test_kfac_update_sharded_drops_padding_rows_and_checks_counts():
  """num_valid / num_targets (padding of sharded batches): equal to kfac_update on the valid rows only."""
  from bayesprompt.bayes import distributed as bayes_distributed
  from bayesprompt.bayes import laplace
  from bayesprompt.train import distributed

  rng = np.random.default_rng(2)
  features, embeddings, targets = (rng.normal(size=shape).astype(np.float32) for shape in
                                   ((10, 6), (10, 4), (8, 4)))
  start = laplace.kfac_init(6, 4, add_bias=True)
  kwargs = dict(likelihood="siglip", logit_bias=-1.0, add_bias=True, chunk_size=3)
  mesh = distributed.make_mesh()
  got = bayes_distributed.kfac_update_sharded(start, features, embeddings, targets, 1.7, mesh, num_valid=7,
                                              num_targets=5, **kwargs)
  want = laplace.kfac_update(start, features[:7], embeddings[:7], targets[:5], 1.7, **kwargs)
  assert int(got.num_data) == 7
  for name in ("a_sum", "b_sum"):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_valid=11"):
    bayes_distributed.kfac_update_sharded(start, features, embeddings, targets, 1.7, mesh, num_valid=11)
  with pytest.raises(ValueError, match="num_targets=0"):
    bayes_distributed.kfac_update_sharded(start, features, embeddings, targets, 1.7, mesh, num_targets=0)
  with pytest.raises(ValueError, match="likelihood"):
    bayes_distributed.kfac_update_sharded(start, features, embeddings, targets, 1.7, mesh, likelihood="probit")


# ------------------------------------------------------------------------------------------ process 0 writes


@pytest.mark.parametrize("process_index", [0, 1])
def test_only_process_zero_writes(process_index, tmp_path, monkeypatch):
  """Files appear on process 0 (the control) and nowhere on process 1, whose writers are silent no-ops."""
  from bayesprompt.eval.results import ResultsWriter
  from bayesprompt.train import checkpoint, run_dir

  monkeypatch.setattr(jax, "process_index", lambda *a: process_index)
  primary = process_index == 0
  assert run_dir.is_primary_process() is primary
  with run_dir.RunDir(tmp_path / "run", {"lr": 0.1}, tensorboard=True) as rd:
    assert rd.writes is primary
    rd.write_scalars(0, {"loss": 1.5})
    path = rd.write_json("selections.json", {"a": [1, 2]})
    with pytest.raises(ValueError, match="reserved"):
      rd.write_scalars(1, {"step": 3})  # bad input is still rejected everywhere
  assert path == tmp_path / "run" / "selections.json"
  writer = ResultsWriter(tmp_path / "results", title="t")
  writer.add("toy", 1, {"accuracy": 0.5})
  paths = writer.write()
  checkpoint.write_config(tmp_path / "ckpt", {"lr": 0.1})
  checkpoint.check_config_matches(tmp_path / "ckpt", {"lr": 0.1})
  written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
  if primary:
    assert {"run/config.json", "run/git.json", "run/metrics.jsonl", "run/selections.json", "results/results.md",
            "results/results.csv", "results/results.json", "ckpt/run_config.json"} <= set(written)
    assert any(p.startswith("run/tensorboard/") for p in written) or not _has_tensorboardx()
    assert json.loads(pathlib.Path(paths["json"]).read_text())["runs"][0]["metrics"] == {"accuracy": 0.5}
  else:
    assert written == [] and not (tmp_path / "run").exists()
    assert paths["md"] == str(tmp_path / "results" / "results.md")
  assert run_dir.timestamp("%Y") == __import__("time").strftime("%Y")


def _has_tensorboardx() -> bool:
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    return False
  return True


if __name__ == "__main__":
  scenario, *argv = sys.argv[1:]
  if scenario == "epig":
    scenario_epig(pathlib.Path(argv[0]), argv[1], argv[2])
  else:
    raise SystemExit(f"unknown scenario {scenario!r}")
