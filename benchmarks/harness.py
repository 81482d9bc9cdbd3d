"""The timing harness every benchmark uses: comparisons that cannot flatter either side.

One way to time implementations against each other (issue 19):
  * the machine's load average (1 min) is read before and after, with the number of schedulable cores;
  * the candidates run in **interleaved rounds** (each round calls every candidate once, the order rotating
    from round to round), so drift in the machine's load hits all of them alike;
  * every call records wall time, the process's CPU time (`time.process_time`: user + system of all threads
    of this process, i.e. the worker threads of XLA and of torch's OpenMP pool too) and minor page faults;
  * results are reported as min / median / max over rounds, and ratios as the median of per-round ratios
    (a candidate over the reference of the same round) with their min–max;
  * the **headline** metric is CPU time when the load average exceeded the core count before or after (the
    wall time is then inflated by other jobs at random), wall time otherwise; `Comparison.note()` says which
    and why. On an accelerator (`accelerator=True`) the headline is always wall time: what the device does
    is not process CPU time; the load is still recorded (it slows the host's dispatch).

  comparison = harness.interleaved({"torch": run_torch, "jax": run_jax}, rounds=5, warmup=1)
  print(comparison.markdown(reference="torch"))
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

METRICS = ("wall", "cpu")


def load_average() -> float:
  """The 1-minute load average of the machine (runnable + uninterruptible tasks, all users)."""
  return os.getloadavg()[0]


def schedulable_cores() -> int:
  """Cores this process may run on (its affinity mask; XLA:CPU sizes its intra-op pool from it)."""
  return len(os.sched_getaffinity(0))


def cpu_description() -> str:
  """CPU model, the SIMD extensions that matter for GEMMs, and the cores this process may use."""
  model, have = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model == "unknown CPU":
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not have:
          have = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  simd = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
  return (f"{model} ({simd}), nproc={os.cpu_count()}, using {schedulable_cores()} core(s); "
          f"{platform.python_implementation()} {platform.python_version()}")


@dataclasses.dataclass(frozen=True)
class Spread:
  """min / median / max of one metric over rounds (seconds, or a ratio)."""

  min: float
  median: float
  max: float

  @classmethod
  def of(cls, samples: list[float]) -> Spread:
    if not samples:
      raise ValueError("no samples: a candidate ran zero timed rounds")
    return cls(min(samples), statistics.median(samples), max(samples))

  def scaled(self, factor: float) -> Spread:
    return Spread(self.min * factor, self.median * factor, self.max * factor)

  def finite(self) -> bool:
    return all(math.isfinite(x) for x in (self.min, self.median, self.max))

  def format(self, digits: int = 1) -> str:
    """'median (min–max)'."""
    return f"{self.median:.{digits}f} ({self.min:.{digits}f}–{self.max:.{digits}f})"


@dataclasses.dataclass
class Samples:
  """Per-call measurements of one candidate, one entry per timed round."""

  wall: list[float] = dataclasses.field(default_factory=list)
  cpu: list[float] = dataclasses.field(default_factory=list)
  faults: list[int] = dataclasses.field(default_factory=list)

  def spread(self, metric: str) -> Spread:
    if metric not in (*METRICS, "faults"):
      raise ValueError(f"unknown metric {metric!r}; expected one of {(*METRICS, 'faults')}")
    return Spread.of([float(x) for x in getattr(self, metric)])


@dataclasses.dataclass
class Comparison:
  """Interleaved measurements of several candidates with the machine's load around them."""

  samples: dict[str, Samples]
  rounds: int
  warmup: int
  load_before: float
  load_after: float
  cores: int
  accelerator: bool = False

  @property
  def loaded(self) -> bool:
    """Whether other jobs competed for the cores: the load average exceeded the core count."""
    return max(self.load_before, self.load_after) > self.cores

  @property
  def headline(self) -> str:
    """'cpu' on a loaded CPU machine (wall time is then inflated at random), else 'wall'."""
    return "cpu" if (self.loaded and not self.accelerator) else "wall"

  def note(self) -> str:
    load = (f"load average {self.load_before:.1f} before, {self.load_after:.1f} after, on {self.cores} "
            f"core(s); {self.rounds} interleaved rounds after {self.warmup} warm-up call(s)")
    if self.accelerator:
      return f"{load}. Headline: wall time (device work, synchronised)."
    if self.loaded:
      spin = (" With more than one thread per framework, CPU time under oversubscription also counts the "
              "spin-waiting of worker pools whose peers are descheduled (torch's OpenMP most): compare at "
              "--threads 1 on a loaded machine.") if self.cores > 1 else ""
      return (f"{load}. The load EXCEEDED the core count: wall times are inflated by other jobs, so the "
              f"headline is process CPU time (all threads).{spin}")
    return f"{load}. Headline: wall time (the machine was not oversubscribed); CPU time beside it."

  def spread(self, name: str, metric: str | None = None) -> Spread:
    return self.samples[name].spread(metric or self.headline)

  def ratio(self, name: str, reference: str, metric: str | None = None) -> Spread:
    """Per-round ratio candidate / reference of the same round: min / median / max."""
    metric = metric or self.headline
    ours, theirs = getattr(self.samples[name], metric), getattr(self.samples[reference], metric)
    return Spread.of([a / b if b > 0 else math.inf for a, b in zip(ours, theirs, strict=True)])

  def rows(self, reference: str | None = None) -> list[dict[str, Any]]:
    """One JSON-able dict per candidate: ms spreads of wall and CPU time, page faults, ratios to `reference`."""
    out = []
    for name, samples in self.samples.items():
      row: dict[str, Any] = {"name": name}
      for metric in METRICS:
        row[f"{metric}_ms"] = dataclasses.asdict(samples.spread(metric).scaled(1e3))
      row["faults"] = statistics.median(samples.faults) if samples.faults else 0
      if reference is not None and name != reference:
        for metric in METRICS:
          row[f"{metric}_ratio"] = dataclasses.asdict(self.ratio(name, reference, metric))
      out.append(row)
    return out

  def to_json(self, reference: str | None = None) -> dict[str, Any]:
    return {"rounds": self.rounds, "warmup": self.warmup, "load_before": self.load_before,
            "load_after": self.load_after, "cores": self.cores, "headline": self.headline,
            "accelerator": self.accelerator, "note": self.note(), "candidates": self.rows(reference)}

  def markdown(self, reference: str | None = None, title: str = "implementation") -> str:
    """A Markdown table: headline metric first, ratios as per-round median (min–max)."""
    head = self.headline
    other = "wall" if head == "cpu" else "cpu"
    header = [title, f"{head} ms (headline)", f"× {reference}" if reference else "", f"{other} ms",
              f"× {reference} ({other})" if reference else "", "page faults/call"]
    lines = ["| " + " | ".join(h for h in header if h != "") + " |"]
    lines.append("|" + "---|" * len([h for h in header if h != ""]))
    for name, samples in self.samples.items():
      cells = [name, samples.spread(head).scaled(1e3).format()]
      if reference:
        cells.append("1.00" if name == reference else self.ratio(name, reference, head).format(2))
      cells.append(samples.spread(other).scaled(1e3).format())
      if reference:
        cells.append("1.00" if name == reference else self.ratio(name, reference, other).format(2))
      cells.append(f"{statistics.median(samples.faults) if samples.faults else 0:.0f}")
      lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{self.note()}\n"


def _faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(candidates: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 1,
                accelerator: bool = False) -> Comparison:
  """Times `candidates` (name -> a call that blocks until its work is done) in interleaved rounds.

  Every candidate first runs `warmup` untimed calls (compilation, allocator warm-up), then `rounds` rounds
  each call every candidate once; round r starts at candidate r mod n, so no candidate always runs first or
  right after the same neighbour. The load average is read before the warm-up and after the last round.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if not candidates:
    raise ValueError("no candidates to time")
  load_before = load_average()
  for fn in candidates.values():
    for _ in range(warmup):
      fn()
  names = list(candidates)
  samples = {name: Samples() for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start_faults, start_cpu, start = _faults(), time.process_time(), time.perf_counter()
      candidates[name]()
      wall = time.perf_counter() - start
      samples[name].cpu.append(time.process_time() - start_cpu)
      samples[name].wall.append(wall)
      samples[name].faults.append(_faults() - start_faults)
  return Comparison(samples=samples, rounds=rounds, warmup=warmup, load_before=load_before,
                    load_after=load_average(), cores=schedulable_cores(), accelerator=accelerator)


def best_of(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> tuple[float, float]:
  """(min wall s, min CPU s) of `fn()` over `repeats` calls after `warmup` untimed ones: for a single
  computation measured against a rate (a roofline), where there is no second implementation to interleave."""
  comparison = interleaved({"fn": fn}, rounds=repeats, warmup=warmup)
  return comparison.spread("fn", "wall").min, comparison.spread("fn", "cpu").min
