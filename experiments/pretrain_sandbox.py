r"""Pretrains the sandbox CLIP contrastively on the sandbox caption corpus (DESIGN §7).

  python -m experiments.pretrain_sandbox --flagfile=experiments/flags/pretrain_sandbox.flags

The loss, step, optimizer and loop are bayesprompt.train.pretrain (symmetric InfoNCE, AdamW with warmup and
cosine decay; a resumed run, `--resume`, is the uninterrupted run, bitwise on CPU).

Writes to --workdir: config.json / git.json / metrics.jsonl / tensorboard/ (the run directory),
checkpoints/ (orbax, every --checkpoint_every steps, the last --keep_checkpoints kept) and results.json
(zero-shot accuracies of the final model); the final model is exported in open_clip hub layout with its
tokenizer to --export_dir (default <workdir>/sandbox_clip). To ship it as the package's default sandbox
model, pass --export_dir=bayesprompt/assets/sandbox_clip.

--runlocal shrinks everything (tiny corpus and model, a few steps) to a seconds-long smoke run.
"""

from __future__ import annotations

from absl import flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", "runs/pretrain_sandbox", "Run directory (checkpoints, metrics).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", "", "Where to export the final model; default <workdir>/sandbox_clip.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Sandbox TFDS data dir (default: the sandbox cache).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation and of the batch order.")
_WORLD_SEED = flags.DEFINE_integer("world_seed", 0, "Seed of the generated world (the TFDS builder config).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 1000, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Image-caption pairs per step.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 50, "Linear warmup steps.")
_END_LR_FACTOR = flags.DEFINE_float("end_lr_factor", 0.02, "Final learning rate / peak.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
_GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip.")
_VISION_PATCH = flags.DEFINE_integer("vision_patch", 8, "ViT patch size.")
_VISION_WIDTH = flags.DEFINE_integer("vision_width", 128, "ViT width.")
_VISION_LAYERS = flags.DEFINE_integer("vision_layers", 4, "ViT layers.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 250, "Steps between checkpoints.")
_KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps between metric records.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500, "Steps between zero-shot evaluations on a slice (0: off).")
_EVAL_SLICE = flags.DEFINE_integer("eval_slice", 640, "Test examples per set for intermediate evaluations.")
_RESUME = flags.DEFINE_bool("resume", False, "Resume from the latest checkpoint in --workdir.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", 0, "Stop after this step (simulates an interruption; 0: off).")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "Smoke run: tiny corpus and model, a few steps; writes to a "
                              "fresh directory under runs/runlocal/, never into --workdir.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the run already in --workdir and start again.")



def run_config(overrides: dict | None = None) -> dict:
  """The resolved hyper-parameters of this run: the flags above, then `overrides`, then --runlocal."""
  from bayesprompt.train import pretrain

  values = {name: flags.FLAGS[name].value for name in (
      "seed", "world_seed", "num_steps", "batch_size", "learning_rate", "warmup_steps", "end_lr_factor",
      "weight_decay", "grad_clip", "vision_patch", "vision_width", "vision_layers", "checkpoint_every",
      "keep_checkpoints", "log_every", "eval_every", "eval_slice", "runlocal", "resume", "stop_after",
      "workdir", "export_dir", "data_dir", "overwrite")}
  return pretrain.resolve_config({**values, **(overrides or {})})


def main(argv):
  del argv
  from bayesprompt.train import pretrain
  from bayesprompt.train import run_dir as run_dir_lib

  cfg = run_config()
  if cfg["runlocal"]:  # a smoke run never writes into (and so never blocks) the real run's --workdir
    cfg["workdir"] = str(run_dir_lib.smoke_run_dir("pretrain_sandbox"))
  pretrain.run(cfg)


if __name__ == "__main__":
  common.run_binary(main)
