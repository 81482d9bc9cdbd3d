"""The BayesVLM zero-shot experiment: MAP CLIP vs the Laplace posterior over both projections (ProbCosine +
probit or MC) on each dataset's eval split: accuracy, NLPD, ECE, Brier, reliability diagrams, results tables.

`cfg` is the binary's flag dict (experiments/bayesvlm_flags.py).
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

from bayesprompt.bayesvlm import factors, vlm
from bayesprompt.bayesvlm import features as features_lib
from bayesprompt.data import protocols, sources
from bayesprompt.errors import UserError
from bayesprompt.eval import plots
from bayesprompt.eval.results import ResultsWriter
from bayesprompt.train.run_dir import RunDir, is_primary_process

RUNLOCAL_EXAMPLES = 64


def evaluate_dataset(cfg: dict, name: str, config, params, tokenizer, posts, feature_dir, fingerprint):
  """MAP and BayesVLM metrics (and probabilities) of one dataset's eval split."""
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
    "bayesvlm": vlm.zero_shot_predictive(posts["img"], posts["txt"], image, text, scale,
                                         bias if cfg.get("probcosine_logit_bias", True) else None,
                                         method=cfg["predictive"], key=jax.random.key(0),
                                         num_samples=cfg["num_samples"]),
  }
  metrics = {k: vlm.classification_metrics(v, labels) for k, v in log_probs.items()}
  return metrics, {k: np.exp(np.asarray(v)) for k, v in log_probs.items()}, labels


def feature_cache_dir(cfg: dict, run_dir: pathlib.Path) -> pathlib.Path | None:
  """Where image features are cached: --feature_cache_dir or <run_dir>/features, on process 0 only (the
  other processes of a multi-host run compute the same features without writing them)."""
  if not is_primary_process():
    return None
  return pathlib.Path(cfg["feature_cache_dir"] or run_dir / "features")


def run_zero_shot(cfg: dict, run_dir: str | os.PathLike, mesh=None) -> dict:
  """The BayesVLM zero-shot experiment; returns {dataset: {"map": metrics, "bayesvlm": metrics}}.
  `mesh`: estimate factors data-parallel (when there is no --factors_dir)."""
  if not cfg["dataset"]:
    raise UserError("--dataset is empty: name at least one registry dataset")
  run_dir = pathlib.Path(run_dir)
  config, params, tokenizer = factors.load_model(cfg)
  fingerprint = features_lib.params_fingerprint(params)
  feature_dir = feature_cache_dir(cfg, run_dir)
  title = f"BayesVLM zero-shot ({cfg['checkpoint']}, n={cfg['pseudo_data_count']:g})"
  writer = ResultsWriter(run_dir, title=title)
  out = {}
  with RunDir(run_dir, cfg, tensorboard=False) as rd:
    posts, lams, info, _ = factors.posteriors(cfg, config, params, tokenizer, run_dir, fingerprint, mesh=mesh)
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
