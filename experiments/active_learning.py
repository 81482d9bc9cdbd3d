r"""BayesVLM active learning: label pool images chosen for a target domain, fine-tune the image projection.

  python -m experiments.active_learning --flagfile=experiments/flags/active_learning_sandbox.flags
  python -m experiments.active_learning --flagfile=experiments/flags/active_learning_real.flags \
      --checkpoint=PATH --data_dir=DIR --factors_dir=runs/estimate_hessian/laion_b32

Pool = --pool_dataset/--pool_split (labels revealed only when selected); target domain = --target_dataset/
--target_split, cut (seeded, fixed across seeds) into unlabelled targets (--target_fraction; used by EPIG and
targeted selection) and the evaluation set. For every acquisition in --acquisitions and seed in --seeds,
one ordered selection of max(--budgets) points is made (bayesprompt.bayes.active.select: direct or
targeted kNN, offline or --rounds online rounds with rank-one KFAC updates); for every budget b the image
projection is fine-tuned on the first b points (AdamW, --finetune_lr 1e-5, --finetune_weight_decay 5e-2) and
evaluated (MAP and BayesVLM: accuracy, NLPD, ECE). Writes results.{md,csv,json}, curves.md, curves.png,
selections.json into --run_dir. Reuses experiments.bayesvlm's flags for factors, λ and caches.
With more than one device (the mesh flags of experiments.common; --mesh_data=1 forces one) EPIG is scored
with the pool split over the devices and factors estimated here run data-parallel; only process 0 writes.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from absl import flags, logging

from bayesprompt.errors import UserError
from experiments import bayesvlm, common, estimate_hessian

FLAGS = flags.FLAGS
flags.DEFINE_string("pool_dataset", "sandbox_shapes", "Registry dataset of the unlabelled pool.")
flags.DEFINE_string("pool_split", "train", "Split of the pool dataset.")
flags.DEFINE_integer("pool_size", None, "Use a seeded random subset of the pool of this size (default: all).")
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
flags.DEFINE_float("online_lr", 1e-5, "AdamW learning rate of the online gradient step.")
flags.DEFINE_float("finetune_lr", 1e-5, "AdamW learning rate of the final fine-tuning.")
flags.DEFINE_float("finetune_weight_decay", 5e-2, "AdamW weight decay of the final fine-tuning.")
flags.DEFINE_integer("finetune_epochs", 50, "Fine-tuning epochs over the selected set.")
flags.DEFINE_integer("finetune_batch_size", 32, "Fine-tuning batch size.")
flags.DEFINE_integer("al_num_samples", 32, "Posterior samples K for BALD / EPIG.")
flags.DEFINE_integer("epig_targets", 256, "Targets EPIG averages over per round (random subset).")

RUNLOCAL = {"pool_size": 64, "max_targets": 48, "budgets": [4, 8], "seeds": [0], "al_num_samples": 8,
            "finetune_epochs": 2, "epig_targets": 16}


def config_from_flags() -> dict:
  cfg = bayesvlm.config_from_flags()
  cfg.update({name: FLAGS[name].value for name in (
    "pool_dataset", "pool_split", "pool_size", "target_dataset", "target_split", "target_fraction",
    "acquisitions", "selection", "knn_k", "knn_metric", "rounds", "hessian_update_scale", "online_lr",
    "finetune_lr", "finetune_weight_decay", "finetune_epochs", "finetune_batch_size", "al_num_samples",
    "epig_targets")})
  cfg["seeds"] = [int(s) for s in FLAGS.seeds]
  cfg["budgets"] = [int(b) for b in FLAGS.budgets]
  return cfg


def _features(cfg, name, split_name, config, params, feature_dir, fingerprint, limit, seed):
  import numpy as np

  from bayesprompt.bayes import features as features_lib
  from bayesprompt.data import sources

  split = sources.open_split(name, split_name, data_dir=cfg["data_dir"], source=cfg["source"],
                             label_cache_dir=cfg["label_cache_dir"])
  if len(split) == 0:
    raise ValueError(f"{name}/{split_name} is empty")
  if limit is not None and limit < len(split):
    split = split.select(np.sort(np.random.default_rng(seed).choice(len(split), limit, replace=False)))
  feats = features_lib.extract_split_features(
    params, config, split, cache_dir=feature_dir, batch_size=cfg["eval_batch_size"], progress=cfg["progress"],
    num_threads=cfg["num_threads"], model_fingerprint=fingerprint, description=f"{name}/{split_name}")
  return split, feats


def check_settings(cfg: dict) -> None:
  """Bad flag combinations raise before any work (ValueError naming the flag)."""
  from bayesprompt.bayes import active

  if not cfg["acquisitions"]:
    raise UserError("--acquisitions is empty")
  for a in cfg["acquisitions"]:
    if a not in active.ACQUISITIONS:
      raise UserError(f"--acquisitions: unknown {a!r}; expected some of {active.ACQUISITIONS}")
  if not cfg["budgets"] or min(cfg["budgets"]) <= 0:
    raise UserError(f"--budgets={cfg['budgets']}; expected positive integers")
  if not cfg["seeds"]:
    raise UserError("--seeds is empty")
  if not 0 < cfg["target_fraction"] < 1:
    raise UserError(f"--target_fraction={cfg['target_fraction']}; expected a fraction in (0, 1)")
  if cfg["pool_size"] is not None and cfg["pool_size"] <= 0:
    raise UserError(f"--pool_size={cfg['pool_size']}; the pool must not be empty")
  if cfg["knn_k"] <= 0:
    raise UserError(f"--knn_k={cfg['knn_k']}; expected a positive integer")


def run(cfg: dict, run_dir: str | os.PathLike, mesh=None) -> dict:
  """The binary; returns {"zero_shot": metrics, "curves": {acquisition: {budget: [per-seed metrics]}}}.

  `mesh` (common.mesh_from_flags; None: one device): EPIG scoring and factor estimation data-parallel.
  """
  import jax
  import numpy as np

  from bayesprompt.bayes import active, laplace, vlm
  from bayesprompt.bayes import features as features_lib
  from bayesprompt.eval import plots
  from bayesprompt.eval.results import ResultsWriter
  from bayesprompt.train.run_dir import RunDir

  if cfg["runlocal"]:
    cfg = {**cfg, **{k: v for k, v in RUNLOCAL.items() if k != "max_targets"},
           "pool_size": min(cfg["pool_size"] or RUNLOCAL["pool_size"], RUNLOCAL["pool_size"]),
           "budgets": [b for b in RUNLOCAL["budgets"]], "max_examples": RUNLOCAL["max_targets"]}
  check_settings(cfg)
  run_dir = pathlib.Path(run_dir)
  started = time.time()
  config, params, tokenizer = estimate_hessian.load_model(cfg)
  fingerprint = features_lib.params_fingerprint(params)
  feature_dir = bayesvlm.feature_cache_dir(cfg, run_dir)
  with RunDir(run_dir, cfg, tensorboard=False) as rd:
    posts, lams, _, factors = bayesvlm.posteriors(cfg, config, params, tokenizer, run_dir, fingerprint,
                                                  mesh=mesh)
    pool_split, pool = _features(cfg, cfg["pool_dataset"], cfg["pool_split"], config, params, feature_dir,
                                 fingerprint, cfg["pool_size"], seed=0)
    target_split, target_all = _features(cfg, cfg["target_dataset"], cfg["target_split"], config, params,
                                         feature_dir, fingerprint, cfg["max_examples"], seed=0)
    if list(pool_split.classnames) != list(target_split.classnames):
      raise ValueError(f"pool {pool_split!r} and target {target_split!r} have different classes")
    max_budget = max(cfg["budgets"])
    if max_budget > len(pool["labels"]):
      raise ValueError(f"--budgets up to {max_budget} but the pool has only {len(pool['labels'])} images")
    if cfg["selection"] == "targeted" and cfg["knn_k"] > len(pool["labels"]):
      raise ValueError(f"--knn_k={cfg['knn_k']} is larger than the pool ({len(pool['labels'])} images)")
    perm = np.random.default_rng(0).permutation(len(target_all["labels"]))
    num_targets = int(round(cfg["target_fraction"] * len(perm)))
    if not 0 < num_targets < len(perm):
      raise ValueError(f"target split of {len(perm)} images cannot be cut at fraction {cfg['target_fraction']}")
    targets = {k: v[np.sort(perm[:num_targets])] for k, v in target_all.items()}
    evaluation = {k: v[np.sort(perm[num_targets:])] for k, v in target_all.items()}

    text = features_lib.prompt_features(params, config, tokenizer, pool_split.classnames, pool_split.template)
    problem = active.Problem(text, posts["txt"], float(np.asarray(params["logit_scale"])),
                             vlm.logit_bias_of(params) if "logit_bias" in params else None)
    head0 = active.head_from_params(params, config)
    pool_offset = active.embedding_offset(head0, pool["pre_projection"], pool["embeddings"])
    eval_offset = active.embedding_offset(head0, evaluation["pre_projection"], evaluation["embeddings"])
    n = float(cfg["pseudo_data_count"])
    lam = bayesvlm.parse_prior_precision(cfg["prior_precision"])
    lam_img = lams["img"] if lam == "stored" else lam
    settings = dict(pseudo_data_count=n, prior_precision=lam_img, evidence_mode=cfg["evidence_mode"])
    zero_shot = active.evaluate_head(head0, factors["img"], problem, evaluation, eval_offset, **settings)
    print(f"pool {len(pool['labels'])} ({pool_split.dataset}/{pool_split.split}), targets {num_targets}, "
          f"eval {len(evaluation['labels'])} ({target_split.dataset}/{target_split.split})")
    print(f"zero-shot: MAP acc {100 * zero_shot['map']['accuracy']:.2f}%  nlpd {zero_shot['map']['nlpd']:.4f}  "
          f"ece {zero_shot['map']['ece']:.4f} | BayesVLM acc {100 * zero_shot['bayes']['accuracy']:.2f}%  "
          f"nlpd {zero_shot['bayes']['nlpd']:.4f}  ece {zero_shot['bayes']['ece']:.4f}")

    writer = ResultsWriter(run_dir, title=f"BayesVLM active learning: {cfg['pool_dataset']} -> "
                                          f"{cfg['target_dataset']} ({cfg['selection']}, rounds={cfg['rounds']})",
                           row_label="acquisition", average=False)
    curves: dict[str, dict[int, list[dict]]] = {}
    selections = {}
    step = 0
    for acq in cfg["acquisitions"]:
      curves[acq] = {b: [] for b in sorted(cfg["budgets"])}
      for seed in cfg["seeds"]:
        t0 = time.time()
        key_select, key_tune = jax.random.split(jax.random.key(seed))
        sel = active.select(
          acq, key_select, head=head0, factors=factors["img"], problem=problem, pool=pool,
          pool_offset=pool_offset, targets=targets, budget=max_budget, selection=cfg["selection"],
          knn_k=cfg["knn_k"], knn_metric=cfg["knn_metric"], rounds=cfg["rounds"],
          hessian_update_scale=cfg["hessian_update_scale"], online_lr=cfg["online_lr"],
          num_samples=cfg["al_num_samples"], epig_targets=cfg["epig_targets"], mesh=mesh, **settings)
        selections[f"{acq}/seed{seed}"] = sel.indices.tolist()
        for budget in sorted(cfg["budgets"]):
          idx = sel.indices[:budget]
          updated = laplace.rank_one_update(factors["img"], pool["pre_projection"][idx],
                                            scale=cfg["hessian_update_scale"], add_bias=head0.add_bias)
          head, final_loss = active.finetune_head(
            head0, pool["pre_projection"][idx], pool_offset[idx], pool["labels"][idx], problem,
            jax.random.fold_in(key_tune, budget), learning_rate=cfg["finetune_lr"],
            weight_decay=cfg["finetune_weight_decay"], epochs=cfg["finetune_epochs"],
            batch_size=cfg["finetune_batch_size"])
          result = active.evaluate_head(head, updated, problem, evaluation, eval_offset, **settings)
          row = {**result["map"], **{f"bayes_{k}": v for k, v in result["bayes"].items()},
                 "classes_covered": float(len(np.unique(pool["labels"][idx])))}
          curves[acq][budget].append(row)
          writer.add(acq, seed, {k: row[k] for k in ("accuracy", "nlpd", "ece", "bayes_accuracy", "bayes_nlpd")},
                     split=f"n={budget}")
          rd.write_scalars(step, {"seed": seed, "budget": budget, f"{acq}/accuracy": row["accuracy"],
                                  f"{acq}/bayes_accuracy": row["bayes_accuracy"], f"{acq}/nlpd": row["nlpd"],
                                  "final_loss": final_loss})
          step += 1
        logging.info("%s seed %d: %.1fs", acq, seed, time.time() - t0)
        print(f"{acq:>8s} seed {seed}: " + "  ".join(
          f"n={b}: {100 * curves[acq][b][-1]['accuracy']:.2f}%" for b in sorted(cfg["budgets"])))
    rd.write_json("selections.json", selections)
    rd.write_json("zero_shot.json", zero_shot)
  paths = writer.write()
  table = curves_markdown(curves, zero_shot, cfg)
  budgets = sorted(cfg["budgets"])
  plot = {acq: (budgets, [np.mean([r["accuracy"] for r in per[b]]) for b in budgets],
                [np.std([r["accuracy"] for r in per[b]], ddof=1) if len(per[b]) > 1 else 0.0 for b in budgets])
          for acq, per in curves.items()}
  if rd.writes:  # process 0 only
    (run_dir / "curves.md").write_text(table)
    plots.curves_png(run_dir / "curves.png", plot, xlabel="labelled pool images", ylabel="accuracy (MAP, eval)",
                     title=f"{cfg['pool_dataset']} -> {cfg['target_dataset']}",
                     baseline=zero_shot["map"]["accuracy"])
  print(table)
  print(f"wrote {', '.join(paths.values())}, {run_dir / 'curves.png'} ({time.time() - started:.1f}s)")
  return {"zero_shot": zero_shot, "curves": curves, "selections": selections}


def curves_markdown(curves: dict, zero_shot: dict, cfg: dict) -> str:
  """Accuracy (MAP and BayesVLM) and NLPD per acquisition × budget, mean ± std over seeds."""
  import numpy as np

  budgets = sorted(cfg["budgets"])
  lines = [f"# Active learning curves ({cfg['pool_dataset']} -> {cfg['target_dataset']}, seeds {cfg['seeds']})",
           "", f"zero-shot: MAP {100 * zero_shot['map']['accuracy']:.2f}% / BayesVLM "
           f"{100 * zero_shot['bayes']['accuracy']:.2f}%", ""]
  for metric, scale in (("accuracy", 100.0), ("bayes_accuracy", 100.0), ("nlpd", 1.0), ("bayes_nlpd", 1.0)):
    lines += [f"## {metric}", "", "| acquisition | " + " | ".join(f"n={b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for acq, per in curves.items():
      cells = []
      for b in budgets:
        values = np.asarray([r[metric] for r in per[b]]) * scale
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        cells.append(f"{values.mean():.2f} ± {std:.2f}")
      lines.append(f"| {acq} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  mesh = common.mesh_from_flags()  # first: jax.distributed must start before anything touches a device
  out = run(config_from_flags(), bayesvlm.checked_run_dir("active_learning"), mesh=mesh)
  logging.info("done: %s", json.dumps({"zero_shot": out["zero_shot"]}))


if __name__ == "__main__":
  common.run_binary(main)
