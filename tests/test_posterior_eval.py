"""Post-hoc posteriors of trained prompt learners (bayesprompt.bayesvlm.prompt_posterior, experiments.calibrate_prompts).

Oracles: the zero-shot BayesVLM path (a CoOp context equal to the template's word embeddings must give the
template's text features and the same BayesVLM predictive); the run's own evaluation ("none" reproduces the
metrics the training run wrote); the MAP predictive (a Laplace whose prior precision → ∞ collapses onto it).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesprompt.clip as clip
from bayesprompt.bayes import laplace
from bayesprompt.bayesvlm import features as features_lib
from bayesprompt.bayesvlm import prompt_posterior as posterior_lib
from bayesprompt.bayesvlm import vlm
from bayesprompt.prompts import make_learner, methods
from bayesprompt.train import prompt_run
from tests.test_prompt_run import tiny_checkpoint, tiny_config  # noqa: F401 (module fixture)

pytestmark = pytest.mark.usefixtures("fast_compiles")
CLASSES = ["red circle", "blue square", "green triangle"]


def random_towers(params, config, seed=0, prior_precision=3.0):
  """BayesVLM posteriors from random PSD factors of the right shapes (the identity under test does not
  depend on their values)."""
  rng = np.random.default_rng(seed)
  towers = {}
  for tower in vlm.TOWERS:
    d_in, dim = vlm.projection_dims(params, config, tower)
    a, b = rng.normal(size=(d_in, d_in)), rng.normal(size=(dim, dim))
    factors = laplace.KFACFactors(jnp.asarray(a @ a.T, jnp.float32), jnp.asarray(b @ b.T, jnp.float32),
                                  jnp.asarray(100.0))
    towers[tower], _ = vlm.tower_posterior(factors, params, config, tower, pseudo_data_count=10.0,
                                           prior_precision=prior_precision)
  return towers


def test_bayesvlm_with_the_template_context_equals_zero_shot_bayesvlm(tiny_checkpoint):  # noqa: F811
  config, params = clip.load_checkpoint(str(tiny_checkpoint))
  learner = make_learner("coop", config, n_ctx=4, ctx_init="a photo of a")
  class_state = learner.prepare_classes(params, CLASSES)
  learner_params = learner.init(jax.random.key(0), params, class_state)  # = the template's word embeddings
  text = posterior_lib.learner_text_features(learner, learner_params, params, class_state, jax.random.key(0), 1)
  template = features_lib.prompt_features(params, config, clip.get_tokenizer(config), CLASSES, "a photo of a {}.")
  for key in ("pre_projection", "embeddings"):
    np.testing.assert_allclose(np.asarray(text[key][0]), template[key], rtol=1e-5, atol=1e-5)

  images = np.asarray(jax.random.normal(jax.random.key(1), (5, config.vision.image_size,
                                                             config.vision.image_size, 3)))
  image = features_lib.image_features(params, config, images)
  towers = random_towers(params, config)
  scale = float(params["logit_scale"])
  ours = vlm.zero_shot_predictive(towers["img"], towers["txt"], image, {k: v[0] for k, v in text.items()}, scale)
  zero_shot = vlm.zero_shot_predictive(towers["img"], towers["txt"], image, template, scale)
  assert np.all(np.isfinite(np.asarray(ours)))
  np.testing.assert_allclose(np.asarray(ours), np.asarray(zero_shot), atol=1e-5)
  # Without uncertainty the learner's own logits come back (the 'none' posterior).
  logits = learner.apply(learner_params, params, class_state, jnp.asarray(images)).logits[0]
  np.testing.assert_allclose(np.asarray(vlm.map_log_probs(image, {k: v[0] for k, v in text.items()}, scale)),
                             np.asarray(jax.nn.log_softmax(logits)), atol=1e-5)


def test_image_conditioned_learners_are_refused_for_bayesvlm(tiny_checkpoint):  # noqa: F811
  config, params = clip.load_checkpoint(str(tiny_checkpoint))
  learner = make_learner("cocoop", config)
  class_state = learner.prepare_classes(params, CLASSES)
  with pytest.raises(ValueError, match="supports coop"):
    posterior_lib.learner_text_features(learner, learner.init(jax.random.key(0), params, class_state), params,
                                        class_state, jax.random.key(0), 1)


@pytest.fixture(scope="module")
def trained_coop(tiny_checkpoint, tmp_path_factory):  # noqa: F811
  cfg = prompt_run.PromptRunConfig(
      method="coop", dataset="sandbox_shapes", protocol="base2new", checkpoint=str(tiny_checkpoint), num_shots=2,
      seed=3, epochs=1, batch_size=16, lr=0.05, warmup_epochs=0, learner_kwargs={"n_ctx": 2},
      eval_batch_size=32, max_eval_examples=48)
  run_dir = tmp_path_factory.mktemp("coop_run")
  prompt_run.run(cfg, run_dir, progress=False)
  return run_dir


def test_scorer_reproduces_the_run_and_collapses_onto_it_without_uncertainty(trained_coop):
  run = prompt_run.load_trained(trained_coop)
  scorer = posterior_lib.PosteriorScorer(run, posteriors=("none", "laplace"), laplace_samples=8, batch_size=64)
  data = prompt_run.protocol_data(run.cfg)
  info = scorer.fit_laplace(data.train)
  assert info["kind"] == "full" and info["num_params"] == 2 * run.clip_config.text.width
  assert np.isfinite(info["log_marginal_likelihood"]) and info["prior_precision"] > 0
  results = scorer.score_splits(prompt_run.evaluation_splits(run.cfg, data), max_examples=48)
  stored = json.loads((trained_coop / "results.json").read_text())["results"]
  for split in ("base", "new"):
    for metric in ("accuracy", "nll", "ece", "brier"):
      np.testing.assert_allclose(results[split]["none"][metric], stored[split][metric], rtol=1e-5, atol=1e-6)
      assert np.isfinite(results[split]["laplace"][metric])
  # λ → ∞: the linearised predictive is the MAP predictive, and so is BayesVLM with near-certain projections.
  scorer.laplace = scorer.laplace._replace(prior_precision=jnp.asarray(1e12, jnp.float32))
  scorer.posteriors = ("none", "laplace", "bayesvlm")
  scorer.bayesvlm_posteriors = random_towers(run.clip_params, run.clip_config, prior_precision=1e10)
  split = data.evals["base"]
  images, _ = posterior_lib.load_split(split, run.clip_config.vision.image_size)
  probs = scorer.probabilities(split, images[:20])
  np.testing.assert_allclose(probs["laplace"], probs["none"], atol=1e-4)
  np.testing.assert_allclose(probs["bayesvlm"], probs["none"], atol=1e-4)


def test_diagonal_laplace_for_a_prompted_image_tower(trained_coop):
  """VaMP (deep prompts in both towers, sampled per image): the diagonal Laplace fits and predicts."""
  base = prompt_run.load_trained(trained_coop)
  learner = make_learner("vamp", base.clip_config, num_test_samples=2)
  data = prompt_run.protocol_data(base.cfg)
  class_state = learner.prepare_classes(base.clip_params, data.train.classnames, templates=[data.train.template])
  params = learner.init(jax.random.key(0), base.clip_params, class_state)
  run = dataclasses.replace(base, learner=learner, params=params)
  towers = random_towers(run.clip_params, run.clip_config, prior_precision=1e10)
  scorer = posterior_lib.PosteriorScorer(run, posteriors=("none", "laplace", "bayesvlm"), laplace_samples=4,
                                         batch_size=16, bayesvlm_posteriors=towers, laplace_prior_groups="leaves")
  assert not scorer.on_features  # VaMP prompts the image tower: it reads images
  scorer.laplace_kind = "diag"
  scorer.image_sample_chunk, scorer.image_sample_budget = 2, 4  # the chunked predictive: 2 images x 2 samples
  train = data.train.select(np.arange(16))
  info = scorer.fit_laplace(train)
  assert info["kind"] == "diag" and np.isfinite(info["log_marginal_likelihood"])
  assert bool(jnp.all(scorer.laplace.ggn_eigvals >= 0)) and float(jnp.max(scorer.laplace.ggn_eigvals)) > 0
  # one λ per parameter leaf, each finite and positive
  _, leaf_names = posterior_lib.prompt_laplace.leaf_groups(params)
  assert list(info["prior_precision"]) == leaf_names
  lams = np.array(list(info["prior_precision"].values()))
  assert np.all(np.isfinite(lams)) and np.all(lams > 0)
  images, labels = posterior_lib.load_split(data.evals["new"], run.clip_config.vision.image_size)
  probs = scorer.probabilities(data.evals["new"], images[:8])
  for p in probs.values():
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  # Near-certain projections: BayesVLM on VaMP's own towers and draws gives VaMP's own predictive.
  np.testing.assert_allclose(probs["bayesvlm"], probs["none"], atol=1e-4)


def test_shared_text_fast_path_equals_the_generic_path_on_a_trained_coop(trained_coop):
  """CoOp declares image-independent text features: the scorer's fast path (text Jacobian once per class
  list) gives the generic path's posterior, evidence and exact-moment predictive; CoCoOp does not declare
  it."""
  run = prompt_run.load_trained(trained_coop)
  data = prompt_run.protocol_data(run.cfg)
  train = data.train.select(np.arange(24))
  scorers = {fast: posterior_lib.PosteriorScorer(run, posteriors=("laplace",), laplace_jacobian=True,
                                                 batch_size=64, shared_text_path=fast, class_chunk=2)
             for fast in (True, False)}
  assert scorers[True].shared_text and not scorers[False].shared_text
  infos = {fast: scorer.fit_laplace(train) for fast, scorer in scorers.items()}
  for name in ("prior_precision", "log_likelihood", "log_marginal_likelihood"):
    np.testing.assert_allclose(infos[True][name], infos[False][name], rtol=1e-3)
  cov = {fast: np.asarray(posterior_lib.prompt_laplace.covariance(s.laplace)) for fast, s in scorers.items()}
  np.testing.assert_allclose(cov[True], cov[False], rtol=1e-3, atol=1e-4 * np.max(np.abs(cov[False])))
  split = data.evals["new"]
  images, _ = posterior_lib.load_split(split, run.clip_config.vision.image_size)
  probs = {fast: s.probabilities(split, images[:16])["laplace"] for fast, s in scorers.items()}
  assert np.all(np.isfinite(probs[True]))
  np.testing.assert_allclose(probs[True], probs[False], atol=1e-4)
  cocoop = dataclasses.replace(run, learner=make_learner("cocoop", run.clip_config, n_ctx=2))
  assert not cocoop.learner.shares_text_features


def test_calibrate_prompts_binary_scores_a_trained_run(trained_coop, tmp_path, capsys, monkeypatch):
  """`experiments.calibrate_prompts --runlocal` on a trained CoOp run, with the low-rank shared-text Laplace:
  a table row per posterior, per-run JSON (λ, subspace rank) and reliability PNGs in the smoke directory, and
  "none" equal to the run's own test metrics."""
  from tests.test_prompt_run import run_binary

  monkeypatch.chdir(tmp_path)
  run_binary("experiments.calibrate_prompts", "--runlocal", f"--run_dirs={trained_coop}",
             "--posterior=none,laplace", "--laplace_rank=1", "--laplace_samples=4", "--max_eval_examples=48",
             "--scores_dir=runs/real", "--noprogress")
  out = capsys.readouterr().out
  assert "| learner / posterior |" in out and "| coop+ce / none |" in out and "| coop+ce / laplace |" in out, out
  assert "| average |" not in out, out
  root = tmp_path / out.splitlines()[0].split(" -> ")[1]
  assert not (tmp_path / "runs" / "real").exists()
  scored = json.loads((root / "coop_ce_seed3" / "posterior_results.json").read_text())
  assert scored["laplace"]["subspace_rank"] == 1 and 0 < scored["laplace"]["subspace_captured"] <= 1
  assert scored["laplace"]["prior_precision"] > 0
  stored = json.loads((trained_coop / "results.json").read_text())["results"]
  for split in ("base", "new"):
    np.testing.assert_allclose(scored["results"][split]["none"]["accuracy"], stored[split]["accuracy"], atol=1e-6)
    assert np.isfinite(scored["results"][split]["laplace"]["nll"])
  assert list((root / "coop_ce_seed3").glob("reliability_*.png"))


def test_calibrate_prompts_binary_names_bad_run_dirs(tmp_path, monkeypatch):
  from bayesprompt.errors import UserError
  from tests.test_prompt_run import run_binary

  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match="--run_dirs is empty"):
    run_binary("experiments.calibrate_prompts", "--runlocal", "--posterior=none")
  with pytest.raises(UserError, match="/nonexistent/run is not a trained run directory"):
    run_binary("experiments.calibrate_prompts", "--runlocal", "--run_dirs=/nonexistent/run", "--posterior=none")


@pytest.mark.parametrize("method", [m for m in methods() if m not in ("coop", "vamp")])  # both tested above
def test_every_learner_is_scored_with_the_laplace(trained_coop, method):
  """The scorer on each registered learner (tiny CLIP, initial params): the Laplace the scorer picks fits with
  a finite evidence and its predictive gives probabilities. Learners whose image side is frozen read cached
  features, the others images ("none" is each learner's own predict step, tested with the learners)."""
  base = prompt_run.load_trained(trained_coop)
  kwargs = {"num_test_samples": 2} if "num_test_samples" in make_learner(method, base.clip_config).__dict__ else {}
  learner = make_learner(method, base.clip_config, **kwargs)
  data = prompt_run.protocol_data(base.cfg)
  train = data.train.select(np.arange(8))
  prototypes = None
  if learner.needs_class_prototypes:
    prototypes = prompt_run.class_prototypes(base.clip_params, base.clip_config, data.train, 64)
  class_state = learner.prepare_classes(base.clip_params, train.classnames, templates=[train.template],
                                        class_prototypes=prototypes, train_classnames=train.classnames)
  params = learner.init(jax.random.key(0), base.clip_params, class_state)
  run = dataclasses.replace(base, learner=learner, params=params)
  scorer = posterior_lib.PosteriorScorer(run, posteriors=("laplace",), laplace_samples=2, batch_size=8,
                                         max_full_params=1024)
  info = scorer.fit_laplace(train)
  assert np.isfinite(info["log_marginal_likelihood"]), info
  # full GGN: one λ; diagonal: one λ per parameter leaf (the scorer's default)
  lams = info["prior_precision"] if info["kind"] == "full" else list(info["prior_precision"].values())
  assert np.all(np.isfinite(lams)) and np.all(np.asarray(lams) > 0), info
  if info["kind"] == "diag":
    assert list(info["prior_precision"]) == posterior_lib.prompt_laplace.leaf_groups(params)[1]
  split = data.evals["new"]
  images, _ = posterior_lib.load_split(split, run.clip_config.vision.image_size)
  for name, probs in scorer.probabilities(split, images[:2]).items():
    assert np.all(np.isfinite(probs)), name
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5, err_msg=name)


def _write_scores(root, learner, seed, results, laplace=None):
  folder = root / f"{learner}_seed{seed}"
  folder.mkdir(parents=True)
  (folder / "posterior_results.json").write_text(json.dumps(
      {"run_dir": "x", "laplace": laplace or {}, "timings": {}, "results": results}))


def _metrics(rng):
  return {"accuracy": float(rng.uniform()), "nll": float(rng.uniform(0, 3)), "ece": float(rng.uniform(0, 0.3)),
          "brier": 0.5, "num_examples": 10}


def test_posterior_table_is_the_mean_and_std_over_seeds_with_later_dirs_overriding(tmp_path, capsys,
                                                                                 monkeypatch):
  """experiments.posterior_table against NumPy on synthetic scores: per seed the shifted cell is the mean over
  the splits other than base/new, cells are mean ± sample std over the seeds that have them, and a later
  --scores_dirs entry replaces only the (learner, seed, split, posterior) it holds."""
  from bayesprompt.errors import UserError
  from tests.test_prompt_run import run_binary

  rng = np.random.default_rng(0)
  splits = ("base", "new", "shift_a", "shift_b")
  old = {seed: {s: {p: _metrics(rng) for p in ("none", "laplace")} for s in splits} for seed in (1, 2, 3)}
  for seed in (1, 2, 3):
    _write_scores(tmp_path / "old", "vamp_ce", seed, old[seed], {"prior_precision": 0.5})
  new = {seed: {s: {"laplace": _metrics(rng)} for s in ("base", "new")} for seed in (1, 2)}
  for seed in (1, 2):
    _write_scores(tmp_path / "new", "vamp_ce", seed, new[seed])
  scores = posterior_lib.collect_scores([tmp_path / "old", tmp_path / "new"])
  rows = {row["posterior"]: row for row in posterior_lib.summary_rows(scores)}
  assert set(rows) == {"none", "laplace"}

  def expected(posterior, group, metric):
    values = []
    for seed in (1, 2, 3):
      source = new[seed] if posterior == "laplace" and seed in new and group != "shifted" else old[seed]
      names = [group] if group != "shifted" else ["shift_a", "shift_b"]
      values.append(np.mean([source[s][posterior][metric] for s in names]))
    return np.asarray(values)

  for posterior, row in rows.items():
    for group in ("base", "new", "shifted"):
      for metric in ("accuracy", "nll", "ece"):
        cell = row["cells"][group][metric]
        want = expected(posterior, group, metric)
        np.testing.assert_allclose(cell["values"], want, rtol=1e-12)
        np.testing.assert_allclose([cell["mean"], cell["std"]], [np.mean(want), np.std(want, ddof=1)], rtol=1e-12)
  assert rows["laplace"]["cells"]["shifted"]["splits"] == [2]

  monkeypatch.chdir(tmp_path)
  run_binary("experiments.posterior_table", f"--scores_dirs={tmp_path / 'old'},{tmp_path / 'new'}",
             "--groups=base,new", "--out=table/vamp")
  out = capsys.readouterr().out
  acc = expected("laplace", "base", "accuracy")
  assert f"| vamp_ce | laplace | 3: {100 * np.mean(acc):.1f}±{100 * np.std(acc, ddof=1):.1f} / " in out, out
  assert "shifted" not in out and (tmp_path / "table" / "vamp.md").read_text().strip() == out.strip()
  with pytest.raises(UserError, match="no posterior_results.json"):
    run_binary("experiments.posterior_table", f"--scores_dirs={tmp_path / 'missing'}")
  with pytest.raises(UserError, match="--scores_dirs is empty"):
    run_binary("experiments.posterior_table")
  with pytest.raises(UserError, match="groups"):
    posterior_lib.summary_rows(scores, ["base", "held_out"])
