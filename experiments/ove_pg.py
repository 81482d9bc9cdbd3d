r"""OVE-PG vs cross-entropy: train a prompt learner both ways and compare base / new / HM (+ shifted variants).

The project's main job:

  python -m experiments.ove_pg --flagfile=experiments/flags/ove_pg_sandbox.flags

trains each method in --methods with CE and with the one-vs-each Pólya-Gamma objective (arXiv 2504.14123) in
each mode of --ove_modes ("corrected": exact PG moments, κ = +½; "faithful": the official code's behaviour), for
every seed, evaluates on the protocol's test splits and prints one table (mean ± std over seeds), also written as
results.{md,csv,json} in --run_dir. Objective options (prior_precision, teacher_weight, num_samples,
omega_source) go in --objective_hparams as key=value.
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


def main(argv):
  del argv
  shared = common.objective_kwargs_from_flags()
  variants = []
  for method in FLAGS.methods:
    if FLAGS.with_ce:
      variants.append((method, "ce", {}))
    for mode in FLAGS.ove_modes:
      variants.append((method, "ove_pg", {**shared, "mode": mode}))
  common.run_variants(variants, title=f"CE vs OVE-PG ({FLAGS.protocol}, {FLAGS.dataset})")


if __name__ == "__main__":
  common.run_binary(main)
