"""The BayesVLM active-learning experiment: label pool images chosen for a target domain, fine-tune the image
projection, and record accuracy / NLPD / ECE curves over label budgets (MAP and BayesVLM).

Pool = cfg["pool_dataset"]/["pool_split"] (labels revealed only when selected), or a mix of splits
(cfg["pool_sources"], bayesprompt.data.pool: e.g. mostly other domains and classes than the target's; images of
classes outside the target's label set (cfg["target_classes"]) cost budget and add no label); the target split is cut (seeded,
fixed across seeds) into unlabelled targets (["target_fraction"]; used by EPIG and targeted selection) and the
evaluation set. For every acquisition and seed one ordered selection of max(budgets) points is made
(`active.select`); for every budget b the image projection is fine-tuned on the first b points and evaluated.
`cfg` is the binary's flag dict (experiments/bayesvlm_flags.py).
"""

from __future__ import annotations

import os
import pathlib
import time

import jax
import numpy as np
from absl import logging

from bayesprompt.bayes import laplace
from bayesprompt.bayesvlm import active, vlm, zeroshot
from bayesprompt.bayesvlm import factors as factors_lib
from bayesprompt.bayesvlm import features as features_lib
from bayesprompt.data import pool as pool_lib
from bayesprompt.data import protocols, sources
from bayesprompt.errors import UserError
from bayesprompt.eval import plots
from bayesprompt.eval.results import ResultsWriter
from bayesprompt.train.run_dir import RunDir

RUNLOCAL = {"pool_size": 64, "max_targets": 48, "budgets": [4, 8], "seeds": [0], "al_num_samples": 8,
            "finetune_epochs": 2, "epig_targets": 16}


def _open(cfg: dict, name: str, split_name: str) -> sources.LabeledSplit:
  split = sources.open_split(name, split_name, data_dir=cfg["data_dir"], source=cfg["source"],
                             label_cache_dir=cfg["label_cache_dir"])
  if len(split) == 0:
    raise ValueError(f"{name}/{split_name} is empty")
  return split


def _extract(cfg, split, config, params, feature_dir, fingerprint):
  return features_lib.extract_split_features(
    params, config, split, cache_dir=feature_dir, batch_size=cfg["eval_batch_size"], progress=cfg["progress"],
    num_threads=cfg["num_threads"], model_fingerprint=fingerprint, description=f"{split.dataset}/{split.split}")


def build_pool(cfg, target_classnames, config, params, feature_dir, fingerprint):
  """(the composed pool, its features {"pre_projection" [N, d_in], "embeddings" [N, D], "labels" int64 [N]}):
  --pool_sources, or the single on-target source --pool_dataset/--pool_split (--pool_size images). Labels are
  in the target's label set, pool.OFF_LABEL_SET for classes it does not have."""
  if cfg["pool_sources"]:
    pool_sources = pool_lib.parse_pool_sources(cfg["pool_sources"])
    if cfg["runlocal"]:
      pool_sources = pool_lib.scale_counts(pool_sources, RUNLOCAL["pool_size"])
    splits = [_open(cfg, s.dataset, s.split) for s in pool_sources]
  else:
    splits = [_open(cfg, cfg["pool_dataset"], cfg["pool_split"])]
    count = len(splits[0]) if cfg["pool_size"] is None else min(cfg["pool_size"], len(splits[0]))
    pool_sources = [pool_lib.PoolSource(cfg["pool_dataset"], cfg["pool_split"], count, on_target=True)]
  composed = pool_lib.compose_pool(splits, pool_sources, target_classnames, seed=0)
  parts = [_extract(cfg, part, config, params, feature_dir, fingerprint) for part in composed.splits]
  feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "labels"}
  feats["labels"] = composed.labels
  return composed, feats


def check_settings(cfg: dict) -> None:
  """Bad flag combinations raise before any work (ValueError naming the flag)."""
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


def run_active_learning(cfg: dict, run_dir: str | os.PathLike, mesh=None) -> dict:
  """The binary; returns {"zero_shot": metrics, "curves": {acquisition: {budget: [per-seed metrics]}},
  "selections": {"<acquisition>/seed<s>": pool indices}, "pool": the pool.ComposedPool}.

  `mesh` (common.mesh_from_flags; None: one device): EPIG scoring and factor estimation data-parallel.
  """
  if cfg["runlocal"]:
    cfg = {**cfg, **{k: v for k, v in RUNLOCAL.items() if k != "max_targets"},
           "pool_size": min(cfg["pool_size"] or RUNLOCAL["pool_size"], RUNLOCAL["pool_size"]),
           "budgets": [b for b in RUNLOCAL["budgets"]], "max_examples": RUNLOCAL["max_targets"]}
  check_settings(cfg)
  run_dir = pathlib.Path(run_dir)
  started = time.time()
  config, params, tokenizer = factors_lib.load_model(cfg)
  fingerprint = features_lib.params_fingerprint(params)
  feature_dir = zeroshot.feature_cache_dir(cfg, run_dir)
  with RunDir(run_dir, cfg, tensorboard=False) as rd:
    posts, lams, _, factors = factors_lib.posteriors(cfg, config, params, tokenizer, run_dir, fingerprint,
                                                     mesh=mesh)
    target_split = protocols.subsample_classes(_open(cfg, cfg["target_dataset"], cfg["target_split"]),
                                               cfg["target_classes"])
    if cfg["max_examples"] is not None and cfg["max_examples"] < len(target_split):
      target_split = target_split.select(np.sort(np.random.default_rng(0).choice(
        len(target_split), cfg["max_examples"], replace=False)))
    target_all = _extract(cfg, target_split, config, params, feature_dir, fingerprint)
    composed, pool = build_pool(cfg, target_split.classnames, config, params, feature_dir, fingerprint)
    composition = pool_lib.composition_markdown(composed)
    print(f"pool make-up (target {target_split.dataset}/{target_split.split}, {target_split.num_classes} "
          f"classes):\n{composition}")
    max_budget = max(cfg["budgets"])
    if max_budget > len(pool["labels"]):
      raise UserError(f"--budgets up to {max_budget} but the pool has only {len(pool['labels'])} images")
    if cfg["selection"] == "targeted" and cfg["knn_k"] > len(pool["labels"]):
      raise UserError(f"--knn_k={cfg['knn_k']} is larger than the pool ({len(pool['labels'])} images)")
    perm = np.random.default_rng(0).permutation(len(target_all["labels"]))
    num_targets = int(round(cfg["target_fraction"] * len(perm)))
    if not 0 < num_targets < len(perm):
      raise ValueError(f"target split of {len(perm)} images cannot be cut at fraction {cfg['target_fraction']}")
    targets = {k: v[np.sort(perm[:num_targets])] for k, v in target_all.items()}
    evaluation = {k: v[np.sort(perm[num_targets:])] for k, v in target_all.items()}

    text = features_lib.prompt_features(params, config, tokenizer, target_split.classnames,
                                        target_split.template)
    problem = active.Problem(text, posts["txt"], float(np.asarray(params["logit_scale"])),
                             vlm.logit_bias_of(params) if "logit_bias" in params else None)
    head0 = active.head_from_params(params, config)
    pool_offset = active.embedding_offset(head0, pool["pre_projection"], pool["embeddings"])
    eval_offset = active.embedding_offset(head0, evaluation["pre_projection"], evaluation["embeddings"])
    n = float(cfg["pseudo_data_count"])
    lam = factors_lib.parse_prior_precision(cfg["prior_precision"])
    lam_img = lams["img"] if lam == "stored" else lam
    settings = dict(pseudo_data_count=n, prior_precision=lam_img, evidence_mode=cfg["evidence_mode"])
    zero_shot = active.evaluate_head(head0, factors["img"], problem, evaluation, eval_offset, **settings)
    print(f"pool {len(pool['labels'])} ({', '.join(s.name for s in composed.sources)}), targets {num_targets}, "
          f"eval {len(evaluation['labels'])} ({target_split.dataset}/{target_split.split})")
    print(f"zero-shot: MAP acc {100 * zero_shot['map']['accuracy']:.2f}%  nlpd {zero_shot['map']['nlpd']:.4f}  "
          f"ece {zero_shot['map']['ece']:.4f} | BayesVLM acc {100 * zero_shot['bayes']['accuracy']:.2f}%  "
          f"nlpd {zero_shot['bayes']['nlpd']:.4f}  ece {zero_shot['bayes']['ece']:.4f}")

    writer = ResultsWriter(run_dir, title=f"BayesVLM active learning: {cfg['pool_dataset']} -> "
                                          f"{cfg['target_dataset']} ({cfg['selection']}, rounds={cfg['rounds']})")
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
          hessian_update_product=cfg.get("hessian_update_product", "outer"),
          num_samples=cfg["al_num_samples"], epig_targets=cfg["epig_targets"], mesh=mesh, **settings)
        selections[f"{acq}/seed{seed}"] = sel.indices.tolist()
        for budget in sorted(cfg["budgets"]):
          idx = sel.indices[:budget]
          # Picks of classes the target does not have cost budget and teach nothing (bayesprompt.data.pool).
          usable = idx[pool["labels"][idx] != pool_lib.OFF_LABEL_SET]
          head, updated, final_loss = head0, factors["img"], 0.0
          if len(usable):
            updated = laplace.rank_one_update(factors["img"], pool["pre_projection"][usable],
                                              scale=cfg["hessian_update_scale"], add_bias=head0.add_bias,
                                              product=cfg.get("hessian_update_product", "outer"))
            head, final_loss = active.finetune_head(
              head0, pool["pre_projection"][usable], pool_offset[usable], pool["labels"][usable], problem,
              jax.random.fold_in(key_tune, budget), learning_rate=cfg["finetune_lr"],
              weight_decay=cfg["finetune_weight_decay"], epochs=cfg["finetune_epochs"],
              batch_size=cfg["finetune_batch_size"])
          result = active.evaluate_head(head, updated, problem, evaluation, eval_offset, **settings)
          row = {**result["map"], **{f"bayes_{k}": v for k, v in result["bayes"].items()},
                 "classes_covered": float(len(np.unique(pool["labels"][usable]))),
                 **pool_lib.selection_make_up(composed, idx)}
          curves[acq][budget].append(row)
          writer.add(acq, seed, {k: row[k] for k in ("accuracy", "nlpd", "ece", "bayes_accuracy", "bayes_nlpd",
                                                     "on_target")}, split=f"n={budget}")
          rd.write_scalars(step, {"seed": seed, "budget": budget, f"{acq}/accuracy": row["accuracy"],
                                  f"{acq}/bayes_accuracy": row["bayes_accuracy"], f"{acq}/nlpd": row["nlpd"],
                                  f"{acq}/on_target": row["on_target"], "final_loss": final_loss})
          step += 1
        logging.info("%s seed %d: %.1fs", acq, seed, time.time() - t0)
        print(f"{acq:>8s} seed {seed}: " + "  ".join(
          f"n={b}: {100 * curves[acq][b][-1]['accuracy']:.2f}% ({100 * curves[acq][b][-1]['on_target']:.0f}% "
          "on target)" for b in sorted(cfg["budgets"])))
    rd.write_json("selections.json", selections)
    rd.write_json("zero_shot.json", zero_shot)
    rd.write_json("pool.json", pool_lib.composition_rows(composed))
  paths = writer.write()
  table = curves_markdown(curves, zero_shot, cfg, composition)
  budgets = sorted(cfg["budgets"])

  def mean_std(metric):  # {acquisition: (budgets, mean over seeds, sample std)} of one row entry
    return {acq: (budgets, [np.mean([r[metric] for r in per[b]]) for b in budgets],
                  [np.std([r[metric] for r in per[b]], ddof=1) if len(per[b]) > 1 else 0.0 for b in budgets])
            for acq, per in curves.items()}

  title = (f"pool of {len(composed)} ({100 * (1 - composed.on_target.mean()):.0f}% off target), "
           f"{cfg['selection']} selection\n-> {cfg['target_dataset']} ({cfg['target_classes']} classes)")
  if rd.writes:  # process 0 only
    (run_dir / "curves.md").write_text(table)
    plots.curves_png(run_dir / "curves.png", mean_std("accuracy"), xlabel="labelled pool images",
                     ylabel="accuracy (MAP, eval)", title=title, baseline=zero_shot["map"]["accuracy"])
    plots.curves_png(run_dir / "on_target.png", mean_std("on_target"), xlabel="labelled pool images",
                     ylabel="share of on-target picks", title=title,
                     baseline=float(composed.on_target.mean()), baseline_label="share in the pool")
  print(table)
  print(f"wrote {', '.join(paths.values())}, {run_dir / 'curves.png'}, {run_dir / 'on_target.png'} "
        f"({time.time() - started:.1f}s)")
  return {"zero_shot": zero_shot, "curves": curves, "selections": selections, "pool": composed}


def curves_markdown(curves: dict, zero_shot: dict, cfg: dict, composition: str = "") -> str:
  """Accuracy, NLPD and ECE (MAP and BayesVLM) and the share of on-target picks per acquisition × budget,
  mean ± std over seeds; `composition` (the pool's make-up, markdown) goes on top."""
  budgets = sorted(cfg["budgets"])
  pool = ", ".join(cfg["pool_sources"]) or f"{cfg['pool_dataset']}/{cfg['pool_split']}"
  lines = [f"# Active learning curves ({pool} -> {cfg['target_dataset']} ({cfg['target_classes']} classes), "
           f"{cfg['selection']} selection, seeds {cfg['seeds']})", ""]
  if composition:
    lines += ["## pool", "", composition, ""]
  lines += [f"zero-shot: MAP {100 * zero_shot['map']['accuracy']:.2f}% (NLPD {zero_shot['map']['nlpd']:.3f}, "
            f"ECE {zero_shot['map']['ece']:.3f}) / BayesVLM {100 * zero_shot['bayes']['accuracy']:.2f}% "
            f"(NLPD {zero_shot['bayes']['nlpd']:.3f}, ECE {zero_shot['bayes']['ece']:.3f})", ""]
  for metric, scale in (("accuracy", 100.0), ("bayes_accuracy", 100.0), ("nlpd", 1.0), ("bayes_nlpd", 1.0),
                        ("ece", 1.0), ("bayes_ece", 1.0), ("on_target", 100.0), ("labelled", 100.0)):
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
  first = next(iter(curves.values()))[budgets[-1]][0]
  by_source = [k for k in first if k.startswith("from ")]
  lines += [f"## picks by source (%, n={budgets[-1]})", "", "| acquisition | " + " | ".join(by_source) + " |",
            "|---|" + "---|" * len(by_source)]
  for acq, per in curves.items():
    values = 100 * np.asarray([[r[k] for k in by_source] for r in per[budgets[-1]]])  # [seeds, sources]
    std = values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(by_source))
    lines.append(f"| {acq} | " + " | ".join(f"{m:.1f} ± {d:.1f}" for m, d in zip(values.mean(0), std,
                                                                                 strict=True)) + " |")
  return "\n".join(lines) + "\n"
