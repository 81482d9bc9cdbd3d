"""A hyper-parameter sweep read back from finished run directories: a markdown table and a PNG of base, new
and HM accuracy against the swept value (e.g. the OVE-PG paper's λ₁ ablation)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

from bayesprompt.errors import UserError
from bayesprompt.eval import plots
from bayesprompt.eval.results import HM_SPLIT, read_summary_cell

SPLITS = ("base", "new", HM_SPLIT)


def parse_points(points: Sequence[str]) -> list[tuple[float, pathlib.Path]]:
  """["0.1:runs/a", ...] -> [(0.1, Path("runs/a")), ...]; UserError for a malformed entry or a repeated
  value."""
  out = []
  for point in points:
    value, sep, run_dir = point.partition(":")
    try:
      x = float(value)
    except ValueError:
      x = None
    if not sep or x is None or not run_dir:
      raise UserError(f"--points entry {point!r}; expected value:run_dir, e.g. 0.2:runs/sweep/0.2")
    out.append((x, pathlib.Path(run_dir)))
  if not out:
    raise UserError("--points is empty: give at least one value:run_dir")
  values = [x for x, _ in out]
  if len(set(values)) != len(values):
    raise UserError(f"--points repeats a value: {values}")
  return out


def _variant(results_json: pathlib.Path, contains: str | None) -> str | None:
  """The one row name containing `contains` (None: let read_summary_cell require a one-row table)."""
  if contains is None:
    return None
  rows = json.loads(results_json.read_text())["summary"]
  names = list(dict.fromkeys(r["dataset"] for r in rows if contains in r["dataset"]))
  if len(names) != 1:
    raise UserError(f"{results_json}: {len(names)} rows contain {contains!r} ({names}); expected exactly one")
  return names[0]


def read_sweep(points: Sequence[str], *, variant_contains: str | None = None) -> dict[str, list[tuple]]:
  """{split: [(value, mean, std), ...] sorted by value} for split in base / new / hm (accuracy, in [0, 1])."""
  out: dict[str, list[tuple]] = {split: [] for split in SPLITS}
  for x, run_dir in parse_points(points):
    results_json = run_dir / "results.json"
    if not results_json.exists():
      raise UserError(f"{run_dir} holds no results.json: expected a finished run directory")
    variant = _variant(results_json, variant_contains)
    for split in SPLITS:
      try:
        mean, std = read_summary_cell(results_json, split, variant=variant)
      except ValueError as error:
        raise UserError(str(error)) from None
      out[split].append((x, mean, std))
  return {split: sorted(rows) for split, rows in out.items()}


def sweep_markdown(sweep: dict[str, list[tuple]], *, xlabel: str) -> str:
  """One row per value: base, new, HM as mean ± std in percent."""
  lines = [f"| {xlabel} | base | new | HM |", "|---|---|---|---|"]
  for i, (x, _, _) in enumerate(sweep["base"]):
    cells = [f"{100 * sweep[s][i][1]:.2f} ± {100 * sweep[s][i][2]:.2f}" for s in SPLITS]
    lines.append(f"| {x:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_sweep(points: Sequence[str], out: str | os.PathLike, *, variant_contains: str | None = None,
               zero_shot_run: str | os.PathLike | None = None, xlabel: str = "value", title: str = "") -> str:
  """Reads the sweep, writes the PNG at `out` (accuracy in %, one curve per split, the zero-shot HM as a
  dashed line when `zero_shot_run` is a zero-shot run directory); returns the markdown table."""
  sweep = read_sweep(points, variant_contains=variant_contains)
  curves = {split: ([x for x, _, _ in rows], [100 * m for _, m, _ in rows], [100 * s for _, _, s in rows])
            for split, rows in sweep.items()}
  baseline = None
  if zero_shot_run is not None:
    baseline = 100 * read_summary_cell(pathlib.Path(zero_shot_run) / "results.json", HM_SPLIT)[0]
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  plots.curves_png(out, curves, xlabel=xlabel, ylabel="accuracy (%)", title=title, baseline=baseline,
                   baseline_label="zero-shot HM")
  return sweep_markdown(sweep, xlabel=xlabel)
