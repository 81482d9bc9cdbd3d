r"""Which base-to-new regime a sandbox task is in: zero-shot vs CoOp (cached features) on base and new.

  python -m experiments.sandbox_regime --task=catalogue [--seeds=1,2,3] [--test_count=50] [--out=PATH]

The probe cited by the catalogue task's docstring (bayesprompt/data/sandbox/tasks.py): the task's train and
test splits generated in memory from world seed 0 (with the default counts, the prepared TFDS splits' images),
the shipped sandbox CLIP, zero-shot with the task's template, a nearest-class-mean reference, and CoOp (the
sandbox recipe: n_ctx 16 random, 25 epochs, SGD lr 2e-3, batch 32, one warm-up epoch; flip views) trained on
the base classes' 16 shots. Prints a markdown table; --out also writes the result as JSON.
"""

from __future__ import annotations

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("task", "catalogue", "A sandbox task (a key of bayesprompt.data.sandbox.tasks.TASKS).")
flags.DEFINE_list("seeds", ["1", "2", "3"], "CoOp seeds (few-shot draw, context init, batch order).")
flags.DEFINE_integer("shots", 16, "Training images per class.")
flags.DEFINE_integer("test_count", 50, "Test images per class (50 = the prepared test split).")
flags.DEFINE_string("out", None, "Also write the result as JSON here.")


def main(argv):
  del argv
  from bayesprompt.data.sandbox import model
  from bayesprompt.eval import regime

  config, params = model.load()
  result = regime.regime_probe(params, config, FLAGS.task, shots=FLAGS.shots, test_count=FLAGS.test_count,
                               seeds=[int(s) for s in FLAGS.seeds])
  print(regime.format_probe(result))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  common.run_binary(main)
