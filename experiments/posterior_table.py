r"""The table over runs scored by experiments.calibrate_prompts: per learner and posterior, accuracy / NLL /
ECE on base, new and the shifted splits (each seed's mean over them), mean ± sample std over seeds.

  python -m experiments.posterior_table --scores_dirs=runs/calib_cat/scores/coop_ce,runs/calib_cat/scores/vpt

Every posterior_results.json under --scores_dirs counts (folders <learner>_seed<k>); a later directory's
metrics for the same learner, seed, split and posterior replace an earlier one's, so a posterior re-scored
over older runs (`calibrate_prompts --posterior=laplace`) is listed after them. --groups picks the columns.
Library: bayesprompt.bayesvlm.prompt_posterior.{collect_scores, summary_rows, summary_markdown}.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_list("scores_dirs", [], "--scores_dir folders of experiments.calibrate_prompts, in override "
                  "order.")
flags.DEFINE_list("groups", ["base", "new", "shifted"], "Columns: base, new, shifted.")
flags.DEFINE_string("out", None, "Also write the table (.md) and its rows (.json, per-seed values) here.")


def main(argv):
  del argv
  from bayesprompt.bayesvlm import prompt_posterior
  from bayesprompt.errors import UserError

  if not FLAGS.scores_dirs:
    raise UserError("--scores_dirs is empty: name at least one --scores_dir of experiments.calibrate_prompts")
  rows = prompt_posterior.summary_rows(prompt_posterior.collect_scores(FLAGS.scores_dirs), FLAGS.groups)
  table = prompt_posterior.summary_markdown(rows, FLAGS.groups)
  print(table)
  if FLAGS.out:
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  common.run_binary(main)
