r"""Plot a hyper-parameter sweep from finished run directories: base, new and HM accuracy against the value.

  python -m experiments.plot_sweep --xlabel="λ₁ (teacher_weight)" \
      --points=0.0:runs/cat/lambda1_0.0,0.2:runs/cat/ove_pg,0.4:runs/cat/lambda1_0.4 \
      --variant_contains=ove_pg,mode=corrected --zero_shot_run=runs/zs_catalogue \
      --out=experiments/figures/ove_pg_lambda1_catalogue.png

Each point is `value:run_dir` (the run_dir of experiments.ove_pg / prompt_learning: its results.json table);
in a table with several rows, the one row whose name contains --variant_contains. Prints the sweep as a
markdown table and writes the PNG (mean ± std over seeds; the zero-shot HM as a dashed line when
--zero_shot_run is given). The library side is bayesprompt.eval.sweep.
"""

from __future__ import annotations

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_list("points", [], "value:run_dir pairs, in the order to plot.")
flags.DEFINE_string("variant_contains", None, "Pick the table row whose name contains this (None: the only "
                    "row).")
flags.DEFINE_string("zero_shot_run", None, "A zero-shot run directory (experiments.zeroshot) for a baseline.")
flags.DEFINE_string("xlabel", "value", "x-axis label.")
flags.DEFINE_string("title", "", "Figure title.")
flags.DEFINE_string("out", None, "The PNG to write.", required=True)


def main(argv):
  del argv
  from bayesprompt.eval import sweep

  table = sweep.plot_sweep(FLAGS.points, FLAGS.out, variant_contains=FLAGS.variant_contains,
                           zero_shot_run=FLAGS.zero_shot_run, xlabel=FLAGS.xlabel, title=FLAGS.title)
  print(table)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  common.run_binary(main)
