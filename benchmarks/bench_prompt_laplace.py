r"""Cost of the post-hoc prompt Laplace (issue 18) against the learner's own work, measured in the same run.

  PYTHONPATH=. python benchmarks/bench_prompt_laplace.py --method=coop --runs=3
  PYTHONPATH=. python benchmarks/bench_prompt_laplace.py --method=vamp --runs=3

On the sandbox CLIP and the sandbox base-to-new task (32 base classes x 16 shots = 512 training images):
* fit: frozen image features of the 512 training images (learners that leave the image tower frozen) + GGN
  (full for CoOp / VPT, sampled-label diagonal for VaMP) + λ by marginal likelihood, vs one training epoch;
  "generic": Jacobians of the logits per batch (`prompt_laplace.fit`); "shared text" (learners with
  `shares_text_features`, CoOp): the text Jacobian once per class list (`prompt_laplace.fit_shared_text`);
  (512 / batch steps of the jitted train step on preloaded images, the learner's sandbox batch size);
* predictive: the linearised predictive over the 1600 base test images (MC with --samples jvps; for
  shared-text learners also from the text Jacobian: MC with exact joint draws, and probit), vs the
  deterministic evaluation (the jitted predict step over the same images, batches of 256).
Both sides use preloaded arrays (no input pipeline). Rounds interleave the candidates; the table reports the
median wall time and process CPU time (all threads) per candidate, their ratios, and the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import bayesprompt.clip as clip
from bayesprompt.bayes import prompt_laplace
from bayesprompt.bayesvlm import prompt_posterior as posterior_lib
from bayesprompt.data import protocols
from bayesprompt.objectives import make_objective
from bayesprompt.prompts import make_learner
from bayesprompt.train import optim, prompt_run, prompt_trainer

RECIPES = {  # the sandbox flagfiles' learner and batch size
    "coop": ({"n_ctx": 4, "ctx_init": "a photo of a"}, 32),
    "vpt": ({}, 4),
    "vamp": ({}, 4),
}


def timed(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - wall, time.process_time() - cpu


def report_rank_error(scorer, eval_state, params, test_images, fit_shared, ranks):
  """What the low-rank fit changes: G (relative Frobenius error), λ, the evidence, and the linearised
  predictive on the test images (mean |Δp|, max |Δp|, KL(exact || low rank), top-1 agreement), with the
  scorer's default predictive (MC jvp samples, same key) on both sides."""
  def predictive(posterior, seed=0):
    scorer.laplace, scorer.laplace_jacobian, scorer.laplace_predictive = posterior, False, "mc"
    return np.asarray(scorer._laplace_probs(eval_state, scorer.inputs(test_images), jax.random.key(seed)),
                      np.float64)

  def row(name, ggn_error, lam, probs):
    kl = np.mean(np.sum(exact_probs * (np.log(exact_probs + 1e-12) - np.log(probs + 1e-12)), axis=-1))
    print(f"| {name} | {ggn_error} | {float(exact.prior_precision):.3g} / {lam} | "
          f"{np.mean(np.abs(probs - exact_probs)):.2e} | {np.max(np.abs(probs - exact_probs)):.2e} | {kl:.2e} | "
          f"{np.mean(probs.argmax(-1) == exact_probs.argmax(-1)):.4f} |")

  exact = fit_shared()()
  exact_ggn = np.asarray((exact.ggn_eigvecs * exact.ggn_eigvals) @ exact.ggn_eigvecs.T, np.float64)
  exact_probs = predictive(exact)
  print("| rank | rel. Frobenius error of G | λ exact / low rank | mean abs Δp | max abs Δp | KL(exact‖r) | "
        "top-1 agreement |\n|---|---|---|---|---|---|---|")
  # The Monte Carlo floor: the exact posterior's predictive with another key.
  row("exact, other MC key", "0", f"{float(exact.prior_precision):.3g}", predictive(exact, seed=1))
  for rank in ranks:
    low = fit_shared(rank)()
    ggn = np.asarray((low.ggn_eigvecs * low.ggn_eigvals) @ low.ggn_eigvecs.T, np.float64)
    row(str(rank), f"{np.linalg.norm(ggn - exact_ggn) / np.linalg.norm(exact_ggn):.4f}",
        f"{float(low.prior_precision):.3g}", predictive(low))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="coop", choices=sorted(RECIPES))
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--samples", type=int, default=32, help="jvp samples of the linearised predictive")
  parser.add_argument("--parts", default="fit,predictive", help="what to time against the learner's own work: "
                      "fit (vs a train epoch), predictive (vs a deterministic evaluation), or both")
  parser.add_argument("--diag_chunk", type=int, default=None, help="examples per batch of per-example gradients "
                      "of the diagonal GGN (default: the scorer's)")
  parser.add_argument("--ranks", default="8,16", help="shared-text learners: low-rank fits to time (r vjps per "
                      "class) and to compare with the exact fit")
  args = parser.parse_args()

  clip_config, clip_params = clip.load_checkpoint("sandbox")
  hparams, batch = RECIPES[args.method]
  learner = make_learner(args.method, clip_config, **hparams)
  data = protocols.base_to_new("sandbox_shapes", seed=1, num_shots=16)
  train_images, train_labels = posterior_lib.load_split(data.train, clip_config.vision.image_size)
  test_images, _ = posterior_lib.load_split(data.evals["base"], clip_config.vision.image_size)
  prototypes = None
  if learner.needs_class_prototypes:
    prototypes = prompt_run.class_prototypes(clip_params, clip_config, data.train, 256)
  class_state = learner.prepare_classes(clip_params, data.train.classnames, templates=[data.train.template],
                                        class_prototypes=prototypes, train_classnames=data.train.classnames)
  optimizer = optim.make_optimizer("sgd", 1e-3)
  state = prompt_trainer.create_train_state(learner, optimizer, 1, clip_params, class_state)
  step = prompt_trainer.make_train_step(learner, make_objective("ce"), optimizer)
  predict = prompt_trainer.make_predict_step(learner)
  teacher = class_state.zeroshot_text_features
  run = prompt_run.TrainedRun(prompt_run.PromptRunConfig(method=args.method), clip_config, clip_params, learner,
                              state.params, tuple(data.train.classnames), data.train.template)
  scorer = posterior_lib.PosteriorScorer(run, posteriors=("none", "laplace"), laplace_samples=args.samples,
                                         batch_size=512)
  if args.diag_chunk:
    scorer.diag_chunk = args.diag_chunk
  eval_state = learner.prepare_classes(clip_params, data.evals["base"].classnames,
                                       templates=[data.evals["base"].template])

  def epoch():
    s = jax.tree.map(jnp.copy, state)  # the train step donates its state
    for start in range(0, len(train_images) - batch + 1, batch):
      s, _ = step(s, clip_params, class_state, jnp.asarray(train_images[start:start + batch]),
                  jnp.asarray(train_labels[start:start + batch]), teacher)
    return s.params

  def fit_generic():
    inputs = scorer.inputs(train_images)
    kind = scorer.kind()
    posterior, _ = prompt_laplace.fit(
        scorer.apply, state.params, inputs, jnp.asarray(train_labels), jax.random.key(0), (clip_params, class_state),
        kind=kind, chunk_size=None if kind == "full" else scorer.diag_chunk,
        num_model_samples=1, tangent_chunk=128,
        prior_groups=scorer.laplace_prior_groups if kind == "diag" else "one")
    scorer.laplace = posterior
    return posterior

  def fit_shared(rank=None):  # the scorer's fast path: the text Jacobian once for the class list
    def run_it():
      posterior, _ = prompt_laplace.fit_shared_text(
          scorer._text_fn, state.params, scorer.inputs(train_images), jnp.asarray(train_labels),
          jax.random.key(0),
          clip_params, posterior_lib._per_class(class_state), *scorer._logit_scale_bias(),
          class_chunk=scorer.class_chunk, rank=rank)
      return posterior
    return run_it

  def deterministic():
    key = jax.random.key(0)
    return jnp.concatenate([predict(state.params, clip_params, eval_state, jnp.asarray(test_images[s:s + 256]),
                                    jax.random.fold_in(key, s)) for s in range(0, len(test_images), 256)])

  def linearised(jacobian, method):
    def run_it():
      scorer.laplace_jacobian, scorer.laplace_predictive = jacobian, method
      return scorer._laplace_probs(eval_state, scorer.inputs(test_images), jax.random.key(0))
    return run_it

  parts = set(args.parts.split(","))
  if not parts or parts - {"fit", "predictive"}:
    raise SystemExit(f"--parts={args.parts}; expected fit, predictive or both")
  candidates = {}
  ranks = [int(r) for r in args.ranks.split(",") if r] if scorer.shared_text else []
  if "fit" in parts:
    candidates.update({"train epoch": epoch, "laplace fit (generic)": fit_generic})
  if "fit" in parts and scorer.shared_text:
    candidates["laplace fit (shared text)"] = fit_shared()
    for rank in ranks:
      candidates[f"laplace fit (shared text, rank {rank})"] = fit_shared(rank)
  if "predictive" in parts:
    candidates.update({"deterministic eval": deterministic,
                       f"laplace predictive ({args.samples} jvp samples, mc)": linearised(False, "mc")})
  if "predictive" in parts and scorer.shared_text:
    name = f"laplace predictive (shared-text Jacobian, {args.samples} exact draws, mc)"
    candidates[name] = linearised(True, "mc")
    candidates["laplace predictive (shared-text Jacobian, probit)"] = linearised(True, "probit")
  for fn in candidates.values():  # compile (not timed)
    jax.block_until_ready(fn())
  times = {name: [] for name in candidates}
  loads = []
  for _ in range(args.runs):
    for name, fn in candidates.items():
      times[name].append(timed(fn))
    loads.append(os.getloadavg()[0])
  med = {name: (float(np.median([w for w, _ in t])), float(np.median([c for _, c in t]))) for name, t in times.items()}
  params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
  print(f"# {args.method}: {params} params, Laplace kind {scorer.kind()}, {args.samples} jvp samples, "
        f"{args.runs} runs, load average per round {[round(x, 1) for x in loads]}")
  print("| candidate | wall median (s) | CPU median (s) | CPU min-max (s) |\n|---|---|---|---|")
  for name, (wall, cpu) in med.items():
    cpus = [c for _, c in times[name]]
    print(f"| {name} | {wall:.3f} | {cpu:.3f} | {min(cpus):.3f}-{max(cpus):.3f} |")
  if ranks:
    report_rank_error(scorer, eval_state, state.params, test_images, fit_shared, ranks)
  for name in candidates:
    if name.startswith("laplace fit"):
      print(f"{name} / epoch: wall {med[name][0] / med['train epoch'][0]:.2f}, "
            f"CPU {med[name][1] / med['train epoch'][1]:.2f}")
    elif name.startswith("laplace predictive"):
      print(f"{name} / deterministic: wall {med[name][0] / med['deterministic eval'][0]:.2f}, "
            f"CPU {med[name][1] / med['deterministic eval'][1]:.2f}")


if __name__ == "__main__":
  main()
