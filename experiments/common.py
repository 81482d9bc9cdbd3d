"""What every binary shares: `run_binary` (user errors as one line, quiet logs, --helpshort listing the
binary's flags) and the prompt-learning binaries' flags and run loop (no math here: see bayesprompt.train)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import logging as std_logging
import pathlib
import sys
from collections.abc import Callable

from absl import app, flags, logging

from bayesprompt import prompts
from bayesprompt.data import protocols
from bayesprompt.errors import UserError
from bayesprompt.eval import results as results_lib
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
  flags.DEFINE_enum("protocol", defaults.protocol, [*prompt_run.PROTOCOLS, *protocols.RENAMED_PROTOCOLS],
                    f"One of {', '.join(prompt_run.PROTOCOLS)}; the old names "
                    f"{', '.join(protocols.RENAMED_PROTOCOLS)} still work, with a warning.")
  flags.DEFINE_string("dataset", defaults.dataset, "Registry name of the (source) dataset.")
  flags.DEFINE_list("targets", [], "cross_dataset / domain_generalization targets (default: the protocol's).")
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
  flags.DEFINE_string("run_dir", None, "Run directory (default: runs/<protocol>_<dataset>_<digest of the "
                      "configuration>, the same for the same flags, so --resume finds it); it holds one "
                      "<variant>/seed<N> directory per run and the results table.")
  flags.DEFINE_bool("resume", False, "Continue the run in --run_dir: finished seeds are read back, started "
                    "ones continue from their newest intact checkpoint, the others start.")
  define_run_flags("1 seed, 1 epoch, tiny eval subsets (seconds)")
  flags.DEFINE_bool("tensorboard", True, "Also write TensorBoard event files (tensorboardX).")
  define_mesh_flags()


def define_run_flags(smoke: str) -> None:
  """--runlocal (`smoke`: what the smoke run shrinks), --overwrite and --progress, which every binary takes."""
  flags.DEFINE_bool("runlocal", False, f"Smoke run: {smoke}. Writes to a fresh directory under "
                    f"{run_dir_lib.SMOKE_ROOT}/, never into --run_dir.")
  flags.DEFINE_bool("overwrite", False, "Delete the run already in the run directory and start again (without "
                    "it, or --resume, a directory holding a run is refused).")
  flags.DEFINE_bool("progress", True, "Show progress bars (only on a terminal: off when output is redirected).")


def show_progress(requested: bool = True) -> bool:
  """Progress bars only when asked for and stderr is a terminal: redirected to a file, tqdm's carriage-return
  updates become thousands of lines."""
  return bool(requested) and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------------------
# The binary wrapper


class _DropMessages(std_logging.Filter):
  """Drops log records whose format string starts with one of `prefixes` (noise a user cannot act on)."""

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self._prefixes = prefixes

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefixes)


# TFDS warns once per generated sandbox variant folder that has no dataset_info.json yet (it is being built).
_TFDS_NOISE = ("Variant folder %s has no %s",)


def quiet_logs() -> None:
  """Silences what a user cannot act on: JAX's "Unable to initialize backend 'tpu'" (INFO, on every machine
  without a TPU), TFDS's "Variant folder ... has no dataset_info.json", and, unless --verbosity is given,
  absl INFO logs (orbax logs every checkpoint write at INFO: the progress lines and the results table are
  the console output a user wants; pass --verbosity=0 for the INFO logs)."""
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  absl_logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _DropMessages) for f in absl_logger.filters):
    absl_logger.addFilter(_DropMessages(_TFDS_NOISE))
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _adopt_binary_flags() -> None:
  """Makes the flags of every experiments module (experiments.common, a binary the main one builds on)
  key flags of the main module, so --helpshort lists all of the binary's own flags (--runlocal, --resume,
  ...) and not only those defined in its file."""
  main_module = sys.argv[0]
  for module, module_flags in FLAGS.flags_by_module_dict().items():
    if module.startswith("experiments.") or "/experiments/" in module.replace("\\", "/"):
      for flag in module_flags:
        FLAGS.register_key_flag_for_module(main_module, flag)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag reported as one `error:` line and exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error} (see --helpshort)", file=sys.stderr)
    sys.exit(2)


def user_errors(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """`main` with UserError (bad input: a path, a name, a flag value, a run directory) and absl flag errors
  printed as one line `error: <message>` and exit status 2. Any other exception is a programming error and
  keeps its traceback."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (UserError, flags.Error) as error:
      message = " ".join(str(error).split())  # one line, whatever the message's own line breaks
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)

  return wrapped


def run_binary(main: Callable[[list[str]], object]) -> None:
  """`app.run(main)` for every binary: --helpshort lists the binary's flags, flag and user errors print one
  `error:` line and exit 2, logs without the noise of `quiet_logs`."""
  _adopt_binary_flags()

  def quiet_main(argv):
    quiet_logs()
    return main(argv)

  app.run(user_errors(quiet_main), flags_parser=_parse_flags)


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
      raise UserError(f"--{what} entries must be key=value, got {pair!r}")
    key, value = pair.split("=", 1)
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def objective_kwargs_from_flags() -> dict:
  return parse_key_values(FLAGS.objective_hparams, "objective_hparams")


def base_config(method: str, objective: str, objective_kwargs: dict, seed: int,
                dataset: str | None = None) -> prompt_run.PromptRunConfig:
  """The run config of the flags; `dataset` (another regime's) replaces --dataset, without its extra sets."""
  extra = FLAGS.extra_eval_datasets if dataset in (None, FLAGS.dataset) else []
  cfg = prompt_run.PromptRunConfig(
      method=method, objective=objective, protocol=FLAGS.protocol, dataset=dataset or FLAGS.dataset,
      targets=tuple(FLAGS.targets), extra_eval_datasets=tuple(extra), checkpoint=FLAGS.checkpoint,
      data_dir=FLAGS.data_dir,
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


def seeds_from_flags() -> list[int]:
  """--seeds as ints (--runlocal: the first only); UserError for a non-integer or an empty list."""
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise UserError(f"--seeds={','.join(FLAGS.seeds)}; expected comma-separated integers") from None
  if not seeds:
    raise UserError("--seeds is empty")
  return seeds[:1] if FLAGS.runlocal else seeds


def variant_dir(root: pathlib.Path, name: str, seed: int) -> pathlib.Path:
  """<root>/<variant name, path-safe>/seed<seed>: one run's directory (what --eval_only takes)."""
  return root / name.replace("+", "_").replace(",", "_").replace("=", "-") / f"seed{seed}"


def run_variants(variants: list[tuple[str, str, dict]], *, title: str) -> dict:
  """Trains/evaluates every (method, objective, objective kwargs) variant for every seed; writes and prints
  one results table (mean ± std over seeds) in the run directory.

  The run directory: a fresh smoke directory for --runlocal, else --run_dir, else one named by the digest of
  the runs' configurations (so --resume without --run_dir finds an interrupted run). Without --resume or
  --overwrite a directory that already holds any of these runs is refused before anything trains. With
  --resume finished seeds are read back, started ones continue, the others start: the table equals an
  uninterrupted run's."""
  mesh = mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  seeds = seeds_from_flags()
  plan = _plan(variants, seeds)
  root = _root(plan, f"{FLAGS.protocol}_{FLAGS.dataset}")
  run_dir_lib.check_fresh([root] + [variant_dir(root, name, seed) for name, seed, _ in plan],
                          resume=FLAGS.resume, overwrite=FLAGS.overwrite)
  print(f"{len(plan)} runs ({len(variants)} variant(s) x {len(seeds)} seed(s)) -> {root}", flush=True)
  writer = ResultsWriter(root, title=title, row_label="variant", average=False)
  all_results = _train_plan(plan, root, writer, mesh)
  paths = writer.write()
  print(accuracy_table(writer.summary(), title, seeds))
  print(f"results: {json.dumps(paths)}")
  return all_results


def _plan(variants: list[tuple[str, str, dict]], seeds: list[int],
          dataset: str | None = None) -> list[tuple[str, int, prompt_run.PromptRunConfig]]:
  """(variant name, seed, run config) of every run, variant-major."""
  return [(variant_name(method, objective, kwargs), seed,
           base_config(method, objective, kwargs, seed, dataset))
          for method, objective, kwargs in variants for seed in seeds]


def _root(plan: list, name: str) -> pathlib.Path:
  """The run directory: a fresh smoke directory for --runlocal, else --run_dir, else one named by the digest
  of the runs' configurations."""
  default = run_dir_lib.default_run_dir(name, [cfg.to_json() for _, _, cfg in plan])
  return run_dir_lib.resolve_run_dir(FLAGS.run_dir, runlocal=FLAGS.runlocal, default=default, name=name)


def _train_plan(plan: list, root: pathlib.Path, writer: ResultsWriter, mesh, *, done: int = 0,
                total: int | None = None) -> dict:
  """Trains (or, with --resume, reads back) every run of `plan` into <root>/<variant>/seed<k>; adds the
  results to `writer`. The progress lines count runs overall: `done` before this plan, of `total`."""
  progress = show_progress(FLAGS.progress)
  total = len(plan) if total is None else total
  all_results = {}
  for index, (name, seed, cfg) in enumerate(plan, start=done + 1):
    run_dir = variant_dir(root, name, seed)
    results = prompt_run.finished_results(cfg, run_dir) if FLAGS.resume else None
    status = "finished earlier: results read back" if results is not None else "training"
    print(f"[run {index}/{total}] {name} seed {seed}: {status} ({run_dir})", flush=True)
    if results is None:
      results = prompt_run.run(cfg, run_dir, resume=FLAGS.resume, progress=progress, mesh=mesh,
                               verify_images=FLAGS.verify_images, tensorboard=FLAGS.tensorboard)
    all_results[(name, seed)] = results
    for split, metrics in results.items():
      writer.add(name, seed, {k: v for k, v in metrics.items() if k != "num_examples"}, split=split)
  return all_results


ZERO_SHOT_ROW = "zero-shot"


def run_regimes(variants: list[tuple[str, str, dict]], datasets: list[str], *, title: str,
                descriptions: dict[str, str]) -> dict:
  """`run_variants` on several base-to-new datasets (regimes), each with a zero-shot row (the frozen CLIP's
  hand-crafted prompt on the same test subsets) and one sentence read off its table. Prints first what will
  run; writes each regime's results.{md,csv,json} into <run_dir>/<dataset>/ and every regime into
  <run_dir>/results.json. Run directory, refusal and --resume as `run_variants`."""
  import jax

  mesh = mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  seeds = seeds_from_flags()
  names = [variant_name(*v) for v in variants]
  plans = {dataset: _plan(variants, seeds, dataset) for dataset in datasets}
  root = _root([run for plan in plans.values() for run in plan], f"{FLAGS.protocol}_regimes")
  run_dirs = [variant_dir(root / d, name, seed) for d, plan in plans.items() for name, seed, _ in plan]
  run_dir_lib.check_fresh([root] + run_dirs, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
  regimes = "; ".join(f"{d}: {descriptions.get(d, d)}" for d in datasets)
  print(f"Will run {len(variants)} variant(s) ({', '.join(names)}) x {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}) x {len(datasets)} regime(s) ({regimes}) = {len(run_dirs)} training "
        f"runs, plus a zero-shot row per regime -> {root}", flush=True)
  combined, all_results, done = {"title": title, "regimes": {}}, {}, 0
  for dataset, plan in plans.items():
    regime_title = f"{title}, {dataset} ({descriptions.get(dataset, 'base-to-new')})"
    writer = ResultsWriter(root / dataset, title=regime_title, row_label="variant", average=False)
    reference = prompt_run.zero_shot(plan[0][2], progress=show_progress(FLAGS.progress))
    for split, metrics in reference.items():
      writer.add(ZERO_SHOT_ROW, 0, metrics, split=split)
    all_results[dataset] = _train_plan(plan, root / dataset, writer, mesh, done=done, total=len(run_dirs))
    done += len(plan)
    writer.write()
    sentence = regime_sentence(writer.summary(), baseline=names[0])
    print(accuracy_table(writer.summary(), regime_title, seeds))
    print(f"\n{sentence}\n", flush=True)
    combined["regimes"][dataset] = {**writer.to_json(), "description": descriptions.get(dataset),
                                    "sentence": sentence}
  path = root / "results.json"
  if jax.process_index() == 0:
    path.write_text(json.dumps(combined, indent=2))
  print(f"results: {path}")
  return all_results


def regime_sentence(summary: list[dict], *, baseline: str) -> str:
  """One plain sentence on a regime's table: the baseline (CE) against zero-shot on base and new, then every
  other variant against the baseline (accuracy means, points)."""
  acc = {(r["dataset"], r["split"]): 100 * r["mean"] for r in summary if r["metric"] == "accuracy"}
  zs_b, zs_n = acc[(ZERO_SHOT_ROW, "base")], acc[(ZERO_SHOT_ROW, "new")]
  b, n = acc[(baseline, "base")], acc[(baseline, "new")]
  verdict = ("it overfits the base classes: new falls below zero-shot" if n < zs_n - 1 else
             "what it learns carries over to the new classes" if n > zs_n + 1 else
             "new stays level with zero-shot")
  parts = [f"{baseline} moves base {zs_b:.1f} -> {b:.1f} ({b - zs_b:+.1f}) and new {zs_n:.1f} -> {n:.1f} "
           f"({n - zs_n:+.1f}) against zero-shot ({verdict})"]
  skip = (ZERO_SHOT_ROW, baseline, results_lib.AVERAGE)
  for other in [d for d in dict.fromkeys(d for d, _ in acc) if d not in skip]:
    if (other, "base") in acc and (other, "new") in acc:
      d_base, d_new = acc[(other, "base")] - b, acc[(other, "new")] - n
      parts.append(f"{other} is {d_base:+.1f} on base and {d_new:+.1f} on new against it")
  return "; ".join(parts) + "."


def accuracy_table(summary: list[dict], title: str, seeds: list[int]) -> str:
  """The console view of a results summary: accuracy (%) mean ± std per variant and split, one row per
  variant, columns in results.md's order, and a note on what ± and HM mean (results.md beside it has every
  metric: NLL, ECE, Brier)."""
  rows = [r for r in summary if r["metric"] == "accuracy" and r["dataset"] != results_lib.AVERAGE]
  splits = [split for split, _ in results_lib.column_order(rows)]
  variants = list(dict.fromkeys(r["dataset"] for r in rows))
  cell = {(r["dataset"], r["split"]): r for r in rows}
  lines = [f"# {title}: accuracy (%)", "", "| variant | " + " | ".join(splits) + " |",
           "|---|" + "---|" * len(splits)]
  for variant in variants:
    values = []
    for split in splits:
      r = cell.get((variant, split))
      std = f" ± {100 * r['std']:.2f}" if r is not None and r["num_seeds"] > 1 else ""
      values.append("" if r is None else f"{100 * r['mean']:.2f}{std}")
    lines.append(f"| {variant} | " + " | ".join(values) + " |")
  footnote = results_lib.table_footnote(rows, seeds)
  return "\n".join(lines + (["", footnote] if footnote else []))


def evaluate_run_dir(run_dir: str | None, *, dataset: str, protocol: str, data_dir: str | None,
                     max_eval_examples: int | None, source: str | None = None) -> dict:
  """Evaluates a trained run (its latest checkpoint) on another dataset / class list. `run_dir`: one seed's
  directory, <run_dir>/<variant>/seed<N> (UserError if it is missing or not one). `source`: as
  `PromptRunConfig.source`."""
  if not run_dir:
    raise UserError("--eval_only needs --run_dir: one trained seed's directory, <run_dir>/<variant>/seed<N>, "
                    "as the training run prints")
  return prompt_run.evaluate_trained(run_dir, dataset=dataset, protocol=protocol, data_dir=data_dir,
                                     max_eval_examples=max_eval_examples, progress=show_progress(FLAGS.progress),
                                     source=source)
