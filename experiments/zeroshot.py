r"""Zero-shot CLIP accuracy (and calibration) on a benchmark dataset.

  python -m experiments.zeroshot --checkpoint=PATH --dataset=oxford_pets --protocol=base2new \
      --data_dir=~/tensorflow_datasets [--batch_size=128] [--max_examples=N] [--run_dir=runs/zs] \
      [--template="a lamplit photo of a {}."]

Prints base / new / HM accuracy under --protocol=base2new (all classes under --protocol=all) with ECE and
NLL, and writes results.{md,csv,json} into --run_dir. Flagfiles: experiments/flags/zeroshot_*.flags.
"""

from __future__ import annotations

import os

from absl import flags, logging

from experiments import common

FLAGS = flags.FLAGS
RUNLOCAL_EXAMPLES = 64
flags.DEFINE_string(
  "checkpoint", None, "open_clip dir / HF dir / .safetensors / registered name.", required=True
)
flags.DEFINE_list("dataset", None, "Registry dataset name(s), comma-separated.", required=True)
flags.DEFINE_enum("protocol", "base2new", ["base2new", "all"], "base2new: base/new/HM; all: every class.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir, or the Dassl data root for --source=folder.")
flags.DEFINE_enum("source", None, ["tfds", "folder"], "Where to read the data (default: the dataset's).")
flags.DEFINE_integer("batch_size", 128, "Images per batch.")
flags.DEFINE_integer(
  "max_examples", None, "Evaluate a seeded random subset of this many test images per split."
)
flags.DEFINE_string("run_dir", None, "Where results.{md,csv,json} go (default runs/zeroshot/<time>).")
flags.DEFINE_string(
  "tokenizer", None, 'Tokenizer spec overriding the checkpoint\'s ("clip_bpe" or a word JSON).'
)
flags.DEFINE_string("label_cache_dir", None, "Cache TFDS label columns here (.npy).")
flags.DEFINE_integer("num_threads", 8, "grain threads that decode and resize images.")
common.define_run_flags(f"{RUNLOCAL_EXAMPLES} test images per split (seconds)")
flags.DEFINE_string(
  "template", None, "Prompt with one {} for the class name, replacing each dataset's hand-crafted one."
)


def main(argv):
  del argv
  from bayesprompt.eval import zeroshot
  from bayesprompt.train import run_dir as run_dir_lib
  from bayesprompt.train.run_dir import timestamp

  run_dir = os.fspath(run_dir_lib.resolve_run_dir(FLAGS.run_dir, runlocal=FLAGS.runlocal, name="zeroshot",
                                                  default=os.path.join("runs", "zeroshot", timestamp())))
  run_dir_lib.check_fresh(run_dir, resume=False, overwrite=FLAGS.overwrite)
  max_examples = FLAGS.max_examples
  if FLAGS.runlocal:
    max_examples = min(max_examples or RUNLOCAL_EXAMPLES, RUNLOCAL_EXAMPLES)
  logging.info("zero-shot %s on %s -> %s", FLAGS.checkpoint, FLAGS.dataset, run_dir)
  zeroshot.evaluate_checkpoint(
    FLAGS.checkpoint,
    FLAGS.dataset,
    protocol=FLAGS.protocol,
    data_dir=FLAGS.data_dir,
    source=FLAGS.source,
    batch_size=FLAGS.batch_size,
    max_examples=max_examples,
    run_dir=run_dir,
    tokenizer=FLAGS.tokenizer,
    label_cache_dir=FLAGS.label_cache_dir,
    num_threads=FLAGS.num_threads,
    progress=common.show_progress(FLAGS.progress),
    template=FLAGS.template,
  )


if __name__ == "__main__":
  common.run_binary(main)
