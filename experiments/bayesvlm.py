r"""BayesVLM zero-shot: MAP CLIP vs the Laplace posterior over both projections (ProbCosine + probit).

  python -m experiments.bayesvlm --flagfile=experiments/flags/bayesvlm_sandbox.flags
  python -m experiments.bayesvlm --flagfile=experiments/flags/bayesvlm_real.flags --checkpoint=PATH \
      --data_dir=DIR --factors_dir=runs/estimate_hessian/laion_b32

For every --dataset (registry name, its --eval_split): accuracy, NLPD, ECE (20 bins) and Brier of the
deterministic model ("map") and of BayesVLM ("bayesvlm"), a reliability-diagram PNG per dataset and
results.{md,csv,json}. Factors come from --factors_dir (the output of experiments.estimate_hessian) or are
estimated on the fly with the estimate_hessian flags (--captions, --num_pairs, --class_batch_size, ...).
λ: --prior_precision=fit (Laplace evidence at --pseudo_data_count), =stored (the factors' fitted value),
or a positive number. Image features are cached in --feature_cache_dir (resumable chunks).
With more than one device (the mesh flags of experiments.common) factors estimated here run
data-parallel (see experiments.estimate_hessian); only process 0 writes files.
"""

from __future__ import annotations

from absl import flags

from experiments import bayesvlm_flags, common

FLAGS = flags.FLAGS
bayesvlm_flags.define_zeroshot_flags()


def main(argv):
  del argv
  from bayesprompt.bayesvlm import zeroshot

  mesh = common.mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  zeroshot.run_zero_shot(bayesvlm_flags.zeroshot_config(), bayesvlm_flags.checked_run_dir("bayesvlm"), mesh=mesh)


if __name__ == "__main__":
  common.run_binary(main)
