r"""Score trained prompt-learning runs with a post-hoc posterior: none, a Laplace over the learned prompt, or
BayesVLM's projection Laplace with the learner's text features (issue 18).

  python -m experiments.estimate_hessian --flagfile=experiments/flags/estimate_hessian_sandbox.flags
  python -m experiments.calibrate_prompts --flagfile=experiments/flags/calibrate_prompts_sandbox.flags \
      --run_dirs=runs/calib/coop/coop_ce/seed1,runs/calib/coop/coop_ce/seed2 --scores_dir=runs/calib/tables/coop_ce

For every run directory (a `prompt_learning` / `ove_pg` seed directory) and every --posterior: accuracy, NLL,
ECE and Brier on the run's protocol splits (base / new) and on --extra_eval_datasets (their base / new),
reliability diagrams (PNG, one panel per posterior) per split, and results.{md,csv,json} over the runs
(mean ± std; rows "<method>+<objective> | <posterior>"). The Laplace's λ is fitted by marginal likelihood on
the run's training split; its kind per learner: --laplace_kind=auto gives "full" up to --max_full_params
trainable parameters (CoOp, VPT), else "diag" (VaMP, MaPLe, ...). BayesVLM flags (--factors_dir,
--pseudo_data_count, --prior_precision, --evidence_mode) are those of experiments.bayesvlm.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging

from experiments import bayesvlm

FLAGS = flags.FLAGS
flags.DEFINE_list("run_dirs", [], "Trained run directories (each with checkpoints/ and train_classes.json).")
flags.DEFINE_list("posterior", ["none", "laplace", "bayesvlm"], "Posteriors to score: none, laplace, bayesvlm.")
flags.DEFINE_list("extra_eval_datasets", [], "More test sets under the run's protocol (e.g. the shifts).")
flags.DEFINE_enum("laplace_kind", "auto", ["auto", "full", "diag"], "GGN of the prompt Laplace.")
flags.DEFINE_integer("max_full_params", 4096, "--laplace_kind=auto: full GGN up to this many parameters.")
flags.DEFINE_enum("laplace_predictive", "mc", ["probit", "mc"], "Linearised predictive of the prompt Laplace.")
flags.DEFINE_integer("laplace_samples", 32, "jvp samples of the linearised predictive.")
flags.DEFINE_bool("laplace_jacobian", False, "Deterministic learners: exact logit covariance from the Jacobian "
                  "(P forward tangents) instead of --laplace_samples jvp samples.")
flags.DEFINE_integer("max_eval_examples", None, "Score a fixed random subset of each split.")
flags.DEFINE_string("scores_dir", None, "Where results and PNGs go (default runs/calibrate_prompts/<time>).")


def scorer_for(run, posteriors, run_dir: pathlib.Path):
  """The run's PosteriorScorer (BayesVLM posteriors built from --factors_dir when asked for)."""
  from bayesprompt import clip
  from bayesprompt.bayes import features as features_lib
  from bayesprompt.eval import posterior as posterior_lib

  towers = None
  if "bayesvlm" in posteriors:
    cfg = bayesvlm.config_from_flags()
    tokenizer = clip.get_tokenizer(run.clip_config)
    towers, lams, _, _ = bayesvlm.posteriors(cfg, run.clip_config, run.clip_params, tokenizer, run_dir,
                                             features_lib.params_fingerprint(run.clip_params))
    logging.info("BayesVLM λ: %s", lams)
  return posterior_lib.PosteriorScorer(
      run, posteriors=posteriors, laplace_kind=FLAGS.laplace_kind, max_full_params=FLAGS.max_full_params,
      laplace_predictive=FLAGS.laplace_predictive, laplace_samples=FLAGS.laplace_samples,
      laplace_jacobian=FLAGS.laplace_jacobian, bayesvlm_posteriors=towers, bayesvlm_predictive=FLAGS.predictive,
      batch_size=FLAGS.eval_batch_size)


def score_run(run_dir: str, output_dir: pathlib.Path, posteriors) -> dict:
  from bayesprompt.train import prompt_run

  run = prompt_run.load_trained(run_dir)
  name = f"{run.cfg.method}+{run.cfg.objective}"
  png_dir = output_dir / f"{name.replace('+', '_')}_seed{run.cfg.seed}"
  png_dir.mkdir(parents=True, exist_ok=True)
  scorer = scorer_for(run, posteriors, png_dir)
  data = prompt_run.protocol_data(run.cfg)
  info = scorer.fit_laplace(data.train) if "laplace" in posteriors else {}
  splits = prompt_run.evaluation_splits(run.cfg, data, FLAGS.extra_eval_datasets)
  results = scorer.score_splits(splits, max_examples=FLAGS.max_eval_examples, png_dir=png_dir)
  summary = {"run_dir": str(run_dir), "laplace": info, "timings": scorer.timings, "results": results}
  (png_dir / "posterior_results.json").write_text(json.dumps(summary, indent=1))
  print(f"{name} seed {run.cfg.seed}: laplace {info}  timings {scorer.timings}")
  return {"name": name, "seed": run.cfg.seed, **summary}


def main(argv):
  del argv
  from bayesprompt.eval import posterior as posterior_lib
  from bayesprompt.eval.results import ResultsWriter
  from bayesprompt.train.run_dir import timestamp

  if not FLAGS.run_dirs:
    raise ValueError("--run_dirs is empty: name at least one trained run directory")
  posteriors = posterior_lib.check_posteriors(FLAGS.posterior)
  output_dir = pathlib.Path(FLAGS.scores_dir or f"runs/calibrate_prompts/{timestamp()}")
  writer = ResultsWriter(output_dir, title="Post-hoc posteriors for prompt learners")
  for run_dir in FLAGS.run_dirs:
    scored = score_run(run_dir, output_dir, posteriors)
    for split, per_posterior in scored["results"].items():
      for post, metrics in per_posterior.items():
        writer.add(f"{scored['name']} | {post}", scored["seed"],
                   {k: v for k, v in metrics.items() if k != "num_examples"}, split=split)
  paths = writer.write()
  print(writer.markdown())
  print(f"results: {json.dumps(paths)}")


if __name__ == "__main__":
  app.run(main)
