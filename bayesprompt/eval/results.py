"""Aggregate per-seed results into the tables the field reports: markdown + CSV + JSON in a run directory.

Each run adds rows (dataset, split, seed, {metric: value}); split is "all", "base", "new", or any eval
name. The summary has, per (dataset, split, metric), the mean and sample standard deviation (ddof=1; 0
for a single seed) over seeds. Base-to-new, as CoOp's `parse_test_res.py` and every paper after it:
  - per dataset, split "hm": HM(mean base accuracy, mean new accuracy) -- the HM of the means, not the
    mean of per-seed HMs (whose spread is reported as its std);
  - the "average" row over datasets: the mean of each dataset's mean, and its "hm" is HM(average base,
    average new) -- not the mean of the per-dataset HMs.

Multi-process runs: every process may collect rows (they hold the same values); only process 0 writes.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
from collections.abc import Mapping

import numpy as np

AVERAGE = "average"
HM_SPLIT = "hm"
_ACCURACY_METRICS = ("accuracy",)


def _hm(a: float, b: float) -> float:
  return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _mean_std(values: list[float]) -> tuple[float, float]:
  array = np.asarray(values, dtype=np.float64)
  return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _is_primary_process() -> bool:
  import jax  # lazily: aggregating tables needs no accelerator runtime

  return jax.process_index() == 0


def column_order(rows: list[dict]) -> list[tuple[str, str]]:
  """The (split, metric) columns of summary rows in table order: accuracy first, then metrics by name;
  within a metric base, new, hm, then the other splits by name (the console and markdown tables agree)."""
  split_order = {"base": 0, "new": 1, HM_SPLIT: 2}
  return sorted(
    dict.fromkeys((r["split"], r["metric"]) for r in rows),
    key=lambda c: (c[1] not in _ACCURACY_METRICS, c[1], split_order.get(c[0], 3), c[0]),
  )


def table_footnote(rows: list[dict], seeds: list[int]) -> str:
  """What ±, HM and "average" mean in a table of summary `rows` — only the ones the table has."""
  parts = []
  own = [r for r in rows if r["dataset"] != AVERAGE]
  if any(r["num_seeds"] > 1 for r in own):
    parts.append(f"Mean ± sample std (ddof=1) over {len(seeds)} seeds {seeds}.")
  if any(r["split"] == HM_SPLIT for r in own):
    parts.append("HM = harmonic mean of the mean base and the mean new accuracy (the std beside it: of the "
                 "per-seed HMs).")
  average = [r for r in rows if r["dataset"] == AVERAGE]
  if average:
    hm = any(r["split"] == HM_SPLIT for r in average)
    parts.append("The average row: mean over datasets" +
                 ("; its HM = HM of the averaged base and new accuracies." if hm else "."))
  return " ".join(parts)


class ResultsWriter:
  """Collects per-seed metrics and writes results.{md,csv,json} into `run_dir`."""

  def __init__(self, run_dir: str | os.PathLike, title: str = "Results", *, write: bool | None = None,
               row_label: str = "dataset", average: bool = True):
    """`write`: whether `write()` writes files (default: only on JAX process 0; the others return the paths
    without touching the file system). `row_label`: the markdown header of the row column (what the rows
    are: "dataset", or "variant" when rows are methods on one dataset). `average`: add the "average" row
    over rows (meaningful across datasets; off when rows are variants: averaging CE with OVE-PG means
    nothing)."""
    self.run_dir = os.fspath(run_dir)
    self.title = title
    self._write = write
    self.row_label = row_label
    self._average = average
    self._rows: dict[tuple[str, str, int], dict[str, float]] = {}

  def add(self, dataset: str, seed: int, metrics: Mapping[str, float], split: str = "all") -> None:
    """Records one run's metrics; adding the same (dataset, split, seed) twice is an error."""
    if not isinstance(dataset, str) or not dataset or dataset == AVERAGE:
      raise ValueError(f"dataset must be a non-empty name other than {AVERAGE!r}, got {dataset!r}")
    if split == HM_SPLIT:
      raise ValueError(f"split {HM_SPLIT!r} is computed from 'base' and 'new'; add those instead")
    if not metrics:
      raise ValueError(f"no metrics given for {dataset}/{split} seed {seed}")
    key = (dataset, split, int(seed))
    if key in self._rows:
      raise ValueError(f"results for {dataset}/{split} seed {seed} were already added")
    values = {}
    for name, value in metrics.items():
      value = float(value)
      if not math.isfinite(value):
        raise ValueError(
          f"metric {name!r} of {dataset}/{split} seed {seed} is {value}; expected a finite number"
        )
      values[str(name)] = value
    self._rows[key] = values

  # ------------------------------------------------------------------------------------------------------

  def summary(self) -> list[dict]:
    """Rows {dataset, split, metric, mean, std, num_seeds}, datasets in insertion order, then "average"."""
    per_key: dict[tuple[str, str, str], dict[int, float]] = collections.defaultdict(dict)
    for (dataset, split, seed), metrics in self._rows.items():
      for metric, value in metrics.items():
        per_key[(dataset, split, metric)][seed] = value

    rows = []
    for (dataset, split, metric), by_seed in per_key.items():
      mean, std = _mean_std(list(by_seed.values()))
      rows.append(
        dict(dataset=dataset, split=split, metric=metric, mean=mean, std=std, num_seeds=len(by_seed))
      )
    rows.extend(self._hm_rows(per_key))
    if self._average:
      rows.extend(self._average_rows(rows))
    return rows

  @staticmethod
  def _hm_rows(per_key) -> list[dict]:
    rows = []
    datasets = dict.fromkeys(d for d, _, _ in per_key)
    for dataset in datasets:
      for metric in _ACCURACY_METRICS:
        base, new = per_key.get((dataset, "base", metric)), per_key.get((dataset, "new", metric))
        if not base or not new:
          continue
        seeds = sorted(set(base) & set(new))
        per_seed = [_hm(base[s], new[s]) for s in seeds]
        _, std = _mean_std(per_seed) if per_seed else (0.0, 0.0)
        mean = _hm(_mean_std(list(base.values()))[0], _mean_std(list(new.values()))[0])
        rows.append(
          dict(dataset=dataset, split=HM_SPLIT, metric=metric, mean=mean, std=std, num_seeds=len(seeds))
        )
    return rows

  @staticmethod
  def _average_rows(rows: list[dict]) -> list[dict]:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    if len(datasets) < 2:
      return []
    means: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for r in rows:
      if r["split"] != HM_SPLIT:
        means[(r["split"], r["metric"])].append(r["mean"])
    out = []
    for (split, metric), values in means.items():
      out.append(
        dict(
          dataset=AVERAGE,
          split=split,
          metric=metric,
          mean=float(np.mean(values)),
          std=float("nan"),
          num_seeds=len(values),
        )
      )
    for metric in _ACCURACY_METRICS:
      base, new = means.get(("base", metric)), means.get(("new", metric))
      if base and new:
        out.append(
          dict(
            dataset=AVERAGE,
            split=HM_SPLIT,
            metric=metric,
            mean=_hm(float(np.mean(base)), float(np.mean(new))),
            std=float("nan"),
            num_seeds=min(len(base), len(new)),
          )
        )
    return out

  # ------------------------------------------------------------------------------------------------------

  def markdown(self) -> str:
    """A table: one row per dataset (then "average"), one column per (split, metric): mean ± std.
    Accuracies in percent."""
    rows = self.summary()
    if not rows:
      return f"# {self.title}\n\n(no results)\n"
    columns = column_order(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    cell = {(r["dataset"], r["split"], r["metric"]): r for r in rows}

    def fmt(r: dict | None) -> str:
      if r is None:
        return ""
      scale, digits = (100.0, 2) if r["metric"] in _ACCURACY_METRICS else (1.0, 4)
      text = f"{r['mean'] * scale:.{digits}f}"
      if math.isfinite(r["std"]) and r["num_seeds"] > 1:
        text += f" ± {r['std'] * scale:.{digits}f}"
      return text

    header = [self.row_label] + [
      f"{split} {metric}" + (" (%)" if metric in _ACCURACY_METRICS else "") for split, metric in columns
    ]
    lines = [f"# {self.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in datasets:
      lines.append("| " + " | ".join([dataset] + [fmt(cell.get((dataset, s, m))) for s, m in columns]) + " |")
    footer = table_footnote(rows, sorted({seed for _, _, seed in self._rows}))
    lines += ["", footer, ""] if footer else [""]
    return "\n".join(lines)

  def to_json(self) -> dict:
    runs = [dict(dataset=d, split=s, seed=seed, metrics=m) for (d, s, seed), m in self._rows.items()]
    summary = [{**r, "std": r["std"] if math.isfinite(r["std"]) else None} for r in self.summary()]
    return {"title": self.title, "runs": runs, "summary": summary}

  def write(self) -> dict[str, str]:
    """Writes results.md, results.csv (the summary) and results.json (runs + summary); returns the paths
    (on processes other than 0 nothing is written)."""
    paths = {ext: os.path.join(self.run_dir, f"results.{ext}") for ext in ("md", "csv", "json")}
    if not (_is_primary_process() if self._write is None else self._write):
      return paths
    os.makedirs(self.run_dir, exist_ok=True)
    with open(paths["md"], "w", encoding="utf-8") as f:
      f.write(self.markdown())
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["dataset", "split", "metric", "mean", "std", "num_seeds"])
      writer.writeheader()
      for r in self.summary():
        writer.writerow({**r, "std": "" if not math.isfinite(r["std"]) else r["std"]})
    with open(paths["json"], "w", encoding="utf-8") as f:
      json.dump(self.to_json(), f, indent=1)
    return paths


def read_summary_cell(results_json: str | os.PathLike, split: str, *, variant: str | None = None,
                      metric: str = "accuracy") -> tuple[float, float]:
  """(mean, std) of one cell of a written table (a run directory's results.json, `summary` rows).

  `variant`: the row (`dataset` field of the summary, e.g. "coop+ce"); None: the table must have exactly one
  row besides "average". Raises ValueError naming what is missing (the file, the row or the split)."""
  path = os.fspath(results_json)
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: expected a run directory's results.json")
  with open(path) as f:
    rows = json.load(f)["summary"]
  variants = list(dict.fromkeys(r["dataset"] for r in rows if r["dataset"] != AVERAGE))
  if variant is None:
    if len(variants) != 1:
      raise ValueError(f"{path} holds {len(variants)} rows {variants}: name the variant")
    variant = variants[0]
  for row in rows:
    if row["dataset"] == variant and row["split"] == split and row["metric"] == metric:
      return float(row["mean"]), float(row["std"])
  raise ValueError(f"{path} has no {metric} of {variant!r} on split {split!r}; rows: {variants}")
