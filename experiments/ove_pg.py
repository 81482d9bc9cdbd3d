r"""OVE-PG vs cross-entropy: train a prompt learner both ways and compare base / new / HM (+ shifted variants).

The project's main job:

  python -m experiments.ove_pg --flagfile=experiments/flags/ove_pg_sandbox.flags

runs two regimes (--regimes: sandbox_shapes, the misleading prior, and sandbox_catalogue, the papers' regime)
and in each trains each method in --methods with CE and with the one-vs-each Pólya-Gamma objective (arXiv
2504.14123) in each mode of --ove_modes ("corrected": exact PG moments, κ = +½; "faithful": the official
code's behaviour), for every seed, evaluates on the protocol's test splits and prints one table per regime
(a zero-shot row, then mean ± std over seeds) with a sentence read off it; results.json in --run_dir holds
every regime.
Without --regimes: --dataset alone, one table, no zero-shot row. Objective options (prior_precision,
teacher_weight, num_samples, omega_source) go in --objective_hparams as key=value.
"""

from __future__ import annotations

from absl import flags

from bayesprompt import prompts
from experiments import common

FLAGS = flags.FLAGS
common.define_prompt_flags(single_variant=False)  # the variants come from --methods / --ove_modes / --with_ce
flags.DEFINE_list("methods", ["coop"], f"Prompt learners to compare, any of: {', '.join(prompts.methods())}.")
flags.DEFINE_list("ove_modes", ["corrected", "faithful"], "OVE-PG modes to run besides CE.")
flags.DEFINE_bool("with_ce", True, "Also train each method with cross-entropy (the baseline row).")
flags.DEFINE_list("regimes", [], "Base-to-new datasets to run in turn, one table each with a zero-shot row "
                  "(--extra_eval_datasets apply to --dataset's); empty: --dataset alone, no zero-shot row.")


def main(argv):
  del argv
  shared = common.objective_kwargs_from_flags()
  variants = []
  for method in FLAGS.methods:
    if FLAGS.with_ce:
      variants.append((method, "ce", {}))
    for mode in FLAGS.ove_modes:
      variants.append((method, "ove_pg", {**shared, "mode": mode}))
  if FLAGS.regimes:
    from bayesprompt.data.sandbox import REGIMES

    common.run_regimes(variants, FLAGS.regimes, title=f"CE vs OVE-PG ({FLAGS.protocol})",
                       descriptions=REGIMES)
  else:
    common.run_variants(variants, title=f"CE vs OVE-PG ({FLAGS.protocol}, {FLAGS.dataset})")


if __name__ == "__main__":
  common.run_binary(main)
