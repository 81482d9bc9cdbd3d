"""PNG figures of the experiments (matplotlib, Agg backend: no display needed).

* `reliability_png` — reliability diagrams (accuracy vs confidence per equal-width bin, the ECE's bins from
  `metrics.reliability_diagram`) of several predictives side by side, with their ECE in the titles.
* `curves_png` — mean ± std curves over seeds (e.g. active-learning accuracy vs number of labels).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from bayesprompt.eval import metrics as metrics_lib


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def reliability_png(
  path: str | os.PathLike,
  predictives: Mapping[str, np.ndarray],
  labels: np.ndarray,
  *,
  title: str = "",
  num_bins: int = metrics_lib.DEFAULT_NUM_BINS,
) -> dict[str, dict[str, np.ndarray]]:
  """Writes one reliability panel per predictive (name -> probabilities [N, C]) to `path` (PNG).

  Returns:
    {name: the bin statistics plotted (`metrics.reliability_diagram`: count, confidence, accuracy, edges)}.
  """
  if not predictives:
    raise ValueError("reliability_png needs at least one predictive")
  plt = _pyplot()
  names = list(predictives)
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
  stats = {}
  for ax, name in zip(axes[0], names, strict=True):
    probs = np.asarray(predictives[name], np.float32)
    diagram = {k: np.asarray(v) for k, v in metrics_lib.reliability_diagram(probs, labels, num_bins).items()}
    ece = float(metrics_lib.ece(probs, labels, num_bins))
    stats[name] = diagram
    edges = diagram["edges"]
    centers, width = 0.5 * (edges[:-1] + edges[1:]), edges[1] - edges[0]
    filled = diagram["count"] > 0
    ax.bar(centers[filled], diagram["accuracy"][filled], width=width, edgecolor="black", label="accuracy")
    ax.bar(centers[filled], (diagram["confidence"] - diagram["accuracy"])[filled],
           bottom=diagram["accuracy"][filled], width=width, color="red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{name}  ECE {ece:.4f}")
    ax.legend(loc="upper left")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  plt.close(fig)
  return stats


def curves_png(
  path: str | os.PathLike,
  curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
  *,
  xlabel: str,
  ylabel: str,
  title: str = "",
  baseline: float | None = None,
  baseline_label: str = "zero-shot",
) -> None:
  """Writes mean ± std curves: curves[name] = (x, mean, std), each of the same length; optional baseline (a
  horizontal line named `baseline_label`)."""
  if not curves:
    raise ValueError("curves_png needs at least one curve")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (x, mean, std) in curves.items():
    x, mean, std = (np.asarray(v, np.float64) for v in (x, mean, std))
    if not x.shape == mean.shape == std.shape:
      raise ValueError(f"curve {name!r}: x {x.shape}, mean {mean.shape}, std {std.shape} differ")
    ax.plot(x, mean, marker="o", label=name)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  if baseline is not None:
    ax.axhline(baseline, color="gray", linestyle="--", label=baseline_label)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  plt.close(fig)
