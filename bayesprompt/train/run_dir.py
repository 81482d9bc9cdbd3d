"""A run directory: what was run (resolved flags, git revision, command line) and what it measured.

Layout of `RunDir(path, config)`:
  path/config.json     the resolved flags / config of the run (JSON), its command line and start time
  path/git.json        git revision of the source tree and whether it had uncommitted changes (if in git)
  path/metrics.jsonl   one JSON object per `write_scalars` call:
                       {"step": int, "time": float, name: value, ...}
  path/tensorboard/    the same scalars as TensorBoard event files (written with tensorboardX, which needs no
                       tensorflow; skipped with a log line if tensorboardX is not installed)

Metrics JSONL is append-only: a resumed run keeps appending to the same file, so a step may appear twice
around a resume point (`read_metrics` merges the records of a step, later values winning).

Multi-process runs (`jax.distributed`): only process 0 writes; on the others a RunDir is a no-op writer
(same calls, nothing created), so every process runs the same code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from bayesprompt.errors import UserError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
GIT_FILE = "git.json"
# What a run writes into its directory: `--overwrite` removes these entries and nothing else (a run
# directory named by hand may hold the user's own files).
RUN_ENTRIES = (METRICS_FILE, CONFIG_FILE, GIT_FILE, "tensorboard", "checkpoints", "results.json",
               "results.md", "results.csv", "train_classes.json")
SMOKE_ROOT = "runs/runlocal"


def git_revision(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """{"revision": sha or None, "dirty": bool or None} of the git tree containing `path` (default: this
  package's source). None values when git or the repository is not available."""
  cwd = pathlib.Path(path) if path is not None else pathlib.Path(__file__).resolve().parent
  def run(*args):
    try:
      done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
      return done.stdout
    except (OSError, subprocess.SubprocessError):
      return None
  revision = run("rev-parse", "HEAD")
  status = run("status", "--porcelain", "--untracked-files=no")
  return {"revision": revision.strip() if revision else None,
          "dirty": bool(status.strip()) if status is not None else None}


def is_primary_process() -> bool:
  """True on the process that writes files: process 0 of a multi-process JAX run, or the only process."""
  import jax

  return jax.process_index() == 0


def timestamp(fmt: str = "%Y%m%d-%H%M%S") -> str:
  """`time.strftime(fmt)` of process 0 on every process (default run directory names must agree across
  hosts: their clocks may tick over between processes)."""
  import jax

  stamp = time.strftime(fmt)
  if jax.process_count() == 1:
    return stamp
  import numpy as np
  from jax.experimental import multihost_utils

  raw = np.frombuffer(stamp.encode().ljust(64), np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).decode().strip()


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes `text` to `path` through a temporary file and a rename: a run killed mid-write leaves the old
  file or the new one, never a truncated one (a resumed run reads results.json back)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)
  return path


def config_digest(config: Any, length: int = 10) -> str:
  """A short hex digest of a JSON-able configuration (keys sorted): equal configurations, equal digests."""
  text = json.dumps(config, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:length]


def default_run_dir(prefix: str, config: Any) -> pathlib.Path:
  """runs/<prefix>_<digest of config>: the default run directory, the same for the same configuration,
  so `--resume` without `--run_dir` finds an interrupted run (and a rerun without it is refused)."""
  return pathlib.Path("runs") / f"{prefix}_{config_digest(config)}"


def smoke_run_dir(name: str) -> pathlib.Path:
  """A fresh directory for a `--runlocal` smoke run: runs/runlocal/<name>/<time>-<unique>. Never a real
  run's directory (a smoke run in the flagfile's --run_dir would block the real run that follows), never
  another smoke run's (the suffix is unique, created here). Multi-process runs share process 0's name."""
  import jax

  parent = pathlib.Path(SMOKE_ROOT) / name
  stamp = timestamp()
  if jax.process_count() > 1:
    return parent / stamp
  parent.mkdir(parents=True, exist_ok=True)
  return pathlib.Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=parent))


def resolve_run_dir(run_dir: str | os.PathLike | None, *, runlocal: bool, name: str,
                    default: str | os.PathLike) -> pathlib.Path:
  """The directory a binary writes to: a fresh smoke directory for --runlocal (whatever --run_dir says),
  else --run_dir, else `default`."""
  if runlocal:
    return smoke_run_dir(name)
  return pathlib.Path(run_dir) if run_dir else pathlib.Path(default)


def existing_run_entries(path: str | os.PathLike) -> list[str]:
  """Which of a run's files (`RUN_ENTRIES`) `path` already holds, sorted; [] for a fresh directory."""
  path = pathlib.Path(path)
  return sorted(name for name in RUN_ENTRIES if (path / name).exists())


def check_fresh(paths: str | os.PathLike | Sequence[str | os.PathLike], *, resume: bool,
                overwrite: bool) -> None:
  """Guards the directories a run is about to write (one, or a root and its per-seed directories).

  resume: continue whatever is there (nothing to check). overwrite: remove the previous run's entries.
  Neither: a directory that already holds a run (finished or partial) raises UserError naming --resume and
  --overwrite (a second run appended to it would mix two runs' metrics.jsonl).
  """
  if resume and overwrite:
    raise UserError("--resume and --overwrite contradict each other: pass one of them")
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  used = [(path, found) for path in paths if (found := existing_run_entries(path))]
  if not used or resume:
    return
  if overwrite:
    for path, _ in used:
      remove_run(path)
    return
  path, found = used[0]
  more = f" (and {len(used) - 1} more run directories)" if len(used) > 1 else ""
  raise UserError(f"{path} already holds a run ({', '.join(found)}){more}: pass --resume to continue it, or "
                  "--overwrite to delete it and start again")


def remove_run(path: str | os.PathLike) -> None:
  """Deletes a run's entries (`RUN_ENTRIES`) from `path` (process 0), leaving any other file alone."""
  if not is_primary_process():
    return
  path = pathlib.Path(path)
  for name in existing_run_entries(path):
    target = path / name
    if target.is_dir():
      shutil.rmtree(target)
    else:
      target.unlink()


def _jsonable(value: Any) -> Any:
  """Scalars from numpy/jax arrays become Python numbers; non-finite floats stay as floats (JSON NaN)."""
  if hasattr(value, "item") and getattr(value, "size", 1) == 1:
    return value.item()
  if isinstance(value, (int, float, str, bool)) or value is None:
    return value
  raise TypeError(f"metric values must be scalars, got {type(value).__name__}: {value!r}")


class RunDir:
  """Writes a run's config, git revision and metrics (see the module docstring)."""

  def __init__(self, path: str | os.PathLike, config: Mapping[str, Any] | None = None, *,
               tensorboard: bool = True, write: bool | None = None):
    """Args:
      path: the run directory (created if needed; an existing one is appended to, for resumed runs).
      config: resolved flags / config to record (JSON-able values; others are written with str()).
      tensorboard: also write TensorBoard event files (if tensorboardX is installed).
      write: whether this process writes (default: `is_primary_process()`); False makes every method a
        no-op (`write_json` still returns the path).
    """
    self.path = pathlib.Path(path).expanduser()
    self.writes = is_primary_process() if write is None else bool(write)
    self._metrics = None
    self._tb = None
    if not self.writes:
      return
    self.path.mkdir(parents=True, exist_ok=True)
    if config is not None:
      record = {"config": dict(config), "argv": list(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
      atomic_write_text(self.path / CONFIG_FILE, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
      atomic_write_text(self.path / GIT_FILE, json.dumps(git_revision(), indent=1) + "\n")
    self._metrics = open(self.path / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        logging.info("tensorboardX is not installed: metrics go to %s only", METRICS_FILE)
      else:
        self._tb = SummaryWriter(str(self.path / "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one record {"step", "time", **scalars} to metrics.jsonl (flushed) and to TensorBoard."""
    values = {name: _jsonable(v) for name, v in scalars.items()}
    for reserved in ("step", "time"):
      if reserved in values:
        raise ValueError(f"{reserved!r} is a reserved metrics key")
    if not self.writes:
      return
    record = {"step": int(step), "time": time.time(), **values}
    self._metrics.write(json.dumps(record) + "\n")
    self._metrics.flush()
    if self._tb is not None:
      for name, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.add_scalar(name, v, int(step))
      self._tb.flush()

  def write_json(self, name: str, data: Any, *, sort_keys: bool = True) -> pathlib.Path:
    """Writes `data` as path/name (e.g. a final results file), atomically (`atomic_write_text`).
    `sort_keys=False` keeps the mappings' order (a file read back in place of a result must equal it)."""
    path = self.path / name
    if self.writes:
      atomic_write_text(path, json.dumps(data, indent=1, sort_keys=sort_keys, default=str) + "\n")
    return path

  def close(self) -> None:
    if self._metrics is not None:
      self._metrics.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> RunDir:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl (a file or a run directory), one per step in step order: the records of a
  step are merged, later values winning."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  by_step: dict[int, dict[str, Any]] = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.strip():
      record = json.loads(line)
      by_step[record["step"]] = {**by_step.get(record["step"], {}), **record}
  return [by_step[s] for s in sorted(by_step)]
