"""The prompt-learning run (bayesprompt.train.prompt_run / prompt_trainer) end to end on a tiny CLIP.

Oracles: an uninterrupted run (a run killed right after its epoch-1 checkpoint and resumed must equal it bit
for bit, after executing only the missing steps); the run's own test metrics (re-evaluating the trained
run directory on the same class list must reproduce them exactly); chex's trace counter (the jitted train
step compiles once); the optimizer's update (every learner leaf moves in one step).

Gradients reaching exactly the learner params, and class-name changes at the learner level, are covered
by tests/test_prompts_learners.py (test_jitted_step_reaches_exactly_the_learner_params_...); not repeated.

The tiny model is saved with `clip.save_checkpoint` beside a word-tokenizer JSON over the sandbox
vocabulary, so `cfg.checkpoint` names a real directory and `evaluate_trained` reloads the same model.
Data: sandbox_shapes base-to-new (generated once into ~/.cache/bayesprompt), 2 shots, batch 16.
"""

import dataclasses
import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesprompt.clip as clip
from bayesprompt.data import protocols
from bayesprompt.data.sandbox import model as sandbox_model
from bayesprompt.errors import UserError
from bayesprompt.objectives import make_objective
from bayesprompt.prompts import make_learner
from bayesprompt.train import optim, prompt_run, prompt_trainer
from bayesprompt.train.checkpoint import CheckpointManager

IMAGE_SIZE = 32  # the sandbox's own resolution: no resize in the pipeline


def tiny_config(tokenizer_spec: str) -> clip.CLIPConfig:
  vocab_size = sandbox_model.tokenizer().vocab_size
  return clip.CLIPConfig(
      vision=clip.VisionConfig(image_size=IMAGE_SIZE, patch_size=16, width=32, layers=2, heads=2, mlp_dim=64),
      text=clip.TextConfig(vocab_size=vocab_size, context_length=sandbox_model.CONTEXT_LENGTH, width=32, layers=2,
                           heads=2, mlp_dim=64),
      embed_dim=32, tokenizer=tokenizer_spec)


# Tiny towers: XLA's optimisation passes cost far more than they save.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A tiny random CLIP in open_clip layout with its tokenizer JSON (relative spec, as the sandbox ships)."""
  directory = tmp_path_factory.mktemp("tiny_clip") / "tiny_clip"
  config = tiny_config(sandbox_model.TOKENIZER_FILE)
  params = clip.init_params(config, jax.random.key(0))
  clip.save_checkpoint(directory, config, params)
  sandbox_model.tokenizer().to_json(directory / sandbox_model.TOKENIZER_FILE)
  return directory


@pytest.fixture(scope="module")
def cfg(tiny_checkpoint):
  return prompt_run.PromptRunConfig(
      method="coop", dataset="sandbox_shapes", protocol="base2new", checkpoint=str(tiny_checkpoint), num_shots=2,
      seed=3, epochs=2, batch_size=16, lr=0.05, warmup_epochs=1, learner_kwargs={"n_ctx": 4},
      eval_batch_size=32, max_eval_examples=48)


class Preempted(Exception):
  pass


def counting_train_steps(monkeypatch):
  """Makes prompt_run count the train-step calls it makes; returns the counter."""
  calls = []
  make = prompt_trainer.make_train_step

  def make_counted(*args, **kwargs):
    step = make(*args, **kwargs)

    def counted(*a, **k):
      calls.append(1)
      return step(*a, **k)

    return counted

  monkeypatch.setattr(prompt_run.prompt_trainer, "make_train_step", make_counted)
  return calls


def final_state(run_dir):
  """The learner params and step of a run directory's latest checkpoint (restored independently of run)."""
  with CheckpointManager(run_dir / "checkpoints", async_save=False) as manager:
    step = manager.latest_step()
    restored = manager._manager.restore(step)  # raw pytree: no template that could mask a difference
  return step, restored


@pytest.fixture(scope="module")
def uninterrupted(cfg, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("uninterrupted")
  results = prompt_run.run(cfg, run_dir, progress=False)
  return run_dir, results


def test_resumed_run_equals_the_uninterrupted_run_bitwise(cfg, uninterrupted, tmp_path, monkeypatch):
  run_dir_u, results_u = uninterrupted
  run_dir = tmp_path / "interrupted"

  class KilledAfterFirstCheckpoint(CheckpointManager):
    def save(self, step, state, *, force=False):
      super().save(step, state, force=force)
      raise Preempted(f"killed after saving step {step}")

  with monkeypatch.context() as patch:
    patch.setattr(prompt_run, "CheckpointManager", KilledAfterFirstCheckpoint)
    with pytest.raises(Preempted):
      prompt_run.run(cfg, run_dir, progress=False)
  steps_per_epoch = (32 * cfg.num_shots) // cfg.batch_size
  assert CheckpointManager(run_dir / "checkpoints", async_save=False).all_steps() == [steps_per_epoch]

  calls = counting_train_steps(monkeypatch)
  results_r = prompt_run.run(cfg, run_dir, resume=True, progress=False)
  # It really resumed: only the second epoch's steps ran.
  assert len(calls) == steps_per_epoch
  assert results_r == results_u  # exact float equality of every metric
  step_u, state_u = final_state(run_dir_u)
  step_r, state_r = final_state(run_dir)
  assert step_u == step_r == cfg.epochs * steps_per_epoch
  chex.assert_trees_all_equal(state_r, state_u)
  # The resumed epoch logged the same training loss as the uninterrupted one.
  def epoch_losses(d):
    return {r["step"]: r["train/loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}
  assert epoch_losses(run_dir) == epoch_losses(run_dir_u)
  assert json.loads((run_dir / "results.json").read_text())["results"] == results_u


def test_resume_from_a_directory_of_another_config_is_refused(cfg, uninterrupted, tmp_path):
  run_dir, _ = uninterrupted
  other = dataclasses.replace(cfg, lr=0.01, epochs=3)
  with pytest.raises(UserError, match=r"cannot resume .*epochs: stored 2, now 3; lr: stored 0.05, now 0.01"):
    prompt_run.run(other, run_dir, resume=True, progress=False)
  # An unfinished run of another config: refused by the checkpoint's stored config.
  partial = tmp_path / "partial"
  shutil.copytree(run_dir, partial)
  (partial / "results.json").unlink()
  with pytest.raises(UserError, match=r"cannot resume .*epochs: stored 2, now 3; lr: stored 0.05, now 0.01"):
    prompt_run.run(other, partial, resume=True, progress=False)


def test_rerun_without_resume_is_refused_and_a_finished_run_is_read_back(cfg, uninterrupted, monkeypatch):
  run_dir, results = uninterrupted
  metrics = (run_dir / "metrics.jsonl").read_text()
  with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
    prompt_run.run(cfg, run_dir, progress=False)
  calls = counting_train_steps(monkeypatch)
  assert prompt_run.run(cfg, run_dir, resume=True, progress=False) == results
  assert not calls  # read back, not retrained
  assert (run_dir / "metrics.jsonl").read_text() == metrics  # never a second run's metrics in the file


def test_protocol_names_have_one_spelling_and_the_old_ones_warn():
  """The prompt run's protocols are the data layer's (less zero-shot "all"); the old flag names still run."""
  assert prompt_run.PROTOCOLS == ("base2new", "few_shot", "cross_dataset", "domain_generalization")
  for old, new in (("fewshot", "few_shot"), ("xd", "cross_dataset"), ("dg", "domain_generalization")):
    with pytest.warns(FutureWarning, match=f"protocol '{old}' is renamed '{new}'"):
      assert prompt_run.PromptRunConfig(protocol=old).protocol == new
    with pytest.warns(FutureWarning, match=f"protocol '{old}' is renamed '{new}'"):
      assert protocols.canonical_protocol(old) == new
  with pytest.raises(ValueError, match="unknown protocol 'fewshots'"):
    prompt_run.PromptRunConfig(protocol="fewshots")
  with pytest.raises(ValueError, match="protocol 'all' is zero-shot evaluation"):
    prompt_run.PromptRunConfig(protocol="all")


def test_evaluate_trained_on_the_same_and_on_other_classes(cfg, uninterrupted):
  run_dir, results = uninterrupted
  # Oracle: the run's own evaluation of the same splits (same params, same subset) - exact.
  same = prompt_run.evaluate_trained(run_dir, dataset="sandbox_shapes", protocol="base2new",
                                     max_eval_examples=cfg.max_eval_examples, progress=False)
  assert same == results
  # Another class list: all 64 classes (twice the classes it was trained on), no retraining.
  other = prompt_run.evaluate_trained(run_dir, dataset="sandbox_shapes", protocol="few_shot", max_eval_examples=40,
                                      progress=False)
  assert list(other) == ["all"]
  metrics = other["all"]
  assert metrics["num_examples"] == 40
  assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["nll"])
  with pytest.raises(ValueError, match="is not a trained run directory"):
    prompt_run.evaluate_trained(run_dir / "checkpoints", dataset="sandbox_shapes")


def test_train_step_compiles_once_and_moves_every_learner_param(tiny_checkpoint):
  config, clip_params = clip.load_checkpoint(tiny_checkpoint)
  classnames = ["red circle", "blue square", "green star"]
  learner = make_learner("cocoop", config)
  class_state = learner.prepare_classes(clip_params, classnames, templates=["a photo of a {}."])
  optimizer = optim.make_optimizer("sgd", 0.1, weight_decay=5e-4, momentum=0.9)
  objective = make_objective("ce")

  class TracedLearner:
    """The learner with `apply` under chex's trace counter (the step traces apply once per compile)."""

    def __init__(self, learner):
      self._learner = learner
      self.apply = chex.assert_max_traces(learner.apply, n=1)

    def __getattr__(self, name):
      return getattr(self._learner, name)

  chex.clear_trace_counter()
  step = prompt_trainer.make_train_step(TracedLearner(learner), objective, optimizer)
  state = prompt_trainer.create_train_state(learner, optimizer, 0, clip_params, class_state)
  initial = jax.tree.map(np.array, state.params)
  teacher = class_state.zeroshot_text_features
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(4, IMAGE_SIZE, IMAGE_SIZE, 3)), jnp.float32),
              jnp.asarray(rng.integers(0, 3, size=4), jnp.int32)) for _ in range(3)]
  jax.block_until_ready(batches)
  losses = []
  for images, labels in batches:
    with jax.transfer_guard("disallow"):  # no hidden host<->device copies inside the step
      state, metrics = step(state, clip_params, class_state, images, labels, teacher)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 3 and np.all(np.isfinite(losses))
  moved = jax.tree.map(lambda before, after: bool(np.abs(np.asarray(after) - before).max() > 0), initial,
                       state.params)
  for path, ok in jax.tree_util.tree_leaves_with_path(moved):
    assert ok, f"learner param {jax.tree_util.keystr(path)} did not move"


def test_class_prototypes_are_per_class_means_of_normalised_frozen_features(tiny_checkpoint):
  """VaMP's prior input: oracle = each preprocessed image encoded alone, normalised and averaged per class in
  NumPy (float64), over a split whose size (11) leaves a padded last batch of 4."""
  from bayesprompt.data import pipeline
  from tests.test_distributed import in_memory_split

  config, params = clip.load_checkpoint(tiny_checkpoint)
  split = in_memory_split(11, image_size=IMAGE_SIZE)
  got = prompt_run.class_prototypes(params, config, split, batch_size=4)
  batches = pipeline.make_pipeline(split, image_size=IMAGE_SIZE, batch_size=1, train=False)
  features, labels = [], []
  for batch, _ in pipeline.iterate_padded(batches, 1):
    features.append(np.asarray(clip.encode_image(params, batch["image"][:1], config=config), np.float64)[0])
    labels.append(int(batch["label"][0]))
  features = np.stack(features)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  labels = np.asarray(labels)
  expected = np.stack([features[labels == c].mean(0) for c in range(split.num_classes)])
  assert got.shape == (split.num_classes, config.embed_dim)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
  with pytest.raises(ValueError, match="no training images for classes"):
    prompt_run.class_prototypes(params, config, split.select(np.arange(3)), batch_size=4)  # class 3 absent


def test_vamp_trains_through_prompt_run(cfg, tmp_path):
  """VaMP (class prototypes from the train split, KL, Monte Carlo samples) through the whole run: one epoch."""
  vamp = dataclasses.replace(cfg, method="vamp", epochs=1, warmup_epochs=0, max_eval_examples=16,
                             learner_kwargs=dict(n_tokens=2, first_layer=0, depth=2, num_train_samples=2,
                                                 num_test_samples=2))
  results = prompt_run.run(vamp, tmp_path / "vamp", progress=False)
  assert set(results) == {"base", "new"}
  for metrics in results.values():
    assert metrics["num_examples"] == 16 and all(np.isfinite(v) for v in metrics.values())
  logged = [json.loads(line) for line in (tmp_path / "vamp" / "metrics.jsonl").read_text().splitlines()]
  train = [row for row in logged if "train/kl" in row]
  assert train and np.isfinite(train[0]["train/kl"]) and train[0]["train/kl"] > 0
  assert train[0]["train/nonfinite_skipped"] == 0.0


def test_bad_input_raises_clear_errors(cfg, tmp_path):
  with pytest.raises(ValueError, match="unknown prompt-learning method 'cop'"):
    prompt_run.run(dataclasses.replace(cfg, method="cop"), tmp_path / "a", progress=False)
  with pytest.raises(ValueError, match="unknown protocol 'b2n'"):
    prompt_run.run(dataclasses.replace(cfg, protocol="b2n"), tmp_path / "b", progress=False)
  with pytest.raises(ValueError, match="batch_size 100 exceeds the 64 training examples"):
    prompt_run.run(dataclasses.replace(cfg, batch_size=100), tmp_path / "c", progress=False)
  with pytest.raises(ValueError, match="unknown objective 'mse'"):
    prompt_run.run(dataclasses.replace(cfg, objective="mse"), tmp_path / "d", progress=False)


def run_binary(module_name: str, *argv: str) -> None:
  """Runs an absl binary's main in this process (its flags parsed from argv, removed afterwards)."""
  from absl import flags

  from tests.conftest import binary_module

  with binary_module(module_name) as module:
    flags.FLAGS([module_name, *argv])
    try:
      module.main([])
    finally:
      flags.FLAGS.unparse_flags()


def test_prompt_learning_binary_runlocal_then_eval_only(tiny_checkpoint, tmp_path, capsys, monkeypatch):
  """The default tier's `experiments.prompt_learning --runlocal` (in process: no interpreter start-up), then
  `--eval_only` on the run directory it wrote, which must reproduce the run's own test metrics. The smoke run
  goes to a fresh directory under runs/runlocal (named on its first output line), never into --run_dir."""
  monkeypatch.chdir(tmp_path)
  run_binary("experiments.prompt_learning", "--runlocal", "--method=coop", "--hparams=n_ctx=2",
             f"--checkpoint={tiny_checkpoint}", "--dataset=sandbox_shapes", "--protocol=base2new", "--num_shots=1",
             "--batch_size=8", "--seeds=5,6", "--eval_batch_size=16", "--max_eval_examples=16",
             "--run_dir=runs/real", "--noprogress")
  out = capsys.readouterr().out
  assert "| coop+ce |" in out
  root = tmp_path / out.splitlines()[0].split(" -> ")[1]
  assert root.is_relative_to(tmp_path / "runs" / "runlocal") and not (tmp_path / "runs" / "real").exists()
  run_dir = root / "coop_ce" / "seed5"
  assert not (root / "coop_ce" / "seed6").exists()  # --runlocal: one seed
  stored = json.loads((run_dir / "results.json").read_text())
  assert stored["config"]["epochs"] == 1 and set(stored["results"]) == {"base", "new"}
  assert all(np.isfinite(m["nll"]) and m["num_examples"] == 16 for m in stored["results"].values())
  run_binary("experiments.prompt_learning", "--eval_only", f"--run_dir={run_dir}", "--dataset=sandbox_shapes",
             "--protocol=base2new", "--max_eval_examples=16", "--noprogress")
  out = capsys.readouterr().out
  assert json.loads(out[out.index("{"):]) == stored["results"]


def test_ove_pg_binary_runlocal_and_its_flags(tiny_checkpoint, tmp_path, capsys, monkeypatch):
  """`experiments.ove_pg --runlocal` (the README's main job) writes one table row per variant, and does not
  define --method / --objective, which it would ignore (its variants come from --methods / --ove_modes)."""
  from absl import flags

  from tests.conftest import binary_module

  monkeypatch.chdir(tmp_path)
  run_binary("experiments.ove_pg", "--runlocal", "--methods=coop", "--hparams=n_ctx=2", "--ove_modes=corrected",
             "--nowith_ce", f"--checkpoint={tiny_checkpoint}", "--dataset=sandbox_shapes", "--protocol=base2new",
             "--num_shots=1", "--batch_size=8", "--eval_batch_size=16", "--max_eval_examples=16",
             "--run_dir=runs/ove", "--noprogress")
  out = capsys.readouterr().out
  root = tmp_path / out.splitlines()[0].split(" -> ")[1]
  table = json.loads((root / "results.json").read_text())
  variants = {r["dataset"] for r in table["summary"]} - {"average"}
  assert variants == {"coop+ove_pg,mode=corrected"}, variants
  assert "| coop+ove_pg,mode=corrected |" in out
  stored = json.loads(next(root.glob("*/seed*/results.json")).read_text())
  assert stored["config"]["objective"] == "ove_pg" and stored["config"]["objective_kwargs"] == {"mode": "corrected"}
  assert all(np.isfinite(m["nll"]) for m in stored["results"].values())
  with binary_module("experiments.ove_pg"):
    assert "methods" in flags.FLAGS and "method" not in flags.FLAGS and "objective" not in flags.FLAGS


def test_ove_pg_binary_runs_both_regimes(tiny_checkpoint, tmp_path, capsys, monkeypatch):
  """The README's main job with --regimes (`--runlocal`): says first what will run, prints one table per
  regime with a zero-shot row and a sentence read off the table, and results.json holds every regime."""
  from bayesprompt.eval import zeroshot

  monkeypatch.chdir(tmp_path)
  run_binary("experiments.ove_pg", "--runlocal", "--methods=coop", "--hparams=n_ctx=2",
             "--ove_modes=corrected", f"--checkpoint={tiny_checkpoint}", "--dataset=sandbox_shapes",
             "--regimes=sandbox_shapes,sandbox_catalogue", "--extra_eval_datasets=sandbox_shapes_sketch",
             "--protocol=base2new", "--num_shots=1", "--batch_size=8", "--eval_batch_size=16",
             "--max_eval_examples=16", "--noprogress")
  out = capsys.readouterr().out
  first = out.strip().splitlines()[0]
  assert first.startswith("Will run 2 variant(s)"), first
  assert "x 1 seed(s)" in first and "x 2 regime(s)" in first, first
  root = tmp_path / first.split(" -> ")[1]
  # The progress lines count the runs overall (2 variants x 2 regimes), not per regime.
  assert [line.split("]")[0] for line in out.splitlines() if line.startswith("[run ")] == [
      f"[run {i}/4" for i in range(1, 5)]
  assert out.count("| zero-shot |") == 2 and out.count("| coop+ce |") == 2
  combined = json.loads((root / "results.json").read_text())
  assert list(combined["regimes"]) == ["sandbox_shapes", "sandbox_catalogue"]
  for dataset, regime in combined["regimes"].items():
    acc = {(r["dataset"], r["split"]): r["mean"] for r in regime["summary"] if r["metric"] == "accuracy"}
    assert {d for d, _ in acc} >= {"zero-shot", "coop+ce", "coop+ove_pg,mode=corrected"}
    assert all(np.isfinite(v) for v in acc.values())
    # The sentence quotes the table: CE against zero-shot, then OVE-PG against CE.
    zs = (acc[("zero-shot", "base")], acc[("zero-shot", "new")])
    ce = (acc[("coop+ce", "base")], acc[("coop+ce", "new")])
    assert f"base {100 * zs[0]:.1f} -> {100 * ce[0]:.1f}" in regime["sentence"], regime["sentence"]
    assert f"new {100 * zs[1]:.1f} -> {100 * ce[1]:.1f}" in regime["sentence"]
    assert regime["sentence"] in out
    # Extra (shifted) sets belong to --dataset's regime only.
    assert (("zero-shot", "sandbox_shapes_sketch/base") in acc) == (dataset == "sandbox_shapes")
    # The zero-shot row is the zero-shot binary's figure on the same test subset.
    reference = zeroshot.evaluate_checkpoint(str(tiny_checkpoint), [dataset], protocol="base2new",
                                             data_dir=None, source=None, batch_size=16, max_examples=16,
                                             run_dir=str(tmp_path / f"zs_{dataset}"), progress=False)
    for half in ("base", "new"):
      np.testing.assert_allclose(acc[("zero-shot", half)], reference[dataset][half]["accuracy"], atol=1e-6)


@pytest.mark.slow  # two interpreter + JAX start-ups and compiles (~30 CPU-s): the opt-in tier
def test_binary_trains_and_evaluates_a_run_directory(tiny_checkpoint, tmp_path):
  """`experiments.prompt_learning --runlocal` end to end, then `--eval_only` on the run it wrote."""
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu", PYTHONPATH=repo)

  def binary(*flags):
    proc = subprocess.run([sys.executable, "-m", "experiments.prompt_learning", *flags, "--progress=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

  out = binary("--runlocal", "--method=coop", "--hparams=n_ctx=4", f"--checkpoint={tiny_checkpoint}",
               "--dataset=sandbox_shapes", "--protocol=base2new", "--num_shots=1", "--batch_size=8", "--seeds=5,6",
               "--eval_batch_size=16", "--max_eval_examples=16", "--run_dir=runs/real")
  # --runlocal: a fresh smoke directory (named on the first line), never --run_dir.
  root = pathlib.Path(tmp_path / out.splitlines()[0].split(" -> ")[1])
  assert root.is_relative_to(tmp_path / "runs" / "runlocal") and not (tmp_path / "runs" / "real").exists()
  table = json.loads((root / "results.json").read_text())
  assert "| coop+ce |" in out and (root / "results.md").exists()
  run_dir = root / "coop_ce" / "seed5"
  assert not (root / "coop_ce" / "seed6").exists()  # --runlocal: one seed
  stored = json.loads((run_dir / "results.json").read_text())
  assert stored["config"]["epochs"] == 1 and stored["config"]["checkpoint"] == str(tiny_checkpoint)
  assert set(stored["results"]) == {"base", "new"} and stored["results"]["base"]["num_examples"] == 16
  assert {(r["seed"], r["split"]): r["metrics"]["accuracy"] for r in table["runs"]} == {
      (5, split): m["accuracy"] for split, m in stored["results"].items()}
  out = binary("--eval_only", f"--run_dir={run_dir}", "--dataset=sandbox_shapes", "--protocol=base2new",
               "--max_eval_examples=16")
  evaluated = json.loads(out[out.index("{"):])
  assert evaluated == stored["results"]  # same params, same subsets: exactly the run's own evaluation
