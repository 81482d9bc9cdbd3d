"""Training checkpoints: a thin wrapper around orbax's CheckpointManager.

What it adds to orbax:
  * periodic saves (`save_interval_steps`) with a `force` escape for the final step, keep-last-k, atomic
    writes (orbax writes to a temporary directory and renames it when complete, so a killed run never
    leaves a half-written step that `restore_latest` would pick up);
  * restore of the latest step into the structure of a template state (`ocp.args.StandardRestore`);
  * the run's configuration stored beside the steps (`run_config.json`), and a check that a resumed run
    uses the same configuration — resuming with other hyper-parameters silently mixes two runs.

Multi-process runs: every process calls `save` / `restore` (orbax coordinates them and writes each
replicated array once); the stored run config is written by process 0 only and read by every process.

A state is any pytree of arrays (params, optax state, step counters). Typed PRNG keys are not arrays orbax
can store: keep raw uint32 keys (`jax.random.key_data`) or derive randomness from the step.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from bayesprompt.errors import UserError

RUN_CONFIG_FILE = "run_config.json"
_ITEM = "default"  # orbax's folder name of a step's single (unnamed) item


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _canonical(value: Any) -> Any:
  """JSON round trip: tuples become lists, keys strings — the form a stored config is compared in."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any],
                       ignore: Iterable[str] = ()) -> list[str]:
  """Human-readable differences between two flat configs, ignoring the keys in `ignore`."""
  stored, current, ignore = _canonical(stored), _canonical(current), set(ignore)
  diffs = []
  for key in sorted(set(stored) | set(current)):
    if key in ignore:
      continue
    if key not in current:
      diffs.append(f"{key}: stored {stored[key]!r}, now absent")
    elif key not in stored:
      diffs.append(f"{key}: absent from the stored config, now {current[key]!r}")
    elif stored[key] != current[key]:
      diffs.append(f"{key}: stored {stored[key]!r}, now {current[key]!r}")
  return diffs


def check_config_matches(directory: str | os.PathLike, config: Mapping[str, Any],
                         ignore: Iterable[str] = ()) -> None:
  """Raises ValueError if `directory` holds a stored run config that differs from `config`.

  A directory without a stored config passes (nothing to compare with).
  """
  path = pathlib.Path(directory) / RUN_CONFIG_FILE
  if not path.exists():
    return
  stored = json.loads(path.read_text())
  diffs = config_differences(stored, config, ignore)
  if diffs:
    raise UserError(f"cannot resume from {directory}: its stored config differs from this run's "
                    f"({len(diffs)} difference(s): {'; '.join(diffs)}); use the same flags, --overwrite, or a "
                    "fresh directory")


def write_config(directory: str | os.PathLike, config: Mapping[str, Any]) -> None:
  """Writes `config` as the directory's stored run config (atomically: temporary file + rename); a no-op
  on JAX processes other than 0."""
  if jax.process_index() != 0:
    return
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / (RUN_CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(_canonical(config), indent=1, sort_keys=True) + "\n")
  os.replace(tmp, directory / RUN_CONFIG_FILE)


class CheckpointManager:
  """Periodic, atomic, keep-last-k checkpoints of a pytree state, with a stored run config.

  Usage:
    manager = CheckpointManager(workdir / "checkpoints", save_interval_steps=200, max_to_keep=2,
                                config=flags_dict)   # raises if the directory holds another config
    restored = manager.restore_latest(state)          # None on a fresh directory
    if restored is not None:
      step, state = restored
    ...
    manager.save(step, state)                         # saves only every save_interval_steps
    manager.save(final_step, state, force=True)
    manager.close()                                   # waits for pending (async) writes
  """

  def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1,
               max_to_keep: int | None = 3,
               config: Mapping[str, Any] | None = None, ignore_config_keys: Iterable[str] = (),
               async_save: bool = True):
    """Args:
      directory: where steps are written (created if needed); one subdirectory per step.
      save_interval_steps: `save` writes only steps that are multiples of this (unless forced).
      max_to_keep: how many of the latest steps to keep (None keeps all).
      config: the run's configuration (a JSON-able flat mapping). Written on first use; on an existing
        directory it must match the stored one (keys in `ignore_config_keys` excepted, e.g. the number
        of steps to run in this invocation) or ValueError is raised.
      async_save: write in a background thread (orbax's default); `close()`/`wait()` join it.
    """
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    self.directory = pathlib.Path(directory).expanduser().resolve()
    if config is not None:
      check_config_matches(self.directory, config, ignore_config_keys)
      write_config(self.directory, config)
    self._save_interval_steps = save_interval_steps
    # The interval is applied here: orbax's own also saves the first step of a fresh directory.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def save_interval_steps(self) -> int:
    return self._save_interval_steps

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves `state` at `step` if the interval says so (or `force`); returns whether it saved."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if not force and step % self._save_interval_steps:
      return False
    if step in self._manager.all_steps():
      return False  # Already saved (e.g. a forced final step that is also periodic).
    return self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, template: Any) -> Any:
    """The state saved at `step`, with the structure, dtypes and shapes of `template`."""
    if step not in self._manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {self.directory}; steps: {self.all_steps()}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, template: Any) -> tuple[int, Any] | None:
    """(step, state) of the newest intact checkpoint, or None if the directory holds no step.

    A step that fails to restore (a truncated array file, a missing item folder: damage after orbax's
    atomic rename, e.g. a disk filled or a file removed by hand) is logged as a warning naming it and
    deleted, and the next older step is tried, so training continues from the newest intact state and
    re-saves the steps after it. If every step is broken: UserError naming the directory.
    """
    self.wait()
    steps = sorted(self.all_steps(), reverse=True)
    broken = []
    for step in steps:
      try:
        state = self._restore_checked(step, template)
      except Exception as error:  # noqa: BLE001 - orbax raises many types for damaged files; reported below
        reason = _first_line(error)
        broken.append(f"step {step} ({reason})")
        logging.warning("checkpoint step %d in %s is broken (%s): falling back to an older step", step,
                        self.directory, reason)
        continue
      for bad in steps[:steps.index(step)]:
        self._delete_broken(bad)
      return step, state
    if not steps:
      return None
    raise UserError(f"no intact checkpoint in {self.directory}: {'; '.join(broken)}; delete the directory "
                    "(or pass --overwrite) to start again")

  def _restore_checked(self, step: int, template: Any) -> Any:
    """`restore`, after checking that the step's item folder exists (orbax would otherwise ask for
    `Composite` args instead of naming the missing folder)."""
    step_dir = self.directory / str(step)
    if not (step_dir / _ITEM).is_dir():
      raise UserError(f"missing item folder {step_dir / _ITEM}")
    return self.restore(step, template)

  def _delete_broken(self, step: int) -> None:
    """Removes a broken step so that the resumed run can write that step again (process 0 removes)."""
    logging.warning("removing the broken checkpoint step %d in %s", step, self.directory)
    if jax.process_index() == 0:
      shutil.rmtree(self.directory / str(step), ignore_errors=True)
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
