r"""Score trained prompt-learning runs with a post-hoc posterior: none, a Laplace over the learned prompt, or
BayesVLM's projection Laplace with the learner's text features (issue 18).

  python -m experiments.calibrate_prompts --flagfile=experiments/flags/calibrate_prompts_sandbox.flags \
      --run_dirs=runs/calib/coop/coop_ce/seed1,runs/calib/coop/coop_ce/seed2 --scores_dir=runs/calib/scores/coop_ce

For every run directory and every --posterior: accuracy, NLL, ECE and Brier on the run's protocol splits and
on --extra_eval_datasets, reliability PNGs per split, results.{md,csv,json} over the runs. The Laplace's λ is
fitted by marginal likelihood on the run's training split; --laplace_kind=auto: "full" up to
--max_full_params trainable parameters (CoOp, VPT), else "diag" (VaMP, MaPLe, ...). BayesVLM flags
(--factors_dir, --pseudo_data_count, --prior_precision, --evidence_mode, --predictive) are experiments.bayesvlm's.
Library: bayesprompt.bayesvlm.prompt_posterior.score_runs.
"""

from __future__ import annotations

import pathlib

from absl import flags

from experiments import bayesvlm_flags, common

FLAGS = flags.FLAGS
bayesvlm_flags.define_zeroshot_flags()
flags.DEFINE_list("run_dirs", [], "Trained run directories (each with checkpoints/ and train_classes.json).")
flags.DEFINE_list("posterior", ["none", "laplace", "bayesvlm"], "Posteriors to score: none, laplace, bayesvlm.")
flags.DEFINE_list("extra_eval_datasets", [], "More test sets under the run's protocol (e.g. the shifts).")
flags.DEFINE_enum("laplace_kind", "auto", ["auto", "full", "diag"], "GGN of the prompt Laplace.")
flags.DEFINE_integer("max_full_params", 4096, "--laplace_kind=auto: full GGN up to this many parameters.")
flags.DEFINE_integer("laplace_rank", 8, "Learners whose text features are shared by all images (CoOp): the full "
                     "GGN along each class's top-r image-feature directions (r vjps per class instead of D: 0.9 "
                     "of a training epoch at r = 8 on the sandbox, against 3.2 exact; benchmarks/RESULTS.md). 0: "
                     "the exact GGN.", lower_bound=0)
flags.DEFINE_enum("laplace_prior_groups", "leaves", ["one", "leaves"], "Prior of the diagonal Laplace (VaMP, "
                  "MaPLe, ...): one λ per parameter leaf, or one λ for all, each by marginal likelihood (sandbox "
                  "VaMP, seed 1: log evidence −631 per leaf against −2326 with one λ, base accuracy 60.0 against "
                  "52.7). The full GGN fits one λ.")
flags.DEFINE_enum("laplace_predictive", "mc", ["probit", "mc"], "Linearised predictive of the prompt Laplace.")
flags.DEFINE_integer("laplace_samples", 32, "jvp samples of the linearised predictive.")
flags.DEFINE_bool("laplace_jacobian", False, "Deterministic learners: exact logit covariance from the Jacobian "
                  "(P forward tangents) instead of --laplace_samples jvp samples.")
flags.DEFINE_integer("max_eval_examples", None, "Score a fixed random subset of each split.")
flags.DEFINE_string("scores_dir", None, "Where results and PNGs go (default runs/calibrate_prompts/<time>).")


def main(argv):
  del argv
  from bayesprompt.bayesvlm import prompt_posterior
  from bayesprompt.errors import UserError
  from bayesprompt.train import run_dir as run_dir_lib

  if not FLAGS.run_dirs:
    raise UserError("--run_dirs is empty: name at least one trained run directory (written by "
                    "experiments.prompt_learning or experiments.ove_pg)")
  missing = [d for d in FLAGS.run_dirs if not (pathlib.Path(d) / "train_classes.json").is_file()]
  if missing:
    raise UserError(f"--run_dirs: {', '.join(missing)} is not a trained run directory (expected "
                    "train_classes.json and checkpoints/ in it)")
  scores_dir = run_dir_lib.resolve_run_dir(FLAGS.scores_dir, runlocal=FLAGS.runlocal, name="calibrate_prompts",
                                           default=f"runs/calibrate_prompts/{run_dir_lib.timestamp()}")
  run_dir_lib.check_fresh(scores_dir, resume=False, overwrite=FLAGS.overwrite)
  print(f"{len(FLAGS.run_dirs)} run(s) x posteriors {','.join(FLAGS.posterior)} -> {scores_dir}", flush=True)
  prompt_posterior.score_runs(
      FLAGS.run_dirs, scores_dir, FLAGS.posterior,
      bayesvlm_flags.zeroshot_config(), extra_eval_datasets=FLAGS.extra_eval_datasets,
      max_eval_examples=FLAGS.max_eval_examples, laplace_kind=FLAGS.laplace_kind,
      max_full_params=FLAGS.max_full_params, laplace_predictive=FLAGS.laplace_predictive,
      laplace_samples=FLAGS.laplace_samples, laplace_jacobian=FLAGS.laplace_jacobian,
      laplace_rank=FLAGS.laplace_rank or None, laplace_prior_groups=FLAGS.laplace_prior_groups,
      batch_size=FLAGS.eval_batch_size)


if __name__ == "__main__":
  common.run_binary(main)
