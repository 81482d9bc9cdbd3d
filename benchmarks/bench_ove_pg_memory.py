r"""Peak memory of the OVE-PG loss + gradient against softmax cross-entropy (issue 6: ≤ 1.1x CE at C = 1000).

  python benchmarks/bench_ove_pg_memory.py [--classes 1000 100] [--batch 32] [--repeats 5] [--train_step]

What is measured, for every candidate, float32, one CPU device: the jitted `value_and_grad` w.r.t. the logits
(what a train step runs between computing the logits and back-propagating into the towers), compiled, and
XLA's `compiled.memory_analysis()`: peak = arguments + outputs + temporaries, where "temporaries" is XLA's
temp allocation (the peak of its buffer-sharing heap simulation, so the peak of simultaneously live
intermediates). Arguments are the buffers the loss reads — XLA drops unused ones: CE reads the logits and
labels; OVE-PG also the frozen teacher logits f⁰ (an [n, C] array a CE step does not have) and the key.
Outputs: the loss (and metrics) and the [n, C] gradient. The "[n, C]" columns count bytes in units of one
float32 [n, C] array.

Two levels:
1. loss: `softmax cross-entropy` (log_softmax + gather, the formula of `objectives.ce.per_example_nll`) vs
   `bayes.ove.ove_pg_loss` for each mode / ω source, loss only (metrics unused, so XLA drops them).
2. objective: the library objectives `make_objective("ce")` and `make_objective("ove_pg", ...)` on a
   LearnerOutput with logits [1, n, C], returning the loss and all their metrics, gradient w.r.t. the
   logits — exactly the loss slot of `prompt_trainer.train_step_fn`.
With --train_step, also the whole jitted CoOp train step on the sandbox CLIP at the same C (text tower over C
prompts, image tower over the batch), CE vs OVE-PG: there the loss is a small part of the step's memory.

Time: best of --repeats calls of the compiled loss + gradient (wall, this shared CPU: indicative only).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from anywhere

from bayesprompt.bayes.ove import ove_pg_loss
from bayesprompt.objectives import make_objective
from bayesprompt.prompts.base import LearnerOutput
from benchmarks import harness

VARIANTS = (("corrected", "prior_mean"), ("corrected", "prior_sample"), ("corrected", "posterior_gibbs"),
            ("faithful", "prior_mean"))


def _memory(compiled) -> tuple[int, int, int]:
  analysis = compiled.memory_analysis()
  return analysis.argument_size_in_bytes, analysis.output_size_in_bytes, analysis.temp_size_in_bytes


def _best_time(compiled, args, repeats: int) -> float:
  return harness.best_of(lambda: jax.block_until_ready(compiled(*args)), repeats=repeats, warmup=1)[0]


def _table(title: str, rows, args, unit: int, repeats: int) -> None:
  """rows: (name, fn) with fn(*args) -> (scalar loss, anything); gradient w.r.t. args[0]."""
  print(f"\n{title}")
  print(f"{'candidate':<42}{'args [n,C]':>11}{'out [n,C]':>10}{'temp [n,C]':>11}{'peak bytes':>12}"
        f"{'vs CE':>8}{'time':>10}")
  reference = None
  for name, fn in rows:
    compiled = jax.jit(jax.value_and_grad(fn, has_aux=True)).lower(*args).compile()
    arguments, outputs, temps = _memory(compiled)
    total = arguments + outputs + temps
    reference = reference or total
    seconds = _best_time(compiled, args, repeats)
    print(f"{name:<42}{arguments / unit:>11.2f}{outputs / unit:>10.2f}{temps / unit:>11.2f}{total:>12,}"
          f"{total / reference:>7.2f}x{seconds * 1e3:>8.2f}ms")


def bench_loss(num_classes: int, batch: int, repeats: int) -> None:
  rng = np.random.default_rng(1)
  logits = jnp.asarray(10 * rng.standard_normal((batch, num_classes)), jnp.float32)
  teacher = jnp.asarray(10 * rng.standard_normal((batch, num_classes)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  key = jax.random.key(0)

  def ce(logits, teacher, labels, key):
    del teacher, key
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)), ()

  def ove_pg(mode, source):
    def loss(logits, teacher, labels, key):
      return ove_pg_loss(key, logits, teacher, labels, omega_source=source, mode=mode)[0], ()

    return loss

  rows = [("softmax cross-entropy", ce)] + [(f"OVE-PG {mode} {source}", ove_pg(mode, source))
                                            for mode, source in VARIANTS]
  _table(f"loss + grad w.r.t. logits: C = {num_classes}, batch {batch}", rows, (logits, teacher, labels, key),
         batch * num_classes * 4, repeats)


def bench_objective(num_classes: int, batch: int, repeats: int) -> None:
  rng = np.random.default_rng(2)
  logits = jnp.asarray(10 * rng.standard_normal((1, batch, num_classes)), jnp.float32)
  teacher = jnp.asarray(10 * rng.standard_normal((batch, num_classes)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  key = jax.random.key(0)

  def objective_fn(objective):
    def fn(logits, teacher, labels, key):
      output = LearnerOutput(logits=logits, kl=jnp.zeros(()), image_features=jnp.zeros((batch, 1)))
      return objective(output, labels, key, teacher if objective.needs_teacher else None)

    return fn

  rows = [("objective ce", objective_fn(make_objective("ce")))]
  rows += [(f"objective ove_pg {mode} {source}", objective_fn(make_objective("ove_pg", mode=mode,
                                                                            omega_source=source)))
           for mode, source in VARIANTS]
  _table(f"objective (loss + metrics) + grad w.r.t. output.logits: C = {num_classes}, batch {batch}", rows,
         (logits, teacher, labels, key), batch * num_classes * 4, repeats)


def bench_train_step(num_classes: int, batch: int) -> None:
  import bayesprompt.clip as clip
  import bayesprompt.data  # noqa: F401  (registers the sandbox CLIP)
  from bayesprompt.prompts import make_learner
  from bayesprompt.train import optim, prompt_trainer

  config, params = clip.load_checkpoint("sandbox")
  learner = make_learner("coop", config, n_ctx=4, ctx_init="a photo of a")
  class_state = learner.prepare_classes(params, [f"class {i}" for i in range(num_classes)],
                                        templates=["a photo of a {}."])
  size = config.vision.image_size
  images = jnp.zeros((batch, size, size, 3), jnp.float32)
  labels = jnp.arange(batch, dtype=jnp.int32) % num_classes
  tx = optim.make_optimizer("sgd", 1e-4)
  print(f"\nCoOp train step (sandbox CLIP), C = {num_classes}, batch {batch}: memory_analysis of the step")
  print(f"{'objective':<34}{'args':>12}{'out':>12}{'temp':>12}{'peak bytes':>14}{'vs CE':>8}")
  reference = None
  for name, objective in (("ce", make_objective("ce")), ("ove_pg prior_mean", make_objective("ove_pg"))):
    state = prompt_trainer.create_train_state(learner, tx, 0, params, class_state)
    step = prompt_trainer.make_train_step(learner, objective, tx)
    compiled = step.lower(state, params, class_state, images, labels,
                          class_state.zeroshot_text_features).compile()
    arguments, outputs, temps = _memory(compiled)
    total = arguments + outputs + temps
    reference = reference or total
    print(f"{name:<34}{arguments:>12,}{outputs:>12,}{temps:>12,}{total:>14,}{total / reference:>7.3f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classes", type=int, nargs="+", default=[1000, 100])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--train_step", action="store_true", help="also the whole CoOp train step")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()}, load average {os.getloadavg()[0]:.1f}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  for num_classes in args.classes:
    bench_loss(num_classes, args.batch, args.repeats)
    bench_objective(num_classes, args.batch, args.repeats)
    if args.train_step:
      bench_train_step(num_classes, args.batch)


if __name__ == "__main__":
  main()
