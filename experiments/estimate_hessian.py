r"""KFAC-GGN factors of a CLIP's image and text projections from image–caption pairs (BayesVLM).

  python -m experiments.estimate_hessian --flagfile=experiments/flags/estimate_hessian_sandbox.flags
  python -m experiments.estimate_hessian --flagfile=experiments/flags/estimate_hessian_real.flags \
      --checkpoint=PATH --data_dir=DIR

Writes into --output_dir:
  factors/              orbax checkpoint of {"img", "txt"}: A [p, p], B [q, q], N (laplace.save_factors), whose
                        info holds the fitted prior precisions (lambda_img, lambda_txt at n_img, n_txt)
  prior_precision.json  the same numbers, readable
  partial/step_<k>/     running sums after k class batches (an interrupted run resumes from there)
  config.json, git.json, metrics.jsonl   (bayesprompt.train.run_dir)
The binary only wires flags: the work is bayesprompt.bayesvlm.factors.run_estimate
(bayesprompt.bayesvlm.hessian.estimate_pair_factors).

Data parallel with no flag: with more than one device (or process) the forward batches are split over
all of them and the per-device KFAC sums all-reduced (the same factors as one device, up to float
rounding). The mesh flags are the prompt binaries' (experiments.common): --mesh_data=1 forces one device;
multi-host runs add --coordinator_address/--num_processes/--process_id (or --multi_host), each process
reads its own share of the pairs, and only process 0 writes files.
"""

from __future__ import annotations

import os

from absl import flags, logging

from experiments import bayesvlm_flags, common

FLAGS = flags.FLAGS
bayesvlm_flags.define_hessian_flags()
flags.DEFINE_string("output_dir", None, "Output directory (default runs/estimate_hessian/<time>); an "
                    "interrupted run given the same one resumes from its partial/ sums.")


def main(argv):
  del argv
  from bayesprompt.bayesvlm import factors
  from bayesprompt.train.run_dir import resolve_run_dir, timestamp

  mesh = common.mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  output_dir = resolve_run_dir(FLAGS.output_dir, runlocal=FLAGS.runlocal, name="estimate_hessian",
                               default=os.path.join("runs", "estimate_hessian", timestamp()))
  logging.info("estimating KFAC factors -> %s (%s)", output_dir,
               "one device" if mesh is None else f"data-parallel over {dict(mesh.shape)}")
  factors.run_estimate(bayesvlm_flags.hessian_config(), output_dir, mesh=mesh)


if __name__ == "__main__":
  common.run_binary(main)
