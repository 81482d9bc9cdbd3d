r"""Data-parallel scaling of a prompt-learning train step: steps/s at 1, 2, 4 (simulated) devices.

What is measured (issue 8, "Performance"): one jitted train step (`bayesprompt.train.distributed.
make_train_step`: batch over the "data" axis, learner params and the frozen CLIP replicated, gradients
all-reduced by XLA) of CoOp (and VPT, a Monte Carlo learner) with cross-entropy on the bundled sandbox CLIP
(ViT 4 layers x 128 wide, 32 px images; text 4 x 128) at a fixed *global* batch, for each device count.
The reference is the plain single-device step (`prompt_trainer.make_train_step`), measured in the same
invocation; every row prints its steps/s and its ratio to that reference.

Each device count runs in its own subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N
(JAX fixes the device count at start-up). Inputs are placed on the devices once (this times the step, not
the input pipeline). Warm-up steps (incl. compilation) are excluded; then `--rounds` rounds of `--steps`
steps each, reporting the median round (and min-max) in steps/s.

`--methods kfac` times one step of BayesVLM's KFAC factor accumulation as experiments.estimate_hessian
runs it (`bayesprompt.bayesvlm.hessian`): both towers on a forward batch of `--batch` image–caption pairs and
the KFAC update of both projections against that batch (a class batch of one forward batch). Sharded: the
pairs split over "data", per-device partial sums all-reduced (`bayes.distributed.kfac_update_sharded`);
reference: the one-device path of the same binary (host round trip of the features included, as it runs).

Read the CPU figures for what they are: simulated devices share the machine's cores, so on a 2-core machine
N>1 "devices" split the same two cores and add collective overhead — the table checks that sharding costs
little, it cannot show a speed-up. Real scaling needs real accelerators; as written the script measures
simulated CPU devices only (it sets JAX_PLATFORMS=cpu for its workers).

Run (from the repo root):
  python benchmarks/bench_scaling.py                        # coop, global batch 32, devices 1,2,4
  python benchmarks/bench_scaling.py --methods coop,vpt --batch 64 --rounds 7
  python benchmarks/bench_scaling.py --methods kfac --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange ring",
              "red square", "blue circle", "green star", "yellow triangle"]
LEARNER_KWARGS = {"coop": dict(n_ctx=4), "vpt": dict(num_train_samples=2)}


def measure(devices: int, methods: list[str], batch: int, steps: int, rounds: int, warmup: int) -> dict:
  """Runs inside the subprocess: {method: {"sharded": [steps/s per round], "single": [...] (devices == 1)}}."""
  import jax
  import numpy as np
  import optax

  sys.path.insert(0, str(REPO_ROOT))
  import bayesprompt.clip as clip
  from bayesprompt.objectives import make_objective
  from bayesprompt.prompts import make_learner
  from bayesprompt.prompts.engine import zeroshot_text_features
  from bayesprompt.train import distributed, prompt_trainer

  assert jax.device_count() == devices, (jax.devices(), devices)
  config, params = clip.load_checkpoint("sandbox")
  size = config.vision.image_size
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, len(CLASSNAMES), size=batch).astype(np.int32)
  template = "a photo of a {}."
  teacher = zeroshot_text_features(params, config, CLASSNAMES, template)
  out = {}
  for method in methods:
    if method == "kfac":
      out[method] = _time_candidates(_kfac_candidates(devices, config, params, images), steps, rounds, warmup)
      continue
    learner = make_learner(method, config, **LEARNER_KWARGS.get(method, {}))
    objective = make_objective("ce")
    optimizer = optax.sgd(1e-3, momentum=0.9)
    class_state = learner.prepare_classes(params, CLASSNAMES, templates=[template])
    state = prompt_trainer.create_train_state(learner, optimizer, 0, params, class_state)

    candidates = {}
    if devices == 1:
      single = prompt_trainer.make_train_step(learner, objective, optimizer)
      args = jax.device_put((params, class_state, images, labels, teacher))
      candidates["single"] = [single, jax.tree.map(lambda x: x.copy(), state), args]
    mesh = distributed.make_mesh()
    sharded = distributed.make_train_step(learner, objective, optimizer, mesh, params)
    batch_arrays = distributed.shard_batch({"image": images, "label": labels}, mesh)
    args = (distributed.place_clip(params, mesh), distributed.replicate(class_state, mesh), batch_arrays["image"],
            batch_arrays["label"], distributed.replicate(teacher, mesh))
    candidates["sharded"] = [sharded, distributed.replicate(state, mesh), args]
    out[method] = _time_candidates(candidates, steps, rounds, warmup)
  return out


def _time_candidates(candidates: dict, steps: int, rounds: int, warmup: int) -> dict:
  """{name: [steps/s per round]} of candidates [step, state, args] with step(state, *args) -> (state, aux)."""
  import jax

  from benchmarks import harness

  for candidate in candidates.values():  # warm-up (compilation) excluded
    step, cand_state, cand_args = candidate
    for _ in range(warmup):
      cand_state, metrics = step(cand_state, *cand_args)
    jax.block_until_ready((cand_state, metrics))
    candidate[1] = cand_state

  def run(candidate):
    step, cand_state, cand_args = candidate
    for _ in range(steps):
      cand_state, metrics = step(cand_state, *cand_args)
    jax.block_until_ready((cand_state, metrics))
    candidate[1] = cand_state

  # Interleaved (rotating) rounds: load drift on a shared machine hits every candidate alike.
  comparison = harness.interleaved({name: lambda c=candidate: run(c) for name, candidate in candidates.items()},
                                   rounds=rounds, warmup=0)
  return {name: [steps / wall for wall in samples.wall] for name, samples in comparison.samples.items()}


def _kfac_candidates(devices: int, config, params, images) -> dict:
  """KFAC accumulation steps (see the module docstring): {"single" (devices == 1), "sharded"}."""
  import jax
  import numpy as np

  from bayesprompt.bayes import laplace
  from bayesprompt.bayesvlm import hessian, vlm
  from bayesprompt.train import distributed

  batch = len(images)
  ids = np.random.default_rng(1).integers(1, config.text.vocab_size, (batch, config.text.context_length))
  ids = ids.astype(np.int32)
  kwargs = dict(logit_scale=float(np.asarray(params["logit_scale"])), likelihood=vlm.likelihood_of(params),
                logit_bias=vlm.logit_bias_of(params), chunk_size=512)
  start = {t: laplace.kfac_init(*vlm.projection_dims(params, config, t), add_bias=vlm.projection_has_bias(config, t))
           for t in vlm.TOWERS}

  def make_step(forward):
    def step(states, pixels, token_ids):
      feats = forward(pixels, token_ids)
      return {tower: forward.accumulate(states[tower], feats[tower]["pre_projection"], feats[tower]["embeddings"],
                                        feats[other]["embeddings"], num_valid=batch,
                                        add_bias=vlm.projection_has_bias(config, tower), **kwargs)
              for tower, other in (("img", "txt"), ("txt", "img"))}, None

    return step

  candidates = {}
  if devices == 1:
    candidates["single"] = [make_step(hessian._OneDeviceForward(params, config, batch)), start, (images, ids)]
  mesh = distributed.make_mesh()
  sharded = hessian._ShardedForward(params, config, batch, mesh)
  candidates["sharded"] = [make_step(sharded), jax.tree.map(lambda x: x, start), (images, ids)]
  return candidates


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", default="1,2,4", help="Simulated CPU device counts.")
  parser.add_argument("--methods", default="coop", help="Learners (coop, vpt) and/or kfac (KFAC accumulation).")
  parser.add_argument("--batch", type=int, default=32, help="Global batch size (a multiple of every count).")
  parser.add_argument("--steps", type=int, default=10, help="Steps per timed round.")
  parser.add_argument("--rounds", type=int, default=5, help="Timed rounds (median reported).")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (compilation).")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  methods = args.methods.split(",")
  if args.worker is not None:
    print("RESULT " + json.dumps(measure(args.worker, methods, args.batch, args.steps, args.rounds, args.warmup)))
    return
  counts = [int(c) for c in args.devices.split(",")]
  bad = [c for c in counts if args.batch % c]
  if bad:
    raise SystemExit(f"--batch {args.batch} is not a multiple of device counts {bad}")
  results = {}
  load_before = os.getloadavg()[0]
  for count in counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--worker", str(count), "--methods", args.methods, "--batch", str(args.batch),
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise SystemExit(f"worker for {count} devices failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results[count] = json.loads(lines[-1][len("RESULT "):])

  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after), global batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps")
  print("| method | devices | step | steps/s (median) | min-max | vs 1-device plain step |")
  print("|---|---|---|---|---|---|")
  for method in methods:
    reference = statistics.median(results[1][method]["single"]) if 1 in results else float("nan")
    rows = []
    if 1 in results:
      reference_kind = "one-device binary path (reference)" if method == "kfac" else "plain jit (reference)"
      rows.append((1, reference_kind, results[1][method]["single"]))
    rows += [(c, "sharded (mesh)", results[c][method]["sharded"]) for c in counts]
    for count, kind, rates in rows:
      median = statistics.median(rates)
      print(f"| {method} | {count} | {kind} | {median:.2f} | {min(rates):.2f}-{max(rates):.2f} | "
            f"{median / reference:.2f}x |")


if __name__ == "__main__":
  main()
