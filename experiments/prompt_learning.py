r"""Train and evaluate a prompt learner under one of the field's protocols.

  python -m experiments.prompt_learning --flagfile=experiments/flags/coop_sandbox.flags
  python -m experiments.prompt_learning --method=maple --protocol=base2new --dataset=oxford_pets \
      --checkpoint=/path/to/ViT-B-16 --data_dir=~/tensorflow_datasets --seeds=1,2,3
  python -m experiments.prompt_learning --eval_only --dataset=dtd --protocol=few_shot \
      --run_dir=runs/base2new_sandbox_shapes_<digest>/coop_ce/seed1   # one seed's directory, as printed
  python -m experiments.prompt_learning --method=coop --protocol=few_shot --num_shots=16 \
      --dataset=oxford_pets --source=folder --data_dir=$DATA   # CoOp's split files and few-shot images

Learner hyper-parameters go in --hparams as key=value pairs (e.g. --hparams=n_ctx=4 --hparams=ctx_init="a photo of
a"); objective options in --objective_hparams likewise.
"""

from __future__ import annotations

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_prompt_flags()
flags.DEFINE_bool("eval_only", False, "Evaluate one trained seed on --dataset/--protocol (no training): --run_dir "
                  "must be that seed's directory, <run_dir>/<variant>/seed<N>, as the training run prints.")


def main(argv):
  del argv
  if FLAGS.eval_only:
    results = common.evaluate_run_dir(FLAGS.run_dir, dataset=FLAGS.dataset, protocol=FLAGS.protocol,
                                      data_dir=FLAGS.data_dir, max_eval_examples=FLAGS.max_eval_examples,
                                      source=FLAGS.source)
    print(json.dumps(results, indent=1))
    return
  variants = [(FLAGS.method, FLAGS.objective, common.objective_kwargs_from_flags())]
  common.run_variants(variants, title=f"{FLAGS.method} ({FLAGS.protocol}, {FLAGS.dataset})")


if __name__ == "__main__":
  common.run_binary(main)
