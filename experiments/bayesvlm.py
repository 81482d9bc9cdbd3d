r"""BayesVLM zero-shot: MAP CLIP vs the Laplace posterior over both projections (ProbCosine + probit).

  python -m experiments.bayesvlm --flagfile=experiments/flags/bayesvlm_sandbox.flags
  python -m experiments.bayesvlm --flagfile=experiments/flags/bayesvlm_real.flags --checkpoint=PATH \
      --data_dir=DIR --factors_dir=runs/estimate_hessian/laion_b32

For every --dataset (registry name, its --eval_split): accuracy, NLPD, ECE (20 bins) and Brier of the
deterministic model ("map") and of BayesVLM ("bayesvlm"), a reliability-diagram PNG per dataset and
results.{md,csv,json}. Factors come from --factors_dir (the output of experiments.estimate_hessian) or are
estimated on the fly with the estimate_hessian flags (--captions, --num_pairs, --class_batch_size, ...).
λ: --prior_precision=fit (Laplace evidence at --pseudo_data_count), =stored (the factors' fitted value),
or a positive number. Image features are cached in --feature_cache_dir (resumable chunks).
With more than one device (the mesh flags of experiments.common) factors estimated here run
data-parallel (see experiments.estimate_hessian); only process 0 writes files.
"""

from __future__ import annotations

import os
import pathlib

from absl import flags, logging

from bayesprompt.errors import UserError
from experiments import common, estimate_hessian

FLAGS = flags.FLAGS
SANDBOX_DATASETS = ["sandbox_shapes", "sandbox_shapes_v2", "sandbox_shapes_sketch", "sandbox_shapes_a",
                    "sandbox_shapes_r"]
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
flags.DEFINE_string("run_dir", None, "Run directory (default runs/bayesvlm/<time>).")
flags.DEFINE_bool("overwrite", False, "Delete the run already in --run_dir and start again (without it a "
                  "directory holding a run is refused).")

RUNLOCAL_EXAMPLES = 64


def config_from_flags() -> dict:
  cfg = estimate_hessian.config_from_flags()
  cfg.update({name: FLAGS[name].value for name in (
    "dataset", "eval_split", "source", "factors_dir", "prior_precision", "predictive", "num_samples",
    "eval_batch_size", "max_examples", "feature_cache_dir", "label_cache_dir")})
  return cfg


def parse_prior_precision(value: str | float) -> float | str:
  """'fit' / 'stored' or a float λ > 0 (raises ValueError otherwise)."""
  if isinstance(value, str) and value in ("fit", "stored"):
    return value
  try:
    lam = float(value)
  except (TypeError, ValueError):
    raise UserError(f"--prior_precision={value!r}; expected 'fit', 'stored' or a positive number") from None
  if not lam > 0 or lam == float("inf"):
    raise UserError(f"--prior_precision={value!r}; the prior precision λ must be a finite number > 0")
  return lam


def load_factors(factors_dir: str | os.PathLike) -> tuple[dict, dict]:
  """({"img", "txt"}: KFACFactors, info) from an estimate_hessian output dir or its factors/ checkpoint."""
  from bayesprompt.bayes import laplace

  directory = pathlib.Path(factors_dir)
  if (directory / "factors" / "factors").is_dir():  # an estimate_hessian output dir, not the checkpoint
    directory = directory / "factors"
  factors, info = laplace.load_factors(directory)
  missing = {"img", "txt"} - set(factors)
  if missing:
    raise UserError(f"{directory} has factors {sorted(factors)}; expected 'img' and 'txt'")
  return factors, info


def posteriors(cfg: dict, config, params, tokenizer, run_dir: pathlib.Path, model_fingerprint: str | None = None,
               mesh=None):
  """({"img", "txt"}: TowerPosterior, {tower: λ}, factor info, {"img", "txt"}: KFACFactors), from
  --factors_dir or estimated now (data-parallel over `mesh` if given)."""
  from bayesprompt.bayes import vlm

  lam_setting = parse_prior_precision(cfg["prior_precision"])
  if cfg["pseudo_data_count"] <= 0:
    raise UserError(f"--pseudo_data_count={cfg['pseudo_data_count']}; expected n > 0")
  if cfg["factors_dir"]:
    factors, info = load_factors(cfg["factors_dir"])
    stored = info.get("model_fingerprint")
    if stored is None:
      logging.warning("--factors_dir=%s has no model fingerprint (written before they were stored): cannot "
                      "check that the factors belong to this checkpoint", cfg["factors_dir"])
    elif model_fingerprint is not None and stored != model_fingerprint:
      raise UserError(f"--factors_dir={cfg['factors_dir']} holds factors of another model (weights fingerprint "
                       f"{stored[:12]}, this checkpoint's {model_fingerprint[:12]}); re-run "
                       "experiments.estimate_hessian for this checkpoint")
  else:
    logging.info("no --factors_dir: estimating the factors now")
    factors, info = estimate_hessian.estimate(cfg, config, params, tokenizer, run_dir / "hessian",
                                              model_fingerprint=model_fingerprint, mesh=mesh)
  posts, lams = {}, {}
  for tower in vlm.TOWERS:
    lam = lam_setting
    if lam == "stored":
      if f"lambda_{tower}" not in info:
        raise UserError(f"--prior_precision=stored but the factors' info has no lambda_{tower}: {sorted(info)}")
      lam = float(info[f"lambda_{tower}"])
      stored_n = info.get(f"n_{tower}")
      if stored_n is not None and float(stored_n) != float(cfg["pseudo_data_count"]):
        logging.warning("stored λ_%s was fitted at n=%s, used here with n=%s", tower, stored_n,
                        cfg["pseudo_data_count"])
    posts[tower], lams[tower] = vlm.tower_posterior(
      factors[tower], params, config, tower, pseudo_data_count=float(cfg["pseudo_data_count"]),
      prior_precision=lam, evidence_mode=cfg["evidence_mode"])
  return posts, lams, info, factors


def evaluate_dataset(cfg: dict, name: str, config, params, tokenizer, posts, feature_dir, fingerprint):
  """MAP and BayesVLM metrics (and probabilities) of one dataset's eval split."""
  import jax
  import numpy as np

  from bayesprompt.bayes import features as features_lib
  from bayesprompt.bayes import vlm
  from bayesprompt.data import protocols, sources

  split = sources.open_split(name, cfg["eval_split"], data_dir=cfg["data_dir"], source=cfg["source"],
                             label_cache_dir=cfg["label_cache_dir"])
  limit = cfg["max_examples"]
  if cfg["runlocal"]:
    limit = min(limit or RUNLOCAL_EXAMPLES, RUNLOCAL_EXAMPLES)
  split = protocols.evaluation_subset(split, limit)
  image = features_lib.extract_split_features(
    params, config, split, cache_dir=feature_dir, batch_size=cfg["eval_batch_size"], progress=cfg["progress"],
    num_threads=cfg["num_threads"], model_fingerprint=fingerprint, description=f"{name}/{cfg['eval_split']}")
  text = features_lib.prompt_features(params, config, tokenizer, split.classnames, split.template)
  scale = float(np.asarray(params["logit_scale"]))
  bias = vlm.logit_bias_of(params) if "logit_bias" in params else None
  labels = image["labels"]
  log_probs = {
    "map": vlm.map_log_probs(image, text, scale, bias),
    "bayesvlm": vlm.zero_shot_predictive(posts["img"], posts["txt"], image, text, scale, bias,
                                         method=cfg["predictive"], key=jax.random.key(0),
                                         num_samples=cfg["num_samples"]),
  }
  metrics = {k: vlm.classification_metrics(v, labels) for k, v in log_probs.items()}
  return metrics, {k: np.exp(np.asarray(v)) for k, v in log_probs.items()}, labels


def feature_cache_dir(cfg: dict, run_dir: pathlib.Path) -> pathlib.Path | None:
  """Where image features are cached: --feature_cache_dir or <run_dir>/features, on process 0 only (the
  other processes of a multi-host run compute the same features without writing them)."""
  from bayesprompt.train.run_dir import is_primary_process

  if not is_primary_process():
    return None
  return pathlib.Path(cfg["feature_cache_dir"] or run_dir / "features")


def run(cfg: dict, run_dir: str | os.PathLike, mesh=None) -> dict:
  """The binary; returns {dataset: {"map": metrics, "bayesvlm": metrics}}. `mesh`: estimate factors
  data-parallel (when there is no --factors_dir)."""
  from bayesprompt.bayes import features as features_lib
  from bayesprompt.eval import plots
  from bayesprompt.eval.results import ResultsWriter
  from bayesprompt.train.run_dir import RunDir

  if not cfg["dataset"]:
    raise UserError("--dataset is empty: name at least one registry dataset")
  run_dir = pathlib.Path(run_dir)
  config, params, tokenizer = estimate_hessian.load_model(cfg)
  fingerprint = features_lib.params_fingerprint(params)
  feature_dir = feature_cache_dir(cfg, run_dir)
  writer = ResultsWriter(run_dir, title=f"BayesVLM zero-shot ({cfg['checkpoint']}, n={cfg['pseudo_data_count']:g})")
  out = {}
  with RunDir(run_dir, cfg, tensorboard=False) as rd:
    posts, lams, info, _ = posteriors(cfg, config, params, tokenizer, run_dir, fingerprint, mesh=mesh)
    rd.write_json("prior_precision.json", {**{f"lambda_{t}": v for t, v in lams.items()},
                                           "pseudo_data_count": cfg["pseudo_data_count"], "factors": info})
    print(f"λ_img={lams['img']:.6g}  λ_txt={lams['txt']:.6g}  n={cfg['pseudo_data_count']:g}")
    for step, name in enumerate(cfg["dataset"]):
      metrics, probs, labels = evaluate_dataset(cfg, name, config, params, tokenizer, posts, feature_dir,
                                                fingerprint)
      out[name] = metrics
      for method, values in metrics.items():
        writer.add(name, seed=0, metrics=values, split=method)
        print(f"{name:>22s} {method:>8s}: acc {100 * values['accuracy']:6.2f}%  nlpd {values['nlpd']:.4f}  "
              f"ece {values['ece']:.4f}  brier {values['brier']:.4f}  ({len(labels)} images)")
      rd.write_scalars(step, {f"{name}/{m}/{k}": v for m, vals in metrics.items() for k, v in vals.items()})
      if rd.writes:
        plots.reliability_png(run_dir / f"reliability_{name}.png",
                              {"MAP": probs["map"], "BayesVLM": probs["bayesvlm"]}, labels,
                              title=f"{name}/{cfg['eval_split']}")
  paths = writer.write()
  print(writer.markdown())
  print(f"wrote {', '.join(paths.values())}")
  return out


def checked_run_dir(name: str) -> pathlib.Path:
  """--run_dir, runs/<name>/<time> by default, a fresh smoke directory for --runlocal; refused if it holds a
  run (unless --overwrite)."""
  from bayesprompt.train import run_dir as run_dir_lib

  run_dir = run_dir_lib.resolve_run_dir(FLAGS.run_dir, runlocal=FLAGS.runlocal, name=name,
                                        default=os.path.join("runs", name, run_dir_lib.timestamp()))
  run_dir_lib.check_fresh(run_dir, resume=False, overwrite=FLAGS.overwrite)
  return run_dir


def main(argv):
  del argv
  mesh = common.mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  run(config_from_flags(), checked_run_dir("bayesvlm"), mesh=mesh)


if __name__ == "__main__":
  common.run_binary(main)
