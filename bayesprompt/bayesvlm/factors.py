"""KFAC factors of both projections: the estimate_hessian experiment, and loading / turning them into
tower posteriors for the zero-shot and active-learning experiments (BayesVLM).

`cfg` is the binaries' flag dict (experiments/bayesvlm_flags.py): checkpoint, tokenizer, captions, ...,
pseudo_data_count, evidence_mode, factors_dir, prior_precision.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
from absl import logging

from bayesprompt import clip
from bayesprompt.bayes import laplace
from bayesprompt.bayesvlm import hessian, vlm
from bayesprompt.errors import UserError
from bayesprompt.train.run_dir import RunDir

RUNLOCAL_PAIRS = 192


def load_model(cfg: dict):
  """(config, params, tokenizer) of cfg["checkpoint"] (with cfg["tokenizer"] overriding its tokenizer)."""
  if cfg["checkpoint"] == "sandbox":
    import bayesprompt.data.sandbox  # noqa: F401 -- registers the shipped checkpoint name.
  config, params = clip.load_checkpoint(cfg["checkpoint"])
  tokenizer = clip.get_tokenizer(cfg["tokenizer"] if cfg.get("tokenizer") else config)
  return config, params, tokenizer


def estimate(cfg: dict, config, params, tokenizer, output_dir: str | os.PathLike, *,
             model_fingerprint: str | None = None, mesh=None) -> tuple[dict, dict]:
  """Estimates factors and fits λ per tower; writes output_dir/{factors, prior_precision.json}.

  `mesh` (None: one device): estimate data-parallel over its "data" axis.
  Returns ({"img", "txt"}: KFACFactors, info with lambda_img, lambda_txt, n_img, n_txt).
  """
  if cfg["pseudo_data_count"] <= 0:
    raise UserError(f"--pseudo_data_count={cfg['pseudo_data_count']}; expected n > 0")
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
    model_fingerprint=model_fingerprint, mesh=mesh, la_batch_size=cfg.get("la_batch_size"))
  n = float(cfg["pseudo_data_count"])
  for tower in vlm.TOWERS:
    _, lam = vlm.tower_posterior(factors[tower], params, config, tower, pseudo_data_count=n,
                                 prior_precision="fit", evidence_mode=cfg["evidence_mode"],
                                 lambda_solver=cfg.get("lambda_solver", "optimum"))
    info[f"lambda_{tower}"], info[f"n_{tower}"] = lam, n
  info.update(evidence_mode=cfg["evidence_mode"], lambda_solver=cfg.get("lambda_solver", "optimum"), checkpoint=str(cfg["checkpoint"]))
  laplace.save_factors(output_dir / "factors", factors, info)  # every process: orbax's save is collective
  if jax.process_index() == 0:
    (output_dir / "prior_precision.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
  return factors, info


def run_estimate(cfg: dict, output_dir: str | os.PathLike, mesh=None) -> dict:
  """The binary: estimate (data-parallel over `mesh` if given), fit λ, write the run directory; returns
  the info dict."""
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
    factors, info = estimate(cfg, config, params, tokenizer, run_dir / "hessian",
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
      prior_precision=lam, evidence_mode=cfg["evidence_mode"], lambda_solver=cfg.get("lambda_solver", "optimum"))
  return posts, lams, info, factors
