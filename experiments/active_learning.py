r"""BayesVLM active learning: label pool images chosen for a target domain, fine-tune the image projection.

  python -m experiments.active_learning --flagfile=experiments/flags/active_learning_sandbox.flags
  python -m experiments.active_learning --flagfile=experiments/flags/active_learning_offtarget_sandbox.flags
  python -m experiments.active_learning --flagfile=experiments/flags/active_learning_real.flags \
      --checkpoint=PATH --data_dir=DIR --factors_dir=runs/estimate_hessian/laion_b32

Pool = --pool_dataset/--pool_split (labels revealed only when selected), or a mix of splits (--pool_sources,
bayesprompt.data.pool: e.g. mostly other domains and classes than the target's; images of classes outside the
target's label set cost budget and add no label); target domain = --target_dataset/--target_split (its
--target_classes), cut (seeded, fixed across seeds) into unlabelled targets (--target_fraction; used by EPIG and
targeted selection) and the evaluation set. For every acquisition in --acquisitions and seed in --seeds,
one ordered selection of max(--budgets) points is made (bayesprompt.bayesvlm.active.select: direct or
targeted kNN, offline or --rounds online rounds with rank-one KFAC updates); for every budget b the image
projection is fine-tuned on the first b points (AdamW, --finetune_lr 1e-5, --finetune_weight_decay 5e-2) and
evaluated (MAP and BayesVLM: accuracy, NLPD, ECE; the share of on-target picks). Writes results.{md,csv,json},
curves.md, curves.png, on_target.png, selections.json, pool.json into --run_dir. Shares experiments.bayesvlm's
flags for factors, λ and caches (experiments/bayesvlm_flags.py); the loop is bayesprompt.bayesvlm.active_learning.
With more than one device (the mesh flags of experiments.common; --mesh_data=1 forces one) EPIG is scored
with the pool split over the devices and factors estimated here run data-parallel; only process 0 writes.
"""

from __future__ import annotations

import json

from absl import flags, logging

from experiments import bayesvlm_flags, common

FLAGS = flags.FLAGS
bayesvlm_flags.define_active_flags()


def main(argv):
  del argv
  from bayesprompt.bayesvlm import active_learning

  mesh = common.mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  out = active_learning.run_active_learning(bayesvlm_flags.active_config(),
                                            bayesvlm_flags.checked_run_dir("active_learning"), mesh=mesh)
  logging.info("done: %s", json.dumps({"zero_shot": out["zero_shot"]}))


if __name__ == "__main__":
  common.run_binary(main)
