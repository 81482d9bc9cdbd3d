"""Flag definitions and wiring shared by the prompt-learning binaries (no math here: see bayesprompt.train)."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib

from absl import flags, logging

from bayesprompt import prompts
from bayesprompt.eval.results import ResultsWriter
from bayesprompt.train import prompt_run
from bayesprompt.train import run_dir as run_dir_lib

FLAGS = flags.FLAGS


def define_prompt_flags(*, single_variant: bool = True) -> None:
  """The prompt-run flags. `single_variant`: also --method and --objective (binaries that train one variant;
  experiments.ove_pg chooses its variants with --methods / --ove_modes and must not accept flags it ignores)."""
  defaults = prompt_run.PromptRunConfig()
  if single_variant:
    flags.DEFINE_string("method", defaults.method, f"Prompt learner, one of: {', '.join(prompts.methods())}.")
    flags.DEFINE_string("objective", defaults.objective, "Loss plug-in: ce or ove_pg.")
  flags.DEFINE_enum("protocol", defaults.protocol, list(prompt_run.PROTOCOLS),
                    "base2new, fewshot, xd (cross-dataset) or dg (domain generalisation).")
  flags.DEFINE_string("dataset", defaults.dataset, "Registry name of the (source) dataset.")
  flags.DEFINE_list("targets", [], "xd/dg target datasets (default: the protocol's list).")
  flags.DEFINE_list("extra_eval_datasets", [], "More test sets evaluated under the same protocol (e.g. shifts).")
  flags.DEFINE_string("checkpoint", defaults.checkpoint,
                      "CLIP checkpoint: open_clip / transformers directory, .safetensors file, or a name ('sandbox').")
  flags.DEFINE_string("data_dir", None,
                      "TFDS data_dir, or the Dassl data root (CoOp's DATASET.ROOT) for folder sources.")
  flags.DEFINE_enum("source", None, ["tfds", "folder"],
                    "Read every dataset from TFDS or from Dassl's folders + split files (default: each "
                    "dataset's, see bayesprompt/data/README.md).")
  flags.DEFINE_enum("few_shot_sampler", None, ["dassl", "nested"],
                    "Few-shot draw: dassl = CoOp's images; nested = K-shot sets nested across K (default: "
                    "the dataset's: dassl for the benchmark, nested for the sandbox).")
  flags.DEFINE_enum("on_short", defaults.on_short, ["all", "error"],
                    "A class with fewer than --num_shots examples: take all it has (Dassl) or stop.")
  flags.DEFINE_bool("verify_images", False, "Decode every image of every split once before training.")
  flags.DEFINE_integer("num_shots", defaults.num_shots, "Shots per class (1, 2, 4, 8, 16).")
  flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds; results are mean ± std over them.")
  flags.DEFINE_integer("epochs", defaults.epochs, "Training epochs.")
  flags.DEFINE_integer("batch_size", defaults.batch_size, "Training batch size.")
  flags.DEFINE_enum("optimizer", defaults.optimizer, ["sgd", "adamw", "adadelta"],
                    "Optimizer (Dassl: SGD, momentum 0.9; APEX: Adadelta).")
  flags.DEFINE_float("lr", defaults.lr, "Base learning rate (cosine per epoch after the warm-up epoch).")
  flags.DEFINE_float("weight_decay", defaults.weight_decay, "Weight decay.")
  flags.DEFINE_integer("warmup_epochs", defaults.warmup_epochs, "Constant warm-up epochs at --warmup_lr.")
  flags.DEFINE_float("warmup_lr", defaults.warmup_lr, "Warm-up learning rate.")
  flags.DEFINE_multi_string("hparams", [], "Learner hyper-parameters, key=value (value parsed as a Python literal).")
  flags.DEFINE_multi_string("objective_hparams", [], "Objective options, key=value.")
  flags.DEFINE_integer("eval_batch_size", defaults.eval_batch_size, "Evaluation batch size.")
  flags.DEFINE_integer("max_eval_examples", None, "Evaluate a fixed random subset of each test split.")
  flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Matmul compute dtype of the towers.")
  flags.DEFINE_string("run_dir", None, "Run directory (default: runs/<method>_<objective>_<protocol>_<dataset>).")
  flags.DEFINE_bool("resume", False, "Continue the runs in --run_dir from their latest checkpoints.")
  flags.DEFINE_bool("runlocal", False, "Smoke run: 1 seed, 1 epoch, tiny eval subsets (seconds).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  define_mesh_flags()


def define_mesh_flags() -> None:
  """Data-parallel flags (bayesprompt.train.distributed); the defaults use every device of every host."""
  flags.DEFINE_integer("mesh_data", -1, "Devices on the data axis (-1: all devices; 1 with one process: no mesh).")
  flags.DEFINE_integer("mesh_model", 1, "Devices on the model axis (frozen CLIP params sharded over it).")
  flags.DEFINE_string("coordinator_address", None, "Multi-host: jax.distributed coordinator host:port.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
  flags.DEFINE_bool("multi_host", False, "Multi-host with cluster auto-detection (TPU pods, SLURM, Open MPI).")


def mesh_from_flags():
  """Starts the distributed runtime if asked; the device mesh, or None for one device in one process (the
  plain single-device path)."""
  import jax

  from bayesprompt.train import distributed

  mesh = distributed.mesh_from_config(distributed.MeshConfig(
      data=FLAGS.mesh_data, model=FLAGS.mesh_model, coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id, multi_host=FLAGS.multi_host))
  return None if mesh.size == 1 and jax.process_count() == 1 else mesh


def parse_key_values(pairs: list[str], what: str) -> dict:
  """["n_ctx=4", "ctx_init=a photo of a"] -> {"n_ctx": 4, "ctx_init": "a photo of a"}."""
  out = {}
  for pair in pairs:
    if "=" not in pair:
      raise ValueError(f"--{what} entries must be key=value, got {pair!r}")
    key, value = pair.split("=", 1)
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def objective_kwargs_from_flags() -> dict:
  return parse_key_values(FLAGS.objective_hparams, "objective_hparams")


def base_config(method: str, objective: str, objective_kwargs: dict, seed: int) -> prompt_run.PromptRunConfig:
  cfg = prompt_run.PromptRunConfig(
      method=method, objective=objective, protocol=FLAGS.protocol, dataset=FLAGS.dataset,
      targets=tuple(FLAGS.targets), extra_eval_datasets=tuple(FLAGS.extra_eval_datasets), checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir,
      source=FLAGS.source,
      few_shot_sampler=FLAGS.few_shot_sampler, on_short=FLAGS.on_short, num_shots=FLAGS.num_shots,
      seed=seed, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer, lr=FLAGS.lr,
      weight_decay=FLAGS.weight_decay, warmup_epochs=FLAGS.warmup_epochs, warmup_lr=FLAGS.warmup_lr,
      learner_kwargs=parse_key_values(FLAGS.hparams, "hparams"), objective_kwargs=objective_kwargs,
      eval_batch_size=FLAGS.eval_batch_size, max_eval_examples=FLAGS.max_eval_examples,
      compute_dtype=FLAGS.compute_dtype)
  if FLAGS.runlocal:
    cfg = dataclasses.replace(cfg, epochs=1, max_eval_examples=min(FLAGS.max_eval_examples or 64, 64),
                              warmup_epochs=0)
  return cfg


def variant_name(method: str, objective: str, objective_kwargs: dict) -> str:
  suffix = "".join(f",{k}={v}" for k, v in sorted(objective_kwargs.items()))
  return f"{method}+{objective}{suffix}"


def run_variants(variants: list[tuple[str, str, dict]], *, title: str) -> dict:
  """Trains/evaluates every (method, objective, objective kwargs) variant for every seed; writes and prints
  one results table (mean ± std over seeds) in the run directory."""
  mesh = mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  if not FLAGS["verbosity"].present:
    # orbax logs every checkpoint write at INFO; the progress bars and the results table are the console
    # output a user wants (pass --verbosity=0 for the INFO logs).
    logging.set_verbosity(logging.WARNING)
  seeds = [int(s) for s in FLAGS.seeds][:1 if FLAGS.runlocal else None]
  root = pathlib.Path(FLAGS.run_dir or f"runs/{FLAGS.protocol}_{FLAGS.dataset}_{run_dir_lib.timestamp()}")
  writer = ResultsWriter(root, title=title)
  all_results = {}
  for method, objective, objective_kwargs in variants:
    name = variant_name(method, objective, objective_kwargs)
    for seed in seeds:
      cfg = base_config(method, objective, objective_kwargs, seed)
      run_dir = root / name.replace("+", "_").replace(",", "_").replace("=", "-") / f"seed{seed}"
      logging.info("run %s seed %d -> %s", name, seed, run_dir)
      results = prompt_run.run(cfg, run_dir, resume=FLAGS.resume, progress=FLAGS.progress, mesh=mesh,
                               verify_images=FLAGS.verify_images)
      all_results[(name, seed)] = results
      for split, metrics in results.items():
        writer.add(name, seed, {k: v for k, v in metrics.items() if k != "num_examples"}, split=split)
  paths = writer.write()
  print(accuracy_table(writer.summary(), title))
  print(f"results: {json.dumps(paths)}")
  return all_results


def accuracy_table(summary: list[dict], title: str) -> str:
  """The console view of a results summary: accuracy (%) mean ± std per variant and split, one row per
  variant (results.md beside it has every metric: NLL, ECE, Brier)."""
  rows = [r for r in summary if r["metric"] == "accuracy" and r["dataset"] != "average"]
  splits = list(dict.fromkeys(r["split"] for r in rows))
  splits.sort(key=lambda split: {"base": 0, "new": 1, "hm": 2}.get(split, 3))  # stable: the rest keep order
  variants = list(dict.fromkeys(r["dataset"] for r in rows))
  cell = {(r["dataset"], r["split"]): r for r in rows}
  lines = [f"# {title}: accuracy (%)", "", "| variant | " + " | ".join(splits) + " |",
           "|---|" + "---|" * len(splits)]
  for variant in variants:
    values = []
    for split in splits:
      r = cell.get((variant, split))
      std = "" if r is None or r["std"] != r["std"] or split == "hm" else f" ± {100 * r['std']:.2f}"
      values.append("" if r is None else f"{100 * r['mean']:.2f}{std}")
    lines.append(f"| {variant} | " + " | ".join(values) + " |")
  return "\n".join(lines)


def evaluate_run_dir(run_dir: str, *, dataset: str, protocol: str, data_dir: str | None,
                     max_eval_examples: int | None, source: str | None = None) -> dict:
  """Evaluates a trained run (its latest checkpoint) on another dataset / class list."""
  return prompt_run.evaluate_trained(run_dir, dataset=dataset, protocol=protocol, data_dir=data_dir,
                                     max_eval_examples=max_eval_examples, source=source)
