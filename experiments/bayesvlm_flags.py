"""Flag groups shared by the BayesVLM binaries (estimate_hessian ⊂ bayesvlm ⊂ active_learning), so that no
binary imports another. Each `define_*` is idempotent (the binaries may share one process in tests); each
`*_config` reads its group (and the groups below it) into the flag dict of `bayesprompt.bayesvlm`."""

from __future__ import annotations

from absl import flags

from experiments import common

FLAGS = flags.FLAGS

HESSIAN_KEYS = ("checkpoint", "tokenizer", "captions", "captions_split", "image_key", "caption_key", "data_dir",
                "num_pairs", "class_batch_size", "hessian_batch_size", "hessian_seed", "checkpoint_every",
                "pseudo_data_count", "evidence_mode", "lambda_solver", "la_batch_size", "runlocal",
                "progress", "num_threads")
ZEROSHOT_KEYS = ("dataset", "eval_split", "source", "factors_dir", "prior_precision", "predictive", "num_samples",
                 "eval_batch_size", "max_examples", "feature_cache_dir", "label_cache_dir", "probcosine_logit_bias")
ACTIVE_KEYS = ("pool_dataset", "pool_split", "pool_size", "pool_sources", "target_classes", "target_dataset",
               "target_split", "target_fraction",
               "acquisitions", "selection", "knn_k", "knn_metric", "rounds", "hessian_update_scale",
               "hessian_update_product", "online_lr",
               "finetune_lr", "finetune_weight_decay", "finetune_epochs", "finetune_batch_size", "al_num_samples",
               "epig_targets")
SANDBOX_DATASETS = ["sandbox_shapes", "sandbox_shapes_v2", "sandbox_shapes_sketch", "sandbox_shapes_a",
                    "sandbox_shapes_r"]


def define_hessian_flags() -> None:
  """The KFAC-estimation flags (experiments.estimate_hessian) and the mesh flags."""
  if "captions" in FLAGS:
    return
  common.define_mesh_flags()
  flags.DEFINE_string("checkpoint", "sandbox", "CLIP checkpoint: directory, .safetensors, or a registered name.")
  flags.DEFINE_string("tokenizer", None, "Tokenizer spec overriding the checkpoint's ('clip_bpe' or a word JSON).")
  flags.DEFINE_string("captions", "sandbox_world/captions", "TFDS image-caption dataset (name/config).")
  flags.DEFINE_string("captions_split", "train", "Split of --captions.")
  flags.DEFINE_string("image_key", "image", "Image field of --captions.")
  flags.DEFINE_string("caption_key", "caption", "Caption field of --captions (a list field: its first caption).")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
  flags.DEFINE_integer("num_pairs", None, "Pairs used (a seeded random subset; default: all).")
  flags.DEFINE_integer("class_batch_size", 4096, "Pairs per class batch (the paper: 32768).")
  flags.DEFINE_integer("hessian_batch_size", 256, "Pairs per tower forward pass (memory only).")
  flags.DEFINE_integer("hessian_seed", 0, "Seed of the pair shuffle.")
  flags.DEFINE_integer("checkpoint_every", 1, "Class batches between partial-sum checkpoints.")
  flags.DEFINE_float("pseudo_data_count", 10.0, "n, the GGN multiplier the prior precision is fitted at.")
  flags.DEFINE_enum("evidence_mode", "corrected", ["corrected", "faithful"],
                    "Laplace evidence for λ: corrected, or faithful to the official code.")
  flags.DEFINE_enum("lambda_solver", "optimum", ["optimum", "official_adam"],
                    "Fitting λ: to the evidence's maximiser, or the official 300-step Adam from λ = 400.")
  flags.DEFINE_integer("la_batch_size", None,
                       "Official KFAC B batching (BayesVLM's --la_batch_size): drop a partial class batch "
                       "and, from B only, each class batch's pairs beyond a multiple of this.")
  flags.DEFINE_bool("runlocal", False, "Smoke run: a 192-pair generated corpus, tiny batches (seconds); writes "
                    "to a fresh directory under runs/runlocal/, never into --output_dir / --run_dir.")
  flags.DEFINE_bool("progress", True, "Show progress bars (only on a terminal: off when output is redirected).")
  flags.DEFINE_integer("num_threads", 8, "Image decoding threads.")


def define_zeroshot_flags() -> None:
  """The BayesVLM zero-shot flags (experiments.bayesvlm) on top of the hessian flags."""
  define_hessian_flags()
  if "factors_dir" in FLAGS:
    return
  flags.DEFINE_list("dataset", SANDBOX_DATASETS, "Registry dataset names.")
  flags.DEFINE_string("eval_split", "test", "Split evaluated (train / val / test).")
  flags.DEFINE_string("source", None, "Data source: tfds or folder (default: the dataset's).")
  flags.DEFINE_string("factors_dir", None, "Output of experiments.estimate_hessian (default: estimate now).")
  flags.DEFINE_string("prior_precision", "fit", "λ: 'fit', 'stored' (from --factors_dir) or a positive number.")
  flags.DEFINE_enum("predictive", "probit", ["probit", "mc"], "Predictive approximation.")
  flags.DEFINE_integer("num_samples", 400, "Monte Carlo samples for --predictive=mc.")
  flags.DEFINE_integer("eval_batch_size", 128, "Images per forward pass.")
  flags.DEFINE_integer("max_examples", None, "Evaluate a seeded random subset of this many images per dataset.")
  flags.DEFINE_string("feature_cache_dir", None, "Cache of image features (default <run_dir>/features).")
  flags.DEFINE_string("label_cache_dir", None, "Cache TFDS label columns here (.npy).")
  flags.DEFINE_bool("probcosine_logit_bias", True,
                    "SigLIP: add logit_bias to the ProbCosine logit mean (false: the official BayesVLM, which "
                    "leaves it out; see DEVIATIONS.md).")
  flags.DEFINE_string("run_dir", None, "Run directory (default runs/<binary>/<time>).")
  flags.DEFINE_bool("overwrite", False, "Delete the run already in --run_dir and start again (without it a "
                    "directory holding a run is refused).")


def define_active_flags() -> None:
  """The active-learning flags (experiments.active_learning) on top of the zero-shot flags."""
  define_zeroshot_flags()
  if "pool_dataset" in FLAGS:
    return
  flags.DEFINE_string("pool_dataset", "sandbox_shapes", "Registry dataset of the unlabelled pool.")
  flags.DEFINE_string("pool_split", "train", "Split of the pool dataset.")
  flags.DEFINE_integer("pool_size", None, "Use a seeded random subset of the pool of this size (default: all).")
  flags.DEFINE_list("pool_sources", [], "A pool mixed from several splits (bayesprompt.data.pool), each "
                    "'dataset:split:count' or 'dataset:split:count:on_target'; replaces --pool_dataset/"
                    "--pool_split/--pool_size. Pool images of classes the target does not have cost budget but "
                    "add no label.")
  flags.DEFINE_enum("target_classes", "all", ["all", "base", "new"], "The target task's label set: all classes "
                    "of --target_dataset, or its base / new half (relabelled from 0, as in base-to-new).")
  flags.DEFINE_string("target_dataset", "sandbox_shapes_sketch", "Registry dataset of the target domain.")
  flags.DEFINE_string("target_split", "test", "Split of the target dataset (cut into targets + evaluation).")
  flags.DEFINE_float("target_fraction", 0.5, "Fraction of the target split used as unlabelled targets.")
  flags.DEFINE_list("acquisitions", ["random", "entropy", "bald", "epig"], "Acquisition functions.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (selection randomness, posterior samples, fine-tuning).")
  flags.DEFINE_list("budgets", ["8", "16", "32", "64"], "Numbers of labels on the curve.")
  flags.DEFINE_enum("selection", "direct", ["direct", "targeted"], "Score the pool, or kNN of top targets.")
  flags.DEFINE_integer("knn_k", 1, "Neighbours per target for --selection=targeted.")
  flags.DEFINE_enum("knn_metric", "cosine", ["cosine", "wasserstein"], "kNN distance for targeted selection.")
  flags.DEFINE_integer("rounds", 1, "Online rounds (1: offline); each round updates W, A and λ.")
  flags.DEFINE_float("hessian_update_scale", 1.0, "Scale of the online KFAC update A += s·Σφφᵀ.")
  flags.DEFINE_enum("hessian_update_product", "outer", ["outer", "inner"],
                    "Online update of A: outer products φφᵀ, or the official inner product ‖φ‖² on every "
                    "entry.")
  flags.DEFINE_float("online_lr", 1e-5, "AdamW learning rate of the online gradient step.")
  flags.DEFINE_float("finetune_lr", 1e-5, "AdamW learning rate of the final fine-tuning.")
  flags.DEFINE_float("finetune_weight_decay", 5e-2, "AdamW weight decay of the final fine-tuning.")
  flags.DEFINE_integer("finetune_epochs", 50, "Fine-tuning epochs over the selected set.")
  flags.DEFINE_integer("finetune_batch_size", 32, "Fine-tuning batch size.")
  flags.DEFINE_integer("al_num_samples", 32, "Posterior samples K for BALD / EPIG.")
  flags.DEFINE_integer("epig_targets", 256, "Targets EPIG averages over per round (random subset).")


def hessian_config() -> dict:
  """The hessian-estimation settings from the flags."""
  cfg = {name: FLAGS[name].value for name in HESSIAN_KEYS}
  cfg["progress"] = common.show_progress(cfg["progress"])
  return cfg


def zeroshot_config() -> dict:
  """The BayesVLM zero-shot settings (including the hessian ones) from the flags."""
  return {**hessian_config(), **{name: FLAGS[name].value for name in ZEROSHOT_KEYS}}


def active_config() -> dict:
  """The active-learning settings (including the zero-shot and hessian ones) from the flags."""
  cfg = {**zeroshot_config(), **{name: FLAGS[name].value for name in ACTIVE_KEYS}}
  cfg["seeds"] = [int(s) for s in FLAGS.seeds]
  cfg["budgets"] = [int(b) for b in FLAGS.budgets]
  return cfg


def checked_run_dir(name: str):
  """--run_dir, runs/<name>/<time> by default, a fresh smoke directory for --runlocal; refused if it holds a
  run (unless --overwrite)."""
  import os

  from bayesprompt.train import run_dir as run_dir_lib

  run_dir = run_dir_lib.resolve_run_dir(FLAGS.run_dir, runlocal=FLAGS.runlocal, name=name,
                                        default=os.path.join("runs", name, run_dir_lib.timestamp()))
  run_dir_lib.check_fresh(run_dir, resume=False, overwrite=FLAGS.overwrite)
  return run_dir
