"""Training checkpoints (orbax wrapper) and the run directory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bayesprompt.train import checkpoint as checkpoint_lib
from bayesprompt.train import run_dir as run_dir_lib


def _state(seed: int = 0):
  params = {"w": jax.random.normal(jax.random.key(seed), (3, 4)), "b": jnp.arange(4.0) + seed}
  optimizer = optax.adamw(1e-2)
  opt_state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = optimizer.update(grads, opt_state, params)  # non-trivial moments
  return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
          "step": jnp.asarray(seed, jnp.int32)}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_roundtrip_is_exact(tmp_path):
  state = _state(1)
  with checkpoint_lib.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.save(5, state)
    manager.wait()
    step, restored = manager.restore_latest(_state(0))
  assert step == 5
  _assert_trees_equal(restored, state)


def test_fresh_directory_restores_nothing(tmp_path):
  with checkpoint_lib.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() is None
    assert manager.restore_latest(_state()) is None


def test_periodic_saves_keep_last_k_and_force(tmp_path):
  with checkpoint_lib.CheckpointManager(tmp_path / "ckpt", save_interval_steps=3, max_to_keep=2) as manager:
    saved = [step for step in range(1, 11) if manager.save(step, _state(step))]
    assert saved == [3, 6, 9]
    assert manager.save(10, _state(10), force=True)
    assert not manager.save(10, _state(10), force=True)  # already there
    manager.wait()
    assert manager.all_steps() == [9, 10]
    _assert_trees_equal(manager.restore(9, _state()), _state(9))
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
      manager.restore(3, _state())


def test_incomplete_write_is_not_restored(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpoint_lib.CheckpointManager(directory) as manager:
    manager.save(2, _state(2))
  # A run killed mid-write leaves orbax's temporary directory behind; it must not count as a step.
  (directory / "7.orbax-checkpoint-tmp-123").mkdir()
  with checkpoint_lib.CheckpointManager(directory) as manager:
    step, restored = manager.restore_latest(_state())
  assert step == 2
  _assert_trees_equal(restored, _state(2))


def test_resume_config_must_match(tmp_path):
  directory = tmp_path / "ckpt"
  config = {"learning_rate": 1e-3, "batch_size": 8, "layers": (2, 3), "resume": False}
  checkpoint_lib.CheckpointManager(directory, config=config).close()
  stored = json.loads((directory / checkpoint_lib.RUN_CONFIG_FILE).read_text())
  assert stored["layers"] == [2, 3]
  # Same config (a tuple and its JSON list compare equal), and keys that are allowed to differ.
  checkpoint_lib.CheckpointManager(directory, config={**config, "resume": True}, ignore_config_keys=("resume",)).close()
  with pytest.raises(ValueError, match=r"learning_rate: stored 0.001, now 0.01"):
    checkpoint_lib.CheckpointManager(directory, config={**config, "learning_rate": 1e-2})
  with pytest.raises(ValueError, match="seed: absent from the stored config"):
    checkpoint_lib.check_config_matches(directory, {**config, "seed": 0})


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="save_interval_steps"):
    checkpoint_lib.CheckpointManager(tmp_path, save_interval_steps=0)
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint_lib.CheckpointManager(tmp_path, max_to_keep=0)


# ------------------------------------------------------------------------------------------ run directory


def test_run_dir_records_config_metrics_and_tensorboard(tmp_path):
  with run_dir_lib.RunDir(tmp_path / "run", {"lr": 0.1, "name": "x"}) as run:
    run.write_scalars(1, {"loss": jnp.asarray(2.5), "acc": np.float32(0.25)})
    run.write_scalars(2, {"loss": 1.5})
    run.write_scalars(2, {"eval/acc": 0.5})
    with pytest.raises(ValueError, match="reserved"):
      run.write_scalars(3, {"step": 1})
    with pytest.raises(TypeError, match="scalars"):
      run.write_scalars(3, {"loss": np.ones(3)})
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["config"] == {"lr": 0.1, "name": "x"}
  assert set(json.loads((tmp_path / "run" / "git.json").read_text())) == {"revision", "dirty"}
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3 and json.loads(lines[0])["loss"] == 2.5
  records = run_dir_lib.read_metrics(tmp_path / "run")
  assert [r["step"] for r in records] == [1, 2]
  assert records[1]["loss"] == 1.5 and records[1]["eval/acc"] == 0.5
  pytest.importorskip("tensorboardX")
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_run_dir_appends_on_resume(tmp_path):
  with run_dir_lib.RunDir(tmp_path, {"a": 1}, tensorboard=False) as run:
    run.write_scalars(1, {"loss": 3.0})
  with run_dir_lib.RunDir(tmp_path, tensorboard=False) as run:
    run.write_scalars(1, {"loss": 2.0})
    run.write_scalars(2, {"loss": 1.0})
  records = run_dir_lib.read_metrics(tmp_path)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.0)]


def _array_files(item_dir):
  """The OCDBT data files of an orbax item (d/<hash> and ocdbt.process_*/d/<hash>: the array bytes)."""
  files = [p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no OCDBT data files under {item_dir}"
  return files


@pytest.mark.parametrize("damage", ["truncated_array_file", "missing_item_folder"])
def test_broken_latest_step_falls_back_to_the_newest_intact_one(tmp_path, damage, caplog):
  import shutil

  directory = tmp_path / "ckpt"
  with checkpoint_lib.CheckpointManager(directory, max_to_keep=3) as manager:
    for step in (1, 2, 3):
      manager.save(step, _state(step))
  if damage == "truncated_array_file":
    for victim in _array_files(directory / "3" / "default"):
      victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
  else:
    shutil.rmtree(directory / "3" / "default")
  with caplog.at_level("WARNING"), checkpoint_lib.CheckpointManager(directory, max_to_keep=3) as manager:
    step, restored = manager.restore_latest(_state())
    assert step == 2
    _assert_trees_equal(restored, _state(2))
    assert manager.all_steps() == [1, 2]  # the broken step is gone, so the resumed run can write it again
    assert manager.save(3, _state(3))
  assert any("step 3" in r.getMessage() and "broken" in r.getMessage() for r in caplog.records), caplog.text
  with checkpoint_lib.CheckpointManager(directory, max_to_keep=3) as manager:
    step, restored = manager.restore_latest(_state())
  assert step == 3
  _assert_trees_equal(restored, _state(3))


def test_no_intact_step_is_a_one_line_error_naming_the_directory(tmp_path):
  import shutil

  from bayesprompt.errors import UserError

  directory = tmp_path / "ckpt"
  with checkpoint_lib.CheckpointManager(directory) as manager:
    for step in (1, 2):
      manager.save(step, _state(step))
  for step in (1, 2):
    shutil.rmtree(directory / str(step) / "default")
  with checkpoint_lib.CheckpointManager(directory) as manager, pytest.raises(UserError) as error:
    manager.restore_latest(_state())
  message = str(error.value)
  assert str(directory) in message and "no intact checkpoint" in message and "\n" not in message
