r"""OVE-PG train-step overhead against cross-entropy for the same learner (issue 6 target: ≤ 5%).

  python benchmarks/bench_ove_pg_step.py [--config=sandbox|vit_b16] [--classes=100] [--batch=32] [--runs=20]

Times the jitted CoOp train step (text tower fwd+bwd over C class prompts, image tower fwd, loss, SGD update)
with CE and with OVE-PG (prior_mean and prior_sample ω) on the same random batch, interleaved, median of
--runs after warm-up. The OVE-PG step also computes the frozen teacher logits from the image features the
CoOp learner already has (no second image-tower pass).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from anywhere

import bayesprompt.clip as clip
import bayesprompt.data  # noqa: F401  (registers the sandbox CLIP)
from bayesprompt.objectives import make_objective
from bayesprompt.prompts import make_learner
from bayesprompt.train import optim, prompt_trainer
from benchmarks import harness


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="sandbox")
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--runs", type=int, default=20)
  args = parser.parse_args()
  if args.config == "sandbox":
    config, params = clip.load_checkpoint("sandbox")
    words = clip.get_tokenizer(config).vocabulary if hasattr(clip.get_tokenizer(config), "vocabulary") else None
  else:
    config = clip.get_config(args.config)
    params = clip.init_params(config, jax.random.key(0))
    words = None
  if words:
    names = [f"{a} {b}" for a in words[:20] for b in words[20:40]][:args.classes]
  else:
    names = [f"class {i}" for i in range(args.classes)]
  learner = make_learner("coop", config, n_ctx=4, ctx_init="a photo of a")
  class_state = learner.prepare_classes(params, names, templates=["a photo of a {}."])
  teacher_text = class_state.zeroshot_text_features
  size = config.vision.image_size
  images = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(np.arange(args.batch) % args.classes, jnp.int32)
  tx = optim.make_optimizer("sgd", 1e-4)
  variants = {"ce": make_objective("ce"),
              "ove_pg prior_mean": make_objective("ove_pg"),
              "ove_pg prior_sample": make_objective("ove_pg", omega_source="prior_sample")}
  steps, states = {}, {}
  candidates = {}
  for name, objective in variants.items():
    steps[name] = prompt_trainer.make_train_step(learner, objective, tx)
    states[name] = prompt_trainer.create_train_state(learner, tx, 0, params, class_state)

    def run(name=name):
      states[name], metrics = steps[name](states[name], params, class_state, images, labels, teacher_text)
      jax.block_until_ready(metrics)

    candidates[name] = run
  comparison = harness.interleaved(candidates, rounds=args.runs, warmup=2)  # warm-up includes compilation
  print(f"config={args.config} C={args.classes} batch={args.batch} runs={args.runs} devices={jax.devices()}")
  print(comparison.markdown(reference="ce", title="objective"))

if __name__ == "__main__":
  main()
