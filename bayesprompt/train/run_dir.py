"""A run directory: what was run (resolved flags, git revision, command line) and what it measured.

Layout of `RunDir(path, config)`:
  path/config.json     the resolved flags / config of the run (JSON), its command line and start time
  path/git.json        git revision of the source tree and whether it had uncommitted changes (if in git)
  path/metrics.jsonl   one JSON object per `write_scalars` call: {"step": int, "time": float, name: value, ...}
  path/tensorboard/    the same scalars as TensorBoard event files (written with tensorboardX, which needs no
                       tensorflow; skipped with a log line if tensorboardX is not installed)

Metrics JSONL is append-only: a resumed run keeps appending to the same file, so a step may appear twice
around a resume point (`read_metrics` merges the records of a step, later values winning).

Multi-process runs (`jax.distributed`): only process 0 writes; on the others a RunDir is a no-op writer
(same calls, nothing created), so every process runs the same code.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
GIT_FILE = "git.json"


def git_revision(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """{"revision": sha or None, "dirty": bool or None} of the git tree containing `path` (default: this
  package's source). None values when git or the repository is not available."""
  cwd = pathlib.Path(path) if path is not None else pathlib.Path(__file__).resolve().parent
  def run(*args):
    try:
      return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout
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
      (self.path / CONFIG_FILE).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
      (self.path / GIT_FILE).write_text(json.dumps(git_revision(), indent=1) + "\n")
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

  def write_json(self, name: str, data: Any) -> pathlib.Path:
    """Writes `data` as path/name (e.g. a final results file)."""
    path = self.path / name
    if self.writes:
      path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
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
