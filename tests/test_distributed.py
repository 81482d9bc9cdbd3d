"""Data-parallel training, evaluation, KFAC and EPIG on simulated CPU devices equal the one-device results.

The pytest process has already initialised JAX with one CPU device, so every multi-device scenario runs in a
subprocess (`python -m tests.test_distributed <scenario> ...`) with
XLA_FLAGS=--xla_force_host_platform_device_count=N; it writes what it measured to a JSON/npz file and the
tests below assert on it.

Oracles: the unsharded jitted step of `prompt_trainer` on one device (same inputs, same keys), the unsharded
`kfac_update` / `epig`, `prompt_run.evaluate`, and the values a checkpoint was written from. Tolerance:
float32, atol 2e-5 (the sharded computation sums over the batch in another order; nothing else differs).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 2e-5
IMAGE_SIZE, PATCH = 16, 8
WORDS = "a photo of the red blue green circle square star big small striped dog cat on grass".split()
TEMPLATE = "a photo of a {}."
CLASSNAMES = ["red circle", "blue square", "cat", "big striped dog"]
GLOBAL_BATCH = 8
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, -1], np.int32)  # the last row is padding (label -1)

# Every learner with CE, and OVE-PG on a deterministic and on a Monte Carlo learner.
CASES = {
    "coop+ce": ("coop", dict(n_ctx=4), "ce"),
    "cocoop+ce": ("cocoop", dict(), "ce"),
    "maple+ce": ("maple", dict(depth=2), "ce"),
    "mpl+ce": ("mpl", dict(depth=2), "ce"),
    "vpt+ce": ("vpt", dict(num_train_samples=2), "ce"),
    "vamp+ce": ("vamp", dict(n_tokens=2, first_layer=1, depth=2, num_train_samples=2, num_test_samples=2), "ce"),
    "coop+ove_pg": ("coop", dict(n_ctx=4), "ove_pg"),
    "vpt+ove_pg": ("vpt", dict(num_train_samples=2), "ove_pg"),
}


# ------------------------------------------------------------------------------------------ shared set-up


def make_world(tmp_dir: pathlib.Path) -> dict:
  """A tiny random CLIP (2 vision / 2 text layers, width 32), a word tokenizer, 8 images and labels."""
  import bayesprompt.clip as clip
  from bayesprompt.clip.tokenizer import WordTokenizer
  from tests.test_prompts_learners import random_clip_params

  tokenizer = WordTokenizer(WORDS, context_length=16)
  tmp_dir.mkdir(parents=True, exist_ok=True)
  path = tmp_dir / "words.json"
  tokenizer.to_json(path)
  config = clip.CLIPConfig(
      vision=clip.VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, width=32, layers=3, heads=2, mlp_dim=64),
      text=clip.TextConfig(vocab_size=tokenizer.vocab_size, context_length=16, width=32, layers=3, heads=2,
                           mlp_dim=64),
      embed_dim=32, tokenizer=str(path))
  rng = np.random.default_rng(1)
  images = rng.normal(size=(GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  prototypes = rng.normal(size=(len(CLASSNAMES), 32)).astype(np.float32)
  prototypes /= np.linalg.norm(prototypes, axis=-1, keepdims=True)
  return dict(config=config, params=random_clip_params(config), images=images, tokenizer=tokenizer,
              prototypes=prototypes)


def make_case(world: dict, name: str):
  """(learner, objective, optimizer, class_state, teacher_text, initial TrainState) of one case."""
  from bayesprompt import prompts
  from bayesprompt.objectives import make_objective
  from bayesprompt.prompts.engine import zeroshot_text_features
  from bayesprompt.train import prompt_trainer

  method, hparams, objective_name = CASES[name]
  learner = prompts.make_learner(method, world["config"], **hparams)
  objective = make_objective(objective_name)
  # Momentum SGD: the second step also checks that the (replicated) optimizer state is carried correctly.
  optimizer = optax.sgd(0.5, momentum=0.9)
  prototypes = world["prototypes"] if learner.needs_class_prototypes else None
  class_state = learner.prepare_classes(world["params"], CLASSNAMES, templates=[TEMPLATE],
                                        class_prototypes=prototypes)
  teacher_text = zeroshot_text_features(world["params"], world["config"], CLASSNAMES, TEMPLATE,
                                        tokenizer=world["tokenizer"])
  state = prompt_trainer.create_train_state(learner, optimizer, 0, world["params"], class_state)
  return learner, objective, optimizer, class_state, teacher_text, state


def max_abs_diff(a, b) -> float:
  """max |a − b| over every leaf of two trees; NaN if any entry of either is NaN (np.max propagates NaN, so a
  `diff < tol` assertion fails on it; Python's max over floats would skip it)."""
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0),
                                        a, b))
  return float(np.max(leaves, initial=0.0))


def all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))


def in_memory_split(num: int, seed: int = 0, image_size: int = IMAGE_SIZE):
  """A LabeledSplit of `num` random uint8 images (image_size²) with labels cycling over the classes."""
  from bayesprompt.data.sources import LabeledSplit

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num, image_size, image_size, 3), dtype=np.uint8)
  labels = np.arange(num) % len(CLASSNAMES)
  return LabeledSplit(dataset="toy", split="test", classnames=CLASSNAMES, template=TEMPLATE,
                      read_record=lambda i: (images[i], int(labels[i])), raw_labels=lambda: labels,
                      record_ids=np.arange(num), label_map=np.arange(len(CLASSNAMES)), description="in memory")


def flat_leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# ------------------------------------------------------------------------------------------ subprocess scenarios


def scenario_four_devices(out_dir: pathlib.Path, ckpt_from_one: pathlib.Path | None, cases: list[str]) -> None:
  """Runs in a 4-device process: every comparison against the unsharded computation, into results.json.
  Without `ckpt_from_one` only the train-step comparisons run."""
  from bayesprompt.bayes import acquisition, laplace
  from bayesprompt.bayes import distributed as bayes_distributed
  from bayesprompt.train import distributed, prompt_run, prompt_trainer
  from bayesprompt.train.checkpoint import CheckpointManager

  assert jax.device_count() == 4, jax.devices()
  jax.config.update("jax_disable_most_optimizations", True)  # tiny towers: compile time dominates
  world = make_world(out_dir)
  results: dict = {"train": {}, "sharding": {}}
  mesh = distributed.make_mesh()
  images, labels = jnp.asarray(world["images"]), jnp.asarray(LABELS)
  sharded_batch = distributed.shard_batch({"image": world["images"], "label": LABELS}, mesh)
  results["sharding"]["images_per_device"] = sorted(
      {tuple(s.data.shape) for s in sharded_batch["image"].addressable_shards})
  for name in cases:
    learner, objective, optimizer, class_state, teacher_text, state = make_case(world, name)
    single = prompt_trainer.make_train_step(learner, objective, optimizer)
    state1 = jax.tree.map(jnp.copy, state)
    for _ in range(2):
      state1, metrics1 = single(state1, world["params"], class_state, images, labels, teacher_text)
    sharded = distributed.make_train_step(learner, objective, optimizer, mesh, world["params"])
    clip4 = distributed.place_clip(world["params"], mesh)
    state4, class4, teacher4 = distributed.replicate((state, class_state, teacher_text), mesh)
    for _ in range(2):
      state4, metrics4 = sharded(state4, clip4, class4, sharded_batch["image"], sharded_batch["label"], teacher4)
    moved = max_abs_diff(state1.params, state.params)
    results["train"][name] = {"params": max_abs_diff(state1.params, state4.params),
                              "opt_state": max_abs_diff(state1.opt_state, state4.opt_state),
                              "metrics": max_abs_diff(metrics1, metrics4), "moved": moved,
                              "step": int(state4.step),
                              "finite": all_finite((state1, metrics1, state4, metrics4)),
                              "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state4))}
    if name == "coop+ce" and ckpt_from_one is not None:
      coop_state4 = state4
      # The frozen CLIP split over a 2-way "model" axis (leaves >= 1024 elements) on a 2x2 mesh.
      mesh22 = distributed.make_mesh(data=2, model=2)
      sharded22 = distributed.make_train_step(learner, objective, optimizer, mesh22, world["params"], min_size=1024)
      clip22 = distributed.place_clip(world["params"], mesh22, min_size=1024)
      results["sharding"]["model_split_leaves"] = sum(
          not x.sharding.is_fully_replicated for x in jax.tree.leaves(clip22))
      batch22 = distributed.shard_batch({"image": world["images"], "label": LABELS}, mesh22)
      state22, class22, teacher22 = distributed.replicate((state, class_state, teacher_text), mesh22)
      for _ in range(2):
        state22, _ = sharded22(state22, clip22, class22, batch22["image"], batch22["label"], teacher22)
      results["train"]["coop+ce mesh 2x2 model-sharded"] = {"params": max_abs_diff(state1.params, state22.params)}

  if ckpt_from_one is None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return
  # Evaluation: sharded (global batch 8 over 4 devices, 11 examples: a padded last batch) vs prompt_run.evaluate.
  results["eval"] = {}
  split = in_memory_split(11)
  for name in ("coop+ce", "vpt+ce"):
    learner, _, _, _, _, state = make_case(world, name)
    one = prompt_run.evaluate(learner, state.params, world["params"], split, batch_size=8, seed=3, progress=False)
    many = distributed.evaluate(learner, distributed.replicate(state.params, mesh),
                                distributed.place_clip(world["params"], mesh), split, mesh, batch_size=8, seed=3)
    results["eval"][name] = {"one": one, "many": many}

  # KFAC factors: 37 samples (not a multiple of 4) in chunks of 4, both likelihoods.
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.normal(size=(37, 24)), jnp.float32)
  embeddings = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  results["kfac"] = {}
  for likelihood in ("infonce", "siglip"):
    kwargs = dict(likelihood=likelihood, logit_bias=-1.5, add_bias=True, chunk_size=4)
    start = laplace.kfac_init(24, 16, add_bias=True)
    one = laplace.kfac_update(start, features, embeddings, targets, 2.3, **kwargs)
    many = bayes_distributed.kfac_update_sharded(start, features, embeddings, targets, 2.3, mesh, **kwargs)
    scale = float(jnp.max(jnp.abs(one.b_sum)))
    results["kfac"][likelihood] = {"a_rel": max_abs_diff(one.a_sum, many.a_sum) / float(jnp.max(jnp.abs(one.a_sum))),
                                   "b_rel": max_abs_diff(one.b_sum, many.b_sum) / scale,
                                   "num": [int(one.num_data), int(many.num_data)]}

  # EPIG: 13 pool points (padded to 16 over 4 devices) against 7 targets.
  pool = jnp.asarray(rng.dirichlet(np.ones(5), size=(13, 6)), jnp.float32)
  target = jnp.asarray(rng.dirichlet(np.ones(4), size=(7, 6)), jnp.float32)
  one = acquisition.epig(pool, target, pool_chunk=2, target_chunk=3)
  many = bayes_distributed.epig_sharded(pool, target, mesh, pool_chunk=2, target_chunk=3)
  results["epig"] = {"diff": max_abs_diff(one, many), "shape": list(many.shape), "max": float(jnp.max(one))}

  # Checkpoints: write the 4-device state; restore the 1-device one onto the mesh (replicated target sharding).
  manager = CheckpointManager(out_dir / "ckpt4", async_save=False)
  manager.save(int(coop_state4.step), coop_state4, force=True)
  manager.close()
  np.savez(out_dir / "ckpt4_expected.npz", **flat_leaves(coop_state4))
  learner, _, optimizer, class_state, _, _ = make_case(world, "coop+ce")
  template = distributed.replicate(
      prompt_trainer.create_train_state(learner, optimizer, 7, world["params"], class_state), mesh)
  manager = CheckpointManager(ckpt_from_one, async_save=False)
  restored = manager.restore(manager.latest_step(), template)
  manager.close()
  expected = np.load(ckpt_from_one.parent / "ckpt1_expected.npz")
  got = flat_leaves(restored)
  results["restore_on_4"] = {
      "diff": max_abs_diff({k: got[k] for k in expected.files}, {k: expected[k] for k in expected.files}),
      "same_keys": sorted(got) == sorted(expected.files),
      "devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(restored)}),
      "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(restored))}
  (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))


def scenario_multiprocess(out_dir: pathlib.Path, port: int, process_id: int) -> None:
  """One of two processes (2 CPU devices each) on loopback: one sharded CoOp step over 4 devices."""
  from bayesprompt.train import distributed, prompt_trainer
  from bayesprompt.train.checkpoint import CheckpointManager

  distributed.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  jax.config.update("jax_disable_most_optimizations", True)
  world = make_world(out_dir / f"p{process_id}")
  mesh = distributed.make_mesh()
  learner, objective, optimizer, class_state, teacher_text, state = make_case(world, "coop+ce")
  # Reference: the unsharded step on this process's first device with the whole global batch.
  device = jax.local_devices()[0]
  single = prompt_trainer.make_train_step(learner, objective, optimizer)
  # (A copy: device_put to the device the state already lives on aliases it, and the step donates it.)
  ref_args = jax.device_put((jax.tree.map(jnp.copy, state), world["params"], class_state, world["images"], LABELS,
                             teacher_text), device)
  ref_state, ref_metrics = single(*ref_args)
  # Sharded: this process contributes rows [4p, 4p + 4) of the global batch.
  rows = slice(4 * process_id, 4 * process_id + 4)
  batch = distributed.shard_batch({"image": world["images"][rows], "label": LABELS[rows]}, mesh)
  sharded = distributed.make_train_step(learner, objective, optimizer, mesh, world["params"])
  state4, metrics4 = sharded(distributed.replicate(state, mesh), distributed.place_clip(world["params"], mesh),
                             distributed.replicate(class_state, mesh), batch["image"], batch["label"],
                             distributed.replicate(teacher_text, mesh))
  # A checkpoint written by both processes together (orbax: one copy of each replicated array).
  manager = CheckpointManager(out_dir / "ckpt_mp", async_save=False)
  manager.save(1, state4, force=True)
  manager.close()
  np.savez(out_dir / f"process{process_id}.npz", **{f"sharded{k}": v for k, v in flat_leaves(state4.params).items()},
           **{f"reference{k}": v for k, v in flat_leaves(ref_state.params).items()},
           sharded_loss=np.asarray(metrics4["loss"]), reference_loss=np.asarray(ref_metrics["loss"]),
           rows=np.concatenate([np.asarray(x.data) for x in batch["label"].addressable_shards]))


def scenario_run(out_dir: pathlib.Path, epochs: int = 2) -> None:
  """`prompt_run.run` (`epochs` epochs of CoOp on sandbox_shapes, as tests/test_prompt_run.py) without a mesh
  and on a 4-device mesh in one 4-device process; writes both results and the final params' difference."""
  import dataclasses

  import bayesprompt.clip as clip
  from bayesprompt.data.sandbox import model as sandbox_model
  from bayesprompt.train import distributed, prompt_run
  from bayesprompt.train.checkpoint import CheckpointManager
  from tests.test_prompt_run import tiny_config

  jax.config.update("jax_disable_most_optimizations", True)
  directory = out_dir / "tiny_clip"
  config = tiny_config(sandbox_model.TOKENIZER_FILE)
  clip.save_checkpoint(directory, config, clip.init_params(config, jax.random.key(0)))
  sandbox_model.tokenizer().to_json(directory / sandbox_model.TOKENIZER_FILE)
  cfg = prompt_run.PromptRunConfig(
      method="coop", dataset="sandbox_shapes", protocol="base2new", checkpoint=str(directory), num_shots=2,
      seed=3, epochs=epochs, batch_size=16, lr=0.05, warmup_epochs=min(1, epochs - 1), learner_kwargs={"n_ctx": 4},
      eval_batch_size=32, max_eval_examples=48)
  one = prompt_run.run(cfg, out_dir / "one", progress=False)
  many = prompt_run.run(dataclasses.replace(cfg), out_dir / "many", progress=False, mesh=distributed.make_mesh())
  params = []
  for name in ("one", "many"):
    with CheckpointManager(out_dir / name / "checkpoints", async_save=False) as manager:
      params.append(manager._manager.restore(manager.latest_step())["params"])
  (out_dir / "results.json").write_text(json.dumps(
      {"one": one, "many": many, "params": max_abs_diff(*params),
       "moved": max_abs_diff(params[0], jax.tree.map(jnp.zeros_like, params[0]))}, indent=1))


# ------------------------------------------------------------------------------------------ the tests


def run_scenario(args: list[str], devices: int) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "tests.test_distributed", *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(process: subprocess.Popen, timeout: int = 300) -> str:
  try:
    output, _ = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    output, _ = process.communicate()
    pytest.fail(f"subprocess timed out after {timeout} s:\n{output[-4000:]}")
  if process.returncode:
    pytest.fail(f"subprocess failed (exit {process.returncode}):\n{output[-6000:]}")
  return output


# The default tier: one sharded CE step pair of every learner (CoOp also on a 2x2 data x model mesh), and a
# Monte Carlo learner with the teacher-using OVE-PG objective (its padded row masked). All of CASES (adds
# CoOp + OVE-PG): test_every_learner_and_objective (slow).
FAST_CASES = [name for name in CASES if name != "coop+ove_pg"]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """Writes a 1-device checkpoint here, then runs the 4-device scenario (which restores it)."""
  from bayesprompt.train.checkpoint import CheckpointManager

  out_dir = tmp_path_factory.mktemp("four_devices")
  world = make_world(out_dir)
  _, _, _, _, _, state = make_case(world, "coop+ce")
  state = state.replace(params=jax.tree.map(lambda x: x + 0.25, state.params), step=jnp.asarray(3, jnp.int32))
  with CheckpointManager(out_dir / "ckpt1" / "run", async_save=False) as manager:
    manager.save(3, state, force=True)
  np.savez(out_dir / "ckpt1" / "ckpt1_expected.npz", **flat_leaves(state))
  wait(run_scenario(["four_devices", str(out_dir), str(out_dir / "ckpt1" / "run"), ",".join(FAST_CASES)], 4),
       timeout=900)  # every learner compiles in it: minutes on a loaded machine
  return out_dir, json.loads((out_dir / "results.json").read_text())


def test_batch_is_split_over_four_devices(four_devices):
  _, results = four_devices
  assert results["sharding"]["images_per_device"] == [[2, IMAGE_SIZE, IMAGE_SIZE, 3]]
  assert results["sharding"]["model_split_leaves"] > 0


def test_train_step_on_four_devices_equals_one_device(four_devices):
  _, results = four_devices
  assert set(FAST_CASES) <= set(results["train"])
  check_train_results(results)


@pytest.mark.slow
def test_every_learner_and_objective_on_four_devices_equals_one_device(tmp_path):
  wait(run_scenario(["four_devices", str(tmp_path), "-", ",".join(CASES)], 4), timeout=900)
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["train"]) >= set(CASES)
  check_train_results(results)


@pytest.mark.parametrize("epochs", [pytest.param(1, id="default-tier"), pytest.param(2, marks=pytest.mark.slow)])
def test_prompt_run_on_four_devices_equals_one_device(tmp_path, epochs):
  """The whole binary path: `epochs` epochs (1 in the default tier), checkpoints, evaluation on every split."""
  wait(run_scenario(["run", str(tmp_path), str(epochs)], 4), timeout=900)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["params"] < 1e-4 and results["moved"] > 1e-3, results
  assert set(results["one"]) == set(results["many"]) and results["one"]
  for split, metrics in results["one"].items():
    assert results["many"][split]["num_examples"] == metrics["num_examples"], split
    for metric in ("accuracy", "nll", "ece", "brier"):
      np.testing.assert_allclose(results["many"][split][metric], metrics[metric], atol=1e-4, err_msg=split)


def check_train_results(results: dict) -> None:
  for name, diffs in results["train"].items():
    assert diffs["params"] < ATOL, (name, diffs)  # NaN fails here too (max_abs_diff propagates it)
    if "opt_state" in diffs:
      assert diffs["moved"] > 1e-3, (name, diffs)  # the step changed the params: the comparison means something
      assert diffs["opt_state"] < ATOL and diffs["metrics"] < ATOL, (name, diffs)
      assert diffs["step"] == 2 and diffs["replicated"], (name, diffs)
      assert diffs["finite"], (name, diffs)  # params, optimizer state and every metric, on both sides


def test_sharded_evaluation_equals_one_device(four_devices):
  _, results = four_devices
  for name, both in results["eval"].items():
    assert both["many"]["num_examples"] == both["one"]["num_examples"] == 11, name
    for metric in ("accuracy", "nll", "ece", "brier"):
      np.testing.assert_allclose(both["many"][metric], both["one"][metric], atol=1e-5, err_msg=f"{name} {metric}")


def test_kfac_factors_on_four_devices_equal_one_device(four_devices):
  _, results = four_devices
  for likelihood, diffs in results["kfac"].items():
    assert diffs["num"] == [37, 37], likelihood
    assert diffs["a_rel"] < 1e-5 and diffs["b_rel"] < 1e-5, (likelihood, diffs)


def test_epig_on_four_devices_equals_one_device(four_devices):
  _, results = four_devices
  assert results["epig"]["shape"] == [13] and results["epig"]["max"] > 1e-3
  assert results["epig"]["diff"] < 1e-5


def test_checkpoint_written_on_one_device_restores_on_four(four_devices):
  _, results = four_devices
  restore = results["restore_on_4"]
  assert restore["same_keys"] and restore["diff"] == 0.0
  assert restore["devices"] == [4] and restore["replicated"]


def test_checkpoint_written_on_four_devices_restores_on_one(four_devices):
  from bayesprompt.train import prompt_trainer
  from bayesprompt.train.checkpoint import CheckpointManager

  out_dir, _ = four_devices
  world = make_world(out_dir / "one")
  learner, _, optimizer, class_state, _, _ = make_case(world, "coop+ce")
  template = prompt_trainer.create_train_state(learner, optimizer, 11, world["params"], class_state)
  with CheckpointManager(out_dir / "ckpt4", async_save=False) as manager:
    assert manager.latest_step() == 2
    restored = manager.restore(2, template)
  expected = np.load(out_dir / "ckpt4_expected.npz")
  got = flat_leaves(restored)
  assert sorted(got) == sorted(expected.files)
  for key in expected.files:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))


def test_two_processes_on_loopback_run_one_sharded_step(tmp_path):
  import portpicker

  port = portpicker.pick_unused_port()
  processes = [run_scenario(["multiprocess", str(tmp_path), str(port), str(i)], 2) for i in range(2)]
  for process in processes:
    wait(process)
  first, second = (np.load(tmp_path / f"process{i}.npz") for i in range(2))
  # Each process fed different rows, yet both hold the same (replicated) result ...
  assert not np.array_equal(first["rows"], second["rows"])
  keys = [k for k in first.files if k.startswith("sharded")]
  assert keys
  for key in keys:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    # ... which is the one-device step on the whole global batch.
    reference = first["reference" + key[len("sharded"):]]
    np.testing.assert_allclose(first[key], reference, atol=ATOL, err_msg=key)
  np.testing.assert_allclose(first["sharded_loss"], first["reference_loss"], atol=ATOL)
  assert (tmp_path / "ckpt_mp" / "1").is_dir()


def test_bad_mesh_and_batch_sizes_raise_clear_errors():
  from bayesprompt.train import distributed

  with pytest.raises(ValueError, match="needs 8 devices"):
    distributed.make_mesh(data=8)
  with pytest.raises(ValueError, match="model axis size 0"):
    distributed.make_mesh(model=0)
  mesh = distributed.make_mesh()
  assert mesh.shape == {"data": jax.device_count(), "model": 1}
  with pytest.raises(ValueError, match="coordinator"):
    distributed.initialize_distributed(num_processes=2, process_id=1)
  assert distributed.initialize_distributed() is False
  split = in_memory_split(10)
  shards = [distributed.process_shard(split, i, 3) for i in range(3)]
  ids = np.concatenate([s.record_ids for s in shards])
  assert [len(s) for s in shards] == [3, 3, 3] and len(set(ids.tolist())) == 9  # disjoint, equal-sized
  with pytest.raises(ValueError, match="process_index"):
    distributed.process_shard(split, 3, 3)


def test_bad_batch_size_for_mesh_raises(monkeypatch):
  from bayesprompt.train import distributed

  class FakeMesh:
    shape = {"data": 4, "model": 1}

  with pytest.raises(ValueError, match="not a multiple of the mesh's data axis size 4"):
    distributed.check_global_batch(6, FakeMesh())
  assert distributed.check_global_batch(8, FakeMesh()) == 8


if __name__ == "__main__":
  scenario, *argv = sys.argv[1:]
  if scenario == "four_devices":
    scenario_four_devices(pathlib.Path(argv[0]), None if argv[1] == "-" else pathlib.Path(argv[1]),
                          argv[2].split(","))
  elif scenario == "run":
    scenario_run(pathlib.Path(argv[0]), *(int(x) for x in argv[1:2]))
  elif scenario == "multiprocess":
    scenario_multiprocess(pathlib.Path(argv[0]), int(argv[1]), int(argv[2]))
  else:
    raise SystemExit(f"unknown scenario {scenario!r}")
