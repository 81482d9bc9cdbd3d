r"""KFAC-GGN factors of a CLIP's image and text projections from image–caption pairs (BayesVLM).

  python -m experiments.estimate_hessian --flagfile=experiments/flags/estimate_hessian_sandbox.flags
  python -m experiments.estimate_hessian --flagfile=experiments/flags/estimate_hessian_real.flags \
      --checkpoint=PATH --data_dir=DIR

Writes into --output_dir:
  factors/              orbax checkpoint of {"img", "txt"}: A [p, p], B [q, q], N (laplace.save_factors), whose
                        info holds the fitted prior precisions (lambda_img, lambda_txt at n_img, n_txt)
  prior_precision.json  the same numbers, readable
  partial/step_<k>/     running sums after k class batches (an interrupted run resumes from there)
  config.json, git.json, metrics.jsonl   (bayesprompt.train.run_dir)
The binary only wires flags: the work is bayesprompt.bayes.hessian.estimate_pair_factors.

Data parallel with no flag: with more than one device (or process) the forward batches are split over
all of them and the per-device KFAC sums all-reduced (the same factors as one device, up to float
rounding). The mesh flags are the prompt binaries' (experiments.common): --mesh_data=1 forces one device;
multi-host runs add --coordinator_address/--num_processes/--process_id (or --multi_host), each process
reads its own share of the pairs, and only process 0 writes files.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from absl import flags, logging

from experiments import common

FLAGS = flags.FLAGS
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
flags.DEFINE_string("output_dir", None, "Output directory (default runs/estimate_hessian/<time>); an "
                    "interrupted run given the same one resumes from its partial/ sums.")
flags.DEFINE_bool("runlocal", False, "Smoke run: a 192-pair generated corpus, tiny batches (seconds); writes "
                  "to a fresh directory under runs/runlocal/, never into --output_dir.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_integer("num_threads", 8, "Image decoding threads.")

RUNLOCAL_PAIRS = 192


def config_from_flags() -> dict:
  """The hessian-estimation settings from the flags (shared with experiments.bayesvlm)."""
  cfg = {name: FLAGS[name].value for name in (
    "checkpoint", "tokenizer", "captions", "captions_split", "image_key", "caption_key", "data_dir", "num_pairs",
    "class_batch_size", "hessian_batch_size", "hessian_seed", "checkpoint_every", "pseudo_data_count",
    "evidence_mode", "runlocal", "progress", "num_threads")}
  cfg["progress"] = common.show_progress(cfg["progress"])
  return cfg


def load_model(cfg: dict):
  """(config, params, tokenizer) of cfg["checkpoint"] (with cfg["tokenizer"] overriding its tokenizer)."""
  from bayesprompt import clip

  if cfg["checkpoint"] == "sandbox":
    import bayesprompt.data.sandbox  # noqa: F401 -- registers the shipped checkpoint name.
  config, params = clip.load_checkpoint(cfg["checkpoint"])
  tokenizer = clip.get_tokenizer(cfg["tokenizer"] if cfg.get("tokenizer") else config)
  return config, params, tokenizer


def estimate(cfg: dict, config, params, tokenizer, output_dir: str | os.PathLike, *,
             model_fingerprint: str | None = None, mesh=None) -> tuple[dict, dict]:
  """Estimates factors and fits λ per tower; writes output_dir/{factors, prior_precision.json}.

  `mesh` (common.mesh_from_flags; None: one device): estimate data-parallel over its "data" axis.
  Returns ({"img", "txt"}: KFACFactors, info with lambda_img, lambda_txt, n_img, n_txt).
  """
  import jax

  from bayesprompt.bayes import hessian, laplace, vlm

  if cfg["pseudo_data_count"] <= 0:
    raise ValueError(f"--pseudo_data_count={cfg['pseudo_data_count']}; expected n > 0")
  output_dir = pathlib.Path(output_dir)
  sandbox_count = RUNLOCAL_PAIRS if cfg["runlocal"] and cfg["captions"].startswith("sandbox_world") else None
  pairs = hessian.open_caption_pairs(cfg["captions"], cfg["captions_split"], data_dir=cfg["data_dir"],
                                     image_key=cfg["image_key"], caption_key=cfg["caption_key"],
                                     sandbox_count=sandbox_count)
  num_pairs, class_batch, batch = cfg["num_pairs"], cfg["class_batch_size"], cfg["hessian_batch_size"]
  if cfg["runlocal"]:
    num_pairs = min(num_pairs or RUNLOCAL_PAIRS, RUNLOCAL_PAIRS, len(pairs))
    class_batch, batch = min(class_batch, 64), min(batch, 32)
  factors, info = hessian.estimate_pair_factors(
    params, config, pairs, tokenizer=tokenizer, num_pairs=num_pairs, class_batch_size=class_batch,
    batch_size=batch, seed=cfg["hessian_seed"], checkpoint_dir=output_dir / "partial",
    checkpoint_every=cfg["checkpoint_every"], num_threads=cfg["num_threads"], progress=cfg["progress"],
    model_fingerprint=model_fingerprint, mesh=mesh)
  n = float(cfg["pseudo_data_count"])
  for tower in vlm.TOWERS:
    _, lam = vlm.tower_posterior(factors[tower], params, config, tower, pseudo_data_count=n,
                                 prior_precision="fit", evidence_mode=cfg["evidence_mode"])
    info[f"lambda_{tower}"], info[f"n_{tower}"] = lam, n
  info.update(evidence_mode=cfg["evidence_mode"], checkpoint=str(cfg["checkpoint"]))
  laplace.save_factors(output_dir / "factors", factors, info)  # every process: orbax's save is collective
  if jax.process_index() == 0:
    (output_dir / "prior_precision.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
  return factors, info


def run(cfg: dict, output_dir: str | os.PathLike, mesh=None) -> dict:
  """The binary: estimate (data-parallel over `mesh` if given), fit λ, write the run directory; returns
  the info dict."""
  import jax

  from bayesprompt.train.run_dir import RunDir

  started = time.time()
  config, params, tokenizer = load_model(cfg)
  with RunDir(output_dir, cfg, tensorboard=False) as rd:
    factors, info = estimate(cfg, config, params, tokenizer, output_dir, mesh=mesh)
    summary = {"seconds": time.time() - started, "devices": 1 if mesh is None else mesh.shape["data"],
               **{k: v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    rd.write_scalars(0, summary)
  for tower in ("img", "txt"):
    f = factors[tower]
    print(f"{tower}: A {tuple(f.a.shape)} B {tuple(f.b.shape)} N={int(f.num_data)}  "
          f"λ={info[f'lambda_{tower}']:.6g} (n={info[f'n_{tower}']:g}, {info['evidence_mode']})")
  where = "one device" if mesh is None else f"{mesh.shape['data']} devices, {jax.process_count()} process(es)"
  print(f"wrote {pathlib.Path(output_dir) / 'factors'} ({time.time() - started:.1f}s, {where})")
  return info


def main(argv):
  del argv
  from bayesprompt.train.run_dir import resolve_run_dir, timestamp

  mesh = common.mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  output_dir = resolve_run_dir(FLAGS.output_dir, runlocal=FLAGS.runlocal, name="estimate_hessian",
                               default=os.path.join("runs", "estimate_hessian", timestamp()))
  logging.info("estimating KFAC factors -> %s (%s)", output_dir,
               "one device" if mesh is None else f"data-parallel over {dict(mesh.shape)}")
  run(config_from_flags(), output_dir, mesh=mesh)


if __name__ == "__main__":
  common.run_binary(main)
