"""Kill and resume (issue 16): a 3-seed prompt-learning run SIGKILLed at 10 random points, resumed with
--resume after each kill, ends with results bit-identical to an uninterrupted run.

Each attempt is a real `python -m experiments.prompt_learning` subprocess. Kill points are spread over the
run by its progress on disk (completed orbax steps and finished seeds) plus a random delay, so they land
in start-up, training, checkpoint writes, evaluation and between seeds. Cheap: a 1-shot, 2-epoch CoOp with
2 context tokens, 32 evaluation images, no TensorBoard; the uninterrupted runs use the suite's persistent
compilation cache, and the killed attempts a private snapshot of it (`_snapshot_for_kills`).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bayesprompt.train import run_dir as run_dir_lib
from tests.conftest import JAX_CACHE_DIR, REPO_ROOT

SEEDS = (1, 2, 3)
EPOCHS = 2
KILLS = 10
TINY = ["--method=coop", "--protocol=base2new", "--dataset=sandbox_shapes", "--checkpoint=sandbox",
        "--num_shots=1", f"--seeds={','.join(map(str, SEEDS))}", f"--epochs={EPOCHS}", "--warmup_epochs=0",
        "--batch_size=8", "--eval_batch_size=64", "--max_eval_examples=32", "--hparams=n_ctx=2", "--noprogress",
        "--notensorboard"]
# Completed checkpoint steps and finished seeds: EPOCHS + 1 events per seed.
NUM_EVENTS = len(SEEDS) * (EPOCHS + 1)


def _env(cache_dir: pathlib.Path | str) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=str(REPO_ROOT))
  return env


def _cache_for_runs(tmp_path: pathlib.Path) -> pathlib.Path | str:
  """The suite's persistent compilation cache (conftest.JAX_CACHE_DIR) for runs that are never killed: they
  finish every write, so their executables can be kept between sessions. A private directory when the suite
  runs without the cache."""
  return JAX_CACHE_DIR or tmp_path / "jax_cache"


def _snapshot_for_kills(cache: pathlib.Path | str, tmp_path: pathlib.Path) -> pathlib.Path:
  """A private copy (hard links) of the cache for the attempts that get SIGKILLed: JAX writes a cache entry in
  place (not through a rename), so a kill mid-write leaves a truncated file, which must never reach the
  shared cache. Entries are never rewritten (JAX skips existing keys), so links cannot change the originals;
  after the uninterrupted reference run every program of the attempts is already in it."""
  snapshot = tmp_path / "jax_cache_for_kills"
  snapshot.mkdir()
  cache = pathlib.Path(cache)
  if cache.is_dir():
    for entry in cache.iterdir():
      if entry.is_file():
        try:
          os.link(entry, snapshot / entry.name)
        except OSError:  # another file system: copy
          snapshot.joinpath(entry.name).write_bytes(entry.read_bytes())
  return snapshot


def _start(run_dir: pathlib.Path, log: pathlib.Path, env: dict, resume: bool) -> subprocess.Popen:
  command = [sys.executable, "-m", "experiments.prompt_learning", *TINY, f"--run_dir={run_dir}"]
  if resume:
    command.append("--resume")
  with open(log, "w") as out:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _seed_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  return [root / "coop_ce" / f"seed{seed}" for seed in SEEDS]


def _progress(root: pathlib.Path) -> int:
  """Events reached on disk: complete orbax steps (integer-named folders; orbax writes a step into a
  temporary folder and renames it) and finished seeds (results.json)."""
  events = 0
  for seed_dir in _seed_dirs(root):
    checkpoints = seed_dir / "checkpoints"
    if checkpoints.is_dir():
      events += sum(1 for p in checkpoints.iterdir() if p.name.isdigit())
    events += (seed_dir / "results.json").exists()
  return events


def _seed_results(root: pathlib.Path) -> dict:
  return {seed_dir.name: json.loads((seed_dir / "results.json").read_text())["results"]
          for seed_dir in _seed_dirs(root)}


def _train_curves(root: pathlib.Path) -> dict:
  """Per seed: every metrics.jsonl record without its wall-clock time (records of a step merged)."""
  return {seed_dir.name: [{k: v for k, v in record.items() if k != "time"}
                          for record in run_dir_lib.read_metrics(seed_dir)]
          for seed_dir in _seed_dirs(root)}


def _check_finished(process: subprocess.Popen, log: pathlib.Path, timeout: float) -> None:
  assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def test_kill_and_resume_ten_times_is_bit_identical(tmp_path):
  cache = _cache_for_runs(tmp_path)
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  _check_finished(_start(reference, tmp_path / "reference.log", _env(cache), resume=False),
                  tmp_path / "reference.log", timeout=1200)
  env = _env(_snapshot_for_kills(cache, tmp_path))
  expected = json.loads((reference / "results.json").read_text())

  rng = np.random.default_rng(16)
  # Kill targets spread over the run: after event k (0 = right after start-up begins), plus a random delay
  # of up to 1.5 s, so kills also land mid-write. The last event is kept out of reach so that every
  # attempt is killed before it finishes.
  targets = np.sort(rng.integers(0, NUM_EVENTS - 1, KILLS))
  delays = rng.uniform(0.0, 1.5, KILLS)
  kills = []
  for attempt, (target, delay) in enumerate(zip(targets, delays, strict=True)):
    log = tmp_path / f"attempt{attempt}.log"
    process = _start(killed, log, env, resume=attempt > 0)
    deadline = time.monotonic() + 600
    while _progress(killed) < target and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    time.sleep(delay)
    assert process.poll() is None, f"attempt {attempt} ended before its kill:\n{log.read_text()[-3000:]}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kills.append((int(target), _progress(killed)))

  finished_before = [d.name for d in _seed_dirs(killed) if (d / "results.json").exists()]
  mtimes = {name: (killed / "coop_ce" / name / "results.json").stat().st_mtime_ns for name in finished_before}
  log = tmp_path / "final.log"
  _check_finished(_start(killed, log, env, resume=True), log, timeout=1200)
  output = log.read_text()

  assert len(kills) == KILLS
  assert kills[-1][1] >= NUM_EVENTS // 2, f"kills not spread over the run: {kills}"
  # Finished seeds are read back, not retrained.
  for name in finished_before:
    assert f"seed {name[4:]}: finished earlier: results read back" in output, output
    assert (killed / "coop_ce" / name / "results.json").stat().st_mtime_ns == mtimes[name]
  # Bit-identical: per-seed results, the final table's runs, and the training curves.
  assert _seed_results(killed) == _seed_results(reference)
  got = json.loads((killed / "results.json").read_text())
  assert got["runs"] == expected["runs"] and got["summary"] == expected["summary"]
  assert _train_curves(killed) == _train_curves(reference)
  for row in got["runs"]:
    assert all(np.isfinite(v) for v in row["metrics"].values()), row


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 1-seed run, made once for both rerun tests (with the JAX cache they share): (command, env,
  run root, its metrics.jsonl). Neither rerun may change the run; each test checks that."""
  tmp_path = tmp_path_factory.mktemp("finished")
  env = _env(_cache_for_runs(tmp_path))  # never killed
  root = tmp_path / "run"
  args = [f for f in TINY if not f.startswith("--seeds")] + ["--seeds=1", "--epochs=1"]
  command = [sys.executable, "-m", "experiments.prompt_learning", *args, f"--run_dir={root}"]
  first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
  return command, env, root, (root / "coop_ce" / "seed1" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("flag", ["", "--resume"])
def test_rerun_refuses_or_resumes(finished_run, flag):
  """A finished run: rerunning without --resume is refused (one line naming --resume and --overwrite, exit
  2, metrics.jsonl untouched); with --resume every seed is read back."""
  command, env, root, metrics_before = finished_run
  assert (root / "coop_ce" / "seed1" / "metrics.jsonl").read_text() == metrics_before  # as it finished
  again = subprocess.run(command + ([flag] if flag else []), cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
  if flag:
    assert again.returncode == 0, again.stderr[-2000:]
    assert "seed 1: finished earlier: results read back" in again.stdout
  else:
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--resume" in errors[0] and "--overwrite" in errors[0], again.stderr
    assert "Traceback" not in again.stderr
  assert (root / "coop_ce" / "seed1" / "metrics.jsonl").read_text() == metrics_before
