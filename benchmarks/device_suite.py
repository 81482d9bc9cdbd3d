r"""The accelerator suite (issue 19, part B): correctness on the device, timings against PyTorch, physical limits.

One command, one process, ≤ 8 min on one GPU; writes `device_suite.md` (Markdown tables) and
`device_suite.json` (every figure, with the load, the spread over rounds and the versions) to `--out`.

(a) Correctness on the device (exit status 1 if any check fails or anything is NaN):
    * the fixture parity checks of tests/test_clip_parity.py (open_clip / transformers tiny models, read from
      `--fixtures`): float32 at precision "highest" (atol 1e-4, the project's bar), float32 at the backend's
      default matmul precision (TF32 on recent NVIDIA GPUs: max|Δ| ≤ 1e-2·max|f| off the CPU), bfloat16
      compute (max|Δ| ≤ 3e-2·max|f| and cosine ≥ 0.999, as the test);
    * Pólya-Gamma PG(1, c) sample mean and variance against the closed forms (within 5 standard errors);
    * the OVE-PG loss (corrected, ω = E[PG], teacher term) against a float64 NumPy evaluation of its formula
      with the same ε (drawn on the CPU from the documented keys);
    * KFAC with N = 1: kron(A, B) equals the exact GGN of the projection weight (float64 autodiff on the CPU).
(b) Timings at real size against PyTorch on the same device with the same weights (transformers' CLIPModel
    carrying our parameters; outputs compared before timing): ViT-B/16 image forward batch 256 (float32 and
    bfloat16), text forward 1000 prompts × 77 tokens, the CoOp train step (batch 32, C = 1000, full 77-token
    context), and the OVE-PG step against the CE step.
(c) Against the physical limit: measured matmul peaks (bf16, fp32 at default and highest precision) and copy
    bandwidth; KFAC accumulation at ViT-B/32 dimensions as a fraction of the fp32 and bf16 peaks; PG(1, c)
    draws per second at 10⁸ draws against the bandwidth floor; EPIG at pool 40k × targets 20k.

Runs without TFDS or grain (synthetic inputs, random weights). torch / transformers are optional: without them
the PyTorch columns are skipped and the reason is written in the table. `--tiny` shrinks every size so the
whole suite runs on a CPU in seconds (the default-tier test tests/test_device_suite.py runs it).

  python benchmarks/device_suite.py --out /tmp/suite                      # real sizes (a GPU)
  python benchmarks/device_suite.py --tiny --out /tmp/suite               # CPU smoke run
  python benchmarks/device_suite.py --fixtures .fixtures --out $OUT       # on the device (benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # runnable as `python benchmarks/device_suite.py` from anywhere
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

# JAX and PyTorch share the accelerator in this process: JAX must not take 75% of its memory up front.
# (Benchmark-only: the library never sets environment variables.)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import harness  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bayesprompt.clip as clip  # noqa: E402
from bayesprompt.bayes import laplace, ove  # noqa: E402
from bayesprompt.bayes.acquisition import epig  # noqa: E402
from bayesprompt.bayes.polya_gamma import sample_polya_gamma  # noqa: E402
from bayesprompt.objectives import make_objective  # noqa: E402
from bayesprompt.prompts import make_learner  # noqa: E402
from bayesprompt.train import optim, prompt_trainer  # noqa: E402

FIXTURES = ("openclip_vit_tiny", "openclip_vit_tiny_gelu", "hf_clip_tiny", "hf_siglip_tiny")
DEFAULT_FIXTURES = pathlib.Path(os.environ.get("BAYESPROMPT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
SECTIONS = ("correctness", "forward", "coop", "limits")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every problem size of the suite: `REAL` on an accelerator, `TINY` for the CPU smoke run."""

  clip_config: str  # "vit_b16" or "tiny" (a 2-layer, 64-wide CLIP with the real 77-token BPE text side)
  image_batch: int
  text_batch: int
  coop_batch: int
  coop_classes: int
  forward_rounds: int
  step_rounds: int
  pg_moment_draws: int
  pg_draws: int
  ove_batch: int
  ove_classes: int
  kfac_samples: int
  kfac_classes: int
  kfac_dims: tuple[tuple[str, int, int], ...]  # (tower, d_in, D)
  matmul: int
  copy_elements: int
  epig_pool: int
  epig_targets: int
  epig_samples: int
  epig_classes: int
  limit_rounds: int


REAL = Sizes(clip_config="vit_b16", image_batch=256, text_batch=1000, coop_batch=32, coop_classes=1000,
             forward_rounds=10, step_rounds=5, pg_moment_draws=1_000_000, pg_draws=100_000_000, ove_batch=32,
             ove_classes=1000, kfac_samples=65536, kfac_classes=4096,
             kfac_dims=(("image", 768, 512), ("text", 512, 512)), matmul=8192, copy_elements=1 << 29,
             epig_pool=40_000, epig_targets=20_000, epig_samples=100, epig_classes=10, limit_rounds=5)
TINY = Sizes(clip_config="tiny", image_batch=4, text_batch=8, coop_batch=4, coop_classes=6, forward_rounds=3,
             step_rounds=3, pg_moment_draws=20_000, pg_draws=100_000, ove_batch=4, ove_classes=10,
             kfac_samples=256, kfac_classes=64, kfac_dims=(("image", 48, 32), ("text", 32, 32)), matmul=256,
             copy_elements=1 << 20, epig_pool=256, epig_targets=128, epig_samples=16, epig_classes=5,
             limit_rounds=3)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, type=pathlib.Path, help="directory for device_suite.{md,json}")
  parser.add_argument("--tiny", action="store_true", help="tiny sizes: the whole suite in seconds on a CPU")
  parser.add_argument("--fixtures", type=pathlib.Path, default=DEFAULT_FIXTURES,
                      help="reference fixtures directory (default ../shared/fixtures or $BAYESPROMPT_FIXTURES)")
  parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="wall-clock budget (default 420 s at real sizes, none with --tiny): sections that would "
                           "start after it are skipped, and the report says so")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  unknown = set(args.sections.split(",")) - set(SECTIONS)
  if unknown:
    parser.error(f"--sections: unknown {sorted(unknown)}; expected some of {SECTIONS}")
  return args


# ---------------------------------------------------------------------------------------------------------------
# Results


def _cell(text: str) -> str:
  """Text for a Markdown table cell (a bare | would end the cell)."""
  return text.replace("|", "\\|")


@dataclasses.dataclass
class Report:
  """What the suite found; written as JSON and Markdown."""

  meta: dict[str, Any]
  checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  timings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  limits: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  goals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  errors: list[str] = dataclasses.field(default_factory=list)

  def check(self, name: str, error: float, tolerance: float, detail: str = "") -> None:
    """Records a correctness check: passes iff error ≤ tolerance and error is finite."""
    error = float(error)
    passed = bool(math.isfinite(error) and error <= tolerance)
    self.checks.append({"name": name, "error": error, "tolerance": tolerance, "passed": passed,
                        "detail": detail})
    print(f"  [{'PASS' if passed else 'FAIL'}] {name}: {error:.3g} (tolerance {tolerance:.3g}) {detail}")

  def goal(self, name: str, value: float, target: str, met: bool) -> None:
    """Records an issue-19 GPU goal; at --tiny sizes the value is recorded but the goal is not judged."""
    judged = not self.meta["tiny"]
    self.goals.append({"name": name, "value": float(value), "target": target,
                       "met": bool(met) if judged else None})

  @property
  def all_passed(self) -> bool:
    return bool(self.checks) and all(c["passed"] for c in self.checks) and not self.errors

  def has_nan(self) -> bool:
    def walk(x):
      if isinstance(x, float):
        return math.isnan(x)
      if isinstance(x, dict):
        return any(walk(v) for v in x.values())
      if isinstance(x, list):
        return any(walk(v) for v in x)
      return False

    return walk(self.timings) or walk(self.limits) or walk(self.checks)

  def to_json(self) -> dict[str, Any]:
    return {"meta": self.meta, "all_checks_passed": self.all_passed, "has_nan": self.has_nan(),
            "checks": self.checks, "timings": self.timings, "limits": self.limits, "goals": self.goals,
            "skipped": self.skipped, "errors": self.errors}

  def markdown(self) -> str:
    m = self.meta
    lines = [f"# bayesprompt device suite — {m['date']}", "",
             f"- device: {m['device']}; host: {m['host']}",
             f"- versions: {m['versions']}",
             f"- command: `{m['command']}`; sizes: {'tiny' if m['tiny'] else 'real'}; total {m.get('total_s', 0):.0f} s",
             f"- float32 matmuls at the backend default: {m.get('default_matmul', 'not measured')}",
             f"- all correctness checks passed: **{self.all_passed}**; NaN anywhere: **{self.has_nan()}**", ""]
    lines += ["## (a) Correctness on the device", "", "| check | error | tolerance | result | detail |",
              "|---|---|---|---|---|"]
    for c in self.checks:
      lines.append(f"| {_cell(c['name'])} | {c['error']:.3g} | {c['tolerance']:.3g} | "
                   f"{'pass' if c['passed'] else '**FAIL**'} | {_cell(c['detail'])} |")
    lines += ["", "## (b) Timings against PyTorch, same device, same weights", ""]
    for t in self.timings:
      lines += [f"### {t['title']}", "", t["table"], ""]
      if t.get("reading"):
        lines += [t["reading"], ""]
    lines += ["## (c) Against the physical limit", "", "| computation | time ms, median (min–max) | rate | "
              "fraction of the limit | limit |", "|---|---|---|---|---|"]
    for row in self.limits:
      lines.append(f"| {_cell(row['name'])} | {row['ms']} | {row['rate']} | {row['fraction']} | {row['limit']} |")
    if self.goals:
      lines += ["", "## Goals", "", "| goal | value | target | met |", "|---|---|---|---|"]
      for g in self.goals:
        met = "not judged (--tiny)" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['name']} | {g['value']:.3g} | {g['target']} | {met} |")
    if self.skipped:
      lines += ["", "## Skipped", ""] + [f"- {s}" for s in self.skipped]
    if self.errors:
      lines += ["", "## Errors", ""] + [f"- {e}" for e in self.errors]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def on_accelerator() -> bool:
  return jax.default_backend() != "cpu"


def relative_error(ours: Any, reference: Any) -> float:
  """max over rows of ‖ours − reference‖ / ‖reference‖ (float64; NaN propagates)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  ours, reference = ours.reshape(-1, ours.shape[-1]), reference.reshape(-1, reference.shape[-1])
  return float(np.max(np.linalg.norm(ours - reference, axis=-1) / np.linalg.norm(reference, axis=-1)))


def x64_scope():
  """jax.enable_x64(True) across JAX versions (a context manager)."""
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:
    from jax.experimental import enable_x64 as ctx  # older JAX
  return ctx(True)


def cpu_device():
  return jax.devices("cpu")[0]


def torch_status(no_torch: bool) -> tuple[Any, str]:
  """(torch module or None, the reason it is not used)."""
  if no_torch:
    return None, "--no-torch given"
  missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
  if missing:
    return None, f"not installed: {', '.join(missing)} (pip install -r requirements-bench.txt)"
  import torch

  return torch, ""


def torch_device(torch) -> str:
  return "cuda" if (torch.cuda.is_available() and on_accelerator()) else "cpu"


def torch_sync(torch, device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def make_clip_config(name: str) -> clip.CLIPConfig:
  """The suite's CLIP: ViT-B/16 at real size; a 2-layer, 64-wide model with the real 77-token BPE text side
  for --tiny (so CoOp's tokenizer, the HF reference and the 77-token work keep their real shapes)."""
  if name != "tiny":
    return clip.get_config(name)
  full = clip.get_config("vit_b16")
  return full.replace(
      vision=dataclasses.replace(full.vision, image_size=32, patch_size=16, width=64, layers=2, heads=2,
                                 mlp_dim=256),
      text=dataclasses.replace(full.text, width=64, layers=2, heads=2, mlp_dim=256), embed_dim=32)


def tower_flops(width: int, mlp_dim: int, layers: int, tokens: int) -> float:
  """Matmul flops of `layers` transformer blocks on `tokens` tokens (QKV, scores, values, out, MLP)."""
  per_layer = 2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
  per_layer += 2 * 2 * tokens * width * mlp_dim
  return float(layers * per_layer)


def image_forward_flops(config: clip.CLIPConfig, batch: int) -> float:
  v = config.vision
  patches = (v.image_size // v.patch_size) ** 2
  tokens = patches + (1 if v.class_token else 0)
  embed = 2 * patches * 3 * v.patch_size**2 * v.width
  return batch * (embed + tower_flops(v.width, v.mlp_dim, v.layers, tokens) + 2 * v.width * config.embed_dim)


def measure(fn: Callable[[], Any], rounds: int) -> harness.Spread:
  """Headline-time spread (seconds) of one computation on its own (a rate against a limit)."""
  comparison = harness.interleaved({"fn": fn}, rounds=rounds, warmup=1, accelerator=on_accelerator())
  return comparison.spread("fn")


def _blocking(fn: Callable[..., Any], *args) -> Callable[[], Any]:
  return lambda: jax.block_until_ready(fn(*args))


# ---------------------------------------------------------------------------------------------------------------
# (a) correctness


def check_fixture_parity(report: Report, fixtures: pathlib.Path) -> None:
  if not fixtures.is_dir():
    report.errors.append(f"fixtures not found at {fixtures}: pass --fixtures (benchmarks/README.md says how "
                         "to carry them to the device)")
    return
  tf32_bound = on_accelerator()
  for name in FIXTURES:
    config, params = clip.load_checkpoint(fixtures / name)
    io = dict(np.load(fixtures / f"{name}.io.npz"))
    images = jnp.asarray(io["images"].transpose(0, 2, 3, 1))
    tokens = jnp.asarray(io["tokens"].astype(np.int32))
    references = (io["image_features"], io["text_features"])

    def variants(params, images, tokens, config=config):
      """Features at precision "highest", at the backend default, and with bfloat16 compute: one jit."""
      def features(cfg):
        return (clip.image_tower(params, images, config=cfg)[0], clip.text_tower(params, tokens, config=cfg)[0])

      with jax.default_matmul_precision("highest"):  # read while tracing: sets these dots' precision
        highest = features(config)
      return highest, features(config), features(config.replace(dtype="bfloat16"))

    highest, default, bf16 = jax.jit(variants)(params, images, tokens)
    error = max(float(np.max(np.abs(np.asarray(f) - r))) for f, r in zip(highest, references, strict=True))
    report.check(f"parity {name} float32 (precision highest)", error, 1e-4, "max |Δ| of image/text features")
    scale = max(float(np.max(np.abs(r))) for r in references)
    error = max(float(np.max(np.abs(np.asarray(f) - r))) for f, r in zip(default, references, strict=True))
    if tf32_bound:
      report.check(f"parity {name} float32 (backend default precision)", error / scale, 1e-2,
                   "max |Δ| / max |f| (TF32 bound off the CPU)")
    else:
      report.check(f"parity {name} float32 (backend default precision)", error, 1e-4, "max |Δ|")
    rel = max(float(np.max(np.abs(np.asarray(f) - r))) / float(np.max(np.abs(r)))
              for f, r in zip(bf16, references, strict=True))
    report.check(f"parity {name} bfloat16 (max |Δ| / max |f|)", rel, 3e-2)
    cosine = min(float(np.min(np.sum(np.asarray(clip.normalize(f)) * np.asarray(clip.normalize(r)), -1)))
                 for f, r in zip(bf16, references, strict=True))
    report.check(f"parity {name} bfloat16 (1 − min cosine)", 1.0 - cosine, 1e-3)


def pg_closed_form(c: float) -> tuple[float, float]:
  """Mean and variance of PG(1, c): tanh(c/2)/(2c) and (sinh c − c)/(4c³cosh²(c/2)); c → 0: 1/4, 1/24."""
  if abs(c) < 1e-3:
    return 0.25 - c * c / 48.0, 1.0 / 24.0
  return math.tanh(c / 2) / (2 * c), (math.sinh(c) - c) / (4 * c**3 * math.cosh(c / 2) ** 2)


def check_polya_gamma(report: Report, sizes: Sizes) -> None:
  sample = jax.jit(lambda key, c: sample_polya_gamma(key, 1, c, shape=(sizes.pg_moment_draws,)))
  for i, c in enumerate((0.0, 0.5, 2.0, 10.0, 50.0)):
    draws = np.asarray(sample(jax.random.key(100 + i), jnp.float32(c)), np.float64)
    mean, var = pg_closed_form(c)
    centred = draws - draws.mean()
    se_mean = math.sqrt(var / draws.size)
    se_var = math.sqrt(max(np.mean(centred**4) - np.mean(centred**2) ** 2, 0.0) / draws.size)
    report.check(f"PG(1, {c:g}) sample mean, in standard errors", abs(draws.mean() - mean) / se_mean, 5.0,
                 f"{draws.size:,} draws; mean {draws.mean():.6g} vs {mean:.6g}")
    report.check(f"PG(1, {c:g}) sample variance, in standard errors", abs(np.var(draws) - var) / se_var, 5.0,
                 f"variance {np.var(draws):.6g} vs {var:.6g}")


def ove_pg_float64(logits, teacher, labels, eps, *, alpha: float, weight: float) -> float:
  """The corrected OVE-PG loss with ω = E[PG(1, ψ⁰)] in float64 NumPy (DESIGN §4), vectorised.

  ψ_{i,c} = f_{i,y} − f_{i,c}, ψ⁰ the same on the teacher, ω = tanh(|ψ⁰|/2)/(2|ψ⁰|) (1/4 at 0),
  ψ' = (αψ + ½)/(ω + α) + ε/√(ω + α); L = −mean_{m,i} Σ_{c≠y} log σ(ψ') + λ·mean (f − f⁰)².
  """
  logits, teacher, eps = (np.asarray(x, np.float64) for x in (logits, teacher, eps))
  rows = np.arange(logits.shape[0])
  psi = logits[rows, labels][:, None] - logits
  psi0 = np.abs(teacher[rows, labels][:, None] - teacher)
  safe = np.where(psi0 == 0, 1.0, psi0)
  omega = np.where(psi0 == 0, 0.25, np.tanh(safe / 2) / (2 * safe))
  sample = (alpha * psi + 0.5) / (omega + alpha) + eps / np.sqrt(omega + alpha)  # [M, n, C]
  nll = np.logaddexp(0.0, -sample)
  nll[:, rows, labels] = 0.0  # the true class is no pair
  return float(nll.sum(-1).mean() + weight * np.mean((logits - teacher) ** 2))


def check_ove_pg(report: Report, sizes: Sizes, seed: int) -> None:
  n, classes, samples, alpha, weight = sizes.ove_batch, sizes.ove_classes, 3, 1.5, 0.2
  rng = np.random.default_rng(seed)
  logits = (3 * rng.standard_normal((n, classes))).astype(np.float32)
  teacher = (3 * rng.standard_normal((n, classes))).astype(np.float32)
  labels = rng.integers(0, classes, n).astype(np.int32)
  key = jax.random.key(seed + 7)
  loss, _ = jax.jit(lambda k, f, t, y: ove.ove_pg_loss(k, f, t, y, prior_precision=alpha, teacher_weight=weight,
                                                       num_samples=samples))(key, logits, teacher, labels)
  with jax.default_device(cpu_device()):  # ε as ove_pg_loss documents it: normal(split(k_eps, M)[m], [n, C])
    _, k_eps = jax.random.split(jax.random.key(seed + 7))
    eps = np.stack([np.asarray(jax.random.normal(k, (n, classes), jnp.float32))
                    for k in jax.random.split(k_eps, samples)])
  expected = ove_pg_float64(logits, teacher, labels, eps, alpha=alpha, weight=weight)
  report.check("OVE-PG loss vs float64 CPU value (relative)", abs(float(loss) - expected) / abs(expected), 1e-4,
               f"n={n}, C={classes}, M={samples}: {float(loss):.6f} vs {expected:.6f}")


def check_kfac_identity(report: Report, seed: int) -> None:
  """N = 1: kron(A, B) is the exact GGN of the InfoNCE loss w.r.t. the projection weight."""
  feat_dim, embed_dim, classes = 24, 16, 40
  rng = np.random.default_rng(seed + 3)
  phi = rng.normal(size=(1, feat_dim))
  kernel = rng.normal(size=(feat_dim, embed_dim)) / math.sqrt(feat_dim)
  targets = rng.normal(size=(classes, embed_dim))
  scale = 1.7

  def logits_of_weight(w_flat, targets):
    g = phi[0] @ w_flat.reshape(feat_dim, embed_dim)
    unit = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
    return jnp.exp(scale) * (unit @ (g / jnp.linalg.norm(g)))

  with x64_scope(), jax.default_device(cpu_device()):  # the oracle: Hessian of the linearised loss, float64
    w0 = jnp.asarray(kernel.reshape(-1))
    z0, jvp = jax.linearize(lambda w: logits_of_weight(w, jnp.asarray(targets)), w0)
    exact = np.asarray(jax.hessian(lambda w: -jax.nn.log_softmax(z0 + jvp(w - w0))[0])(w0))
  embeddings = (phi @ kernel).astype(np.float32)
  for precision in ("highest", None):
    a, b = jax.jit(lambda p, e, t, precision=precision: laplace.kfac_factors(
        p, e, t, scale, likelihood="infonce", precision=precision))(phi.astype(np.float32), embeddings,
                                                                   targets.astype(np.float32))
    error = float(np.linalg.norm(np.kron(np.asarray(a, np.float64), np.asarray(b, np.float64)) - exact)
                  / np.linalg.norm(exact))
    tolerance = 1e-4 if (precision == "highest" or not on_accelerator()) else 1e-2
    report.check(f"KFAC N=1 kron(A, B) = exact GGN (precision {precision or 'default'})", error, tolerance,
                 "relative Frobenius error vs float64 autodiff on the CPU")


# ---------------------------------------------------------------------------------------------------------------
# (b) timings against PyTorch


class TorchSide:
  """transformers' CLIPModel with our weights on the suite's device, or the reason there is none."""

  def __init__(self, torch, reason: str, config: clip.CLIPConfig, params):
    self.torch, self.reason, self.model, self.device = torch, reason, None, "cpu"
    if torch is None:
      return
    from bench_clip_forward import torch_model

    self.device = torch_device(torch)
    self.model = torch_model(config, params, eager_attention=False).to(self.device)

  def features(self, tower: str, inputs: np.ndarray, bf16: bool) -> Callable[[], Any]:
    torch = self.torch
    if tower == "image":
      x = torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))).to(self.device)
      fn = self.model.get_image_features
    else:
      x = torch.from_numpy(inputs.astype(np.int64)).to(self.device)
      fn = self.model.get_text_features

    def run():
      with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
        out = fn(x)
      out = getattr(out, "pooler_output", out)
      torch_sync(torch, self.device)
      return out

    return run


def tf32_state(torch) -> str:
  return f"torch.get_float32_matmul_precision()={torch.get_float32_matmul_precision()!r}"


def time_forward(report: Report, sizes: Sizes, config, params, side: TorchSide, peak_bf16: float | None,
                 seed: int) -> None:
  from bench_clip_forward import random_inputs

  images, ids = random_inputs(config, sizes.image_batch, sizes.text_batch, seed)
  jax_images, jax_ids = jnp.asarray(images), jnp.asarray(ids)
  bf16_config = config.replace(dtype="bfloat16")
  image_fn = {dtype: jax.jit(lambda p, x, c=c: clip.image_tower(p, x, config=c)[0])
              for dtype, c in (("float32", config), ("bfloat16", bf16_config))}
  text_fn = jax.jit(lambda p, x: clip.text_tower(p, x, config=config)[0])
  cases = [("image", "float32", image_fn["float32"], jax_images, images, sizes.image_batch),
           ("image", "bfloat16", image_fn["bfloat16"], jax_images, images, sizes.image_batch),
           ("text", "float32", text_fn, jax_ids, ids, sizes.text_batch)]
  for tower, dtype, fn, jax_input, host_input, batch in cases:
    candidates: dict[str, Callable[[], Any]] = {}
    reference = None
    reading = ""
    ours = np.asarray(fn(params, jax_input))
    if not np.all(np.isfinite(ours)):
      report.errors.append(f"{tower} {dtype}: JAX features not finite")
    if side.model is not None:
      torch = side.torch
      torch_name = f"torch {dtype}"
      run = side.features(tower, host_input, bf16=dtype == "bfloat16")
      expected = run().float().cpu().numpy()
      error = relative_error(ours, expected)
      tolerance = 5e-2 if dtype == "bfloat16" else (1e-2 if on_accelerator() else 1e-3)
      report.check(f"{tower} forward {dtype}: JAX vs torch features (same weights)", error, tolerance,
                   "max row relative error")
      candidates[torch_name] = run
      reference = torch_name
      if dtype == "float32" and side.device == "cuda":
        def run_tf32(run=run, torch=torch):
          previous = torch.get_float32_matmul_precision()
          torch.set_float32_matmul_precision("high")  # TF32 matmuls, as JAX's default precision on GPUs
          try:
            return run()
          finally:
            torch.set_float32_matmul_precision(previous)

        candidates["torch float32 (TF32 allowed)"] = run_tf32
        reading = ("torch float32 runs at its default precision (" + tf32_state(torch) + ", no TF32); the "
                   "'TF32 allowed' row is the like-for-like reference if JAX's default uses TF32 (see the header).")
    else:
      reading = f"PyTorch columns skipped: {side.reason}."
    candidates[f"jax {dtype}"] = _blocking(fn, params, jax_input)
    comparison = harness.interleaved(candidates, rounds=sizes.forward_rounds, warmup=2,
                                     accelerator=on_accelerator())
    title = (f"{tower} forward, {dtype}, batch {batch}"
             + (f" × {config.text.context_length} tokens" if tower == "text" else f" @ {config.vision.image_size} px"))
    entry = {"title": title, "table": comparison.markdown(reference), "reading": reading,
             "comparison": comparison.to_json(reference)}
    if reference is not None:
      ratio = comparison.ratio(f"jax {dtype}", reference).median
      report.goal(f"{tower} forward {dtype}: JAX / torch time", ratio, "≤ 0.70", ratio <= 0.7)
    if tower == "image" and dtype == "bfloat16" and peak_bf16:
      flops = image_forward_flops(config, batch)
      seconds = comparison.spread(f"jax {dtype}", "wall").median
      mfu = flops / seconds / peak_bf16
      entry["mfu"] = mfu
      entry["reading"] = (reading + f" JAX bf16 model FLOP utilisation: {flops / 1e12:.2f} TFLOP per forward / "
                          f"{seconds * 1e3:.1f} ms = {flops / seconds / 1e12:.1f} TFLOP/s = {100 * mfu:.1f}% of the "
                          f"measured bf16 matmul peak ({peak_bf16 / 1e12:.1f} TFLOP/s).").strip()
      report.goal("ViT-B/16 bf16 image forward MFU (fraction of measured bf16 peak)", mfu, "≥ 0.40", mfu >= 0.4)
    report.timings.append(entry)
    print(f"\n{title}\n{entry['table']}{entry['reading']}")


def time_coop(report: Report, sizes: Sizes, config, params, side: TorchSide, seed: int) -> None:
  from bench_coop_step import LR, MOMENTUM, WEIGHT_DECAY, TorchCoOp, class_names

  names = class_names(sizes.coop_classes, seed)
  learner = make_learner("coop", config, n_ctx=16, full_context=True)
  class_state = learner.prepare_classes(params, names, templates=["a photo of a {}."])
  optimizer = optim.make_optimizer("sgd", LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM)
  rng = np.random.default_rng(seed)
  size = config.vision.image_size
  images = rng.standard_normal((sizes.coop_batch, size, size, 3), dtype=np.float32)
  labels = rng.integers(0, sizes.coop_classes, sizes.coop_batch).astype(np.int32)
  jax_images, jax_labels = jnp.asarray(images), jnp.asarray(labels)
  teacher_text = class_state.zeroshot_text_features
  steps, states = {}, {}
  for objective in ("ce", "ove_pg"):
    steps[objective] = prompt_trainer.make_train_step(learner, make_objective(objective), optimizer)
    states[objective] = prompt_trainer.create_train_state(learner, optimizer, seed, params, class_state)
  ctx0 = np.asarray(states["ce"].params["ctx"])

  def run_jax(objective):
    def run():
      states[objective], metrics = steps[objective](states[objective], params, class_state, jax_images,
                                                    jax_labels, teacher_text)
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise FloatingPointError(f"CoOp {objective} step: loss {loss}")
      return loss

    return run

  prompt = f"batch {sizes.coop_batch}, C = {sizes.coop_classes}, {class_state.sequence_length}-token context"
  # CoOp: JAX vs the same work in PyTorch.
  candidates: dict[str, Callable[[], Any]] = {}
  reading = ""
  if side.model is not None:
    torch = side.torch
    reference_step = TorchCoOp(side.model, class_state, ctx0, device=side.device)
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(side.device)
    torch_labels = torch.from_numpy(labels.astype(np.int64)).to(side.device)
    # Same work: the first step's loss of both (same context, same weights, same batch).
    jax_loss = run_jax("ce")()
    torch_loss = float(reference_step.step(pixels, torch_labels).detach())
    report.check("CoOp step: JAX vs torch first-step CE loss (relative)", abs(jax_loss - torch_loss) / abs(torch_loss),
                 1e-2 if on_accelerator() else 1e-3, f"{jax_loss:.6f} vs {torch_loss:.6f}")

    def run_torch():
      loss = reference_step.step(pixels, torch_labels)
      torch_sync(torch, side.device)
      return loss

    candidates["torch float32"] = run_torch
  else:
    reading = f"PyTorch column skipped: {side.reason}."
  candidates["jax float32"] = run_jax("ce")
  comparison = harness.interleaved(candidates, rounds=sizes.step_rounds, warmup=1, accelerator=on_accelerator())
  reference = "torch float32" if side.model is not None else None
  title = f"CoOp train step (CE, SGD), {prompt}"
  report.timings.append({"title": title, "table": comparison.markdown(reference), "reading": reading,
                         "comparison": comparison.to_json(reference)})
  print(f"\n{title}\n{comparison.markdown(reference)}{reading}")
  if reference is not None:
    ratio = comparison.ratio("jax float32", reference).median
    report.goal("CoOp step: JAX / torch time", ratio, "≤ 0.70", ratio <= 0.7)
  # OVE-PG vs CE, the same JAX step otherwise.
  comparison = harness.interleaved({"CE step": run_jax("ce"), "OVE-PG step": run_jax("ove_pg")},
                                   rounds=sizes.step_rounds, warmup=1, accelerator=on_accelerator())
  title = f"CoOp train step, OVE-PG (prior_mean) vs CE, {prompt}"
  report.timings.append({"title": title, "table": comparison.markdown("CE step"), "reading": "",
                         "comparison": comparison.to_json("CE step")})
  print(f"\n{title}\n{comparison.markdown('CE step')}")
  ratio = comparison.ratio("OVE-PG step", "CE step").median
  report.goal("OVE-PG step / CE step time", ratio, "≤ 1.05", ratio <= 1.05)


# ---------------------------------------------------------------------------------------------------------------
# (c) against the physical limit


def matmul_peaks(report: Report, sizes: Sizes) -> dict[str, float]:
  """Measured FLOP/s of one large square matmul: bf16, fp32 at the default and at the highest precision."""
  n = sizes.matmul
  keys = jax.random.split(jax.random.key(11))
  peaks = {}
  for name, dtype, precision in (("bf16", jnp.bfloat16, None), ("fp32 default precision", jnp.float32, None),
                                 ("fp32 highest precision", jnp.float32, "highest")):
    x = jax.random.normal(keys[0], (n, n), dtype)  # random data: zeros run faster than real data
    y = jax.random.normal(keys[1], (n, n), dtype)
    fn = jax.jit(lambda a, b, precision=precision: jnp.matmul(a, b, precision=precision))
    spread = measure(_blocking(fn, x, y), sizes.limit_rounds)
    flops = 2.0 * n**3
    peaks[name] = flops / spread.min
    report.limits.append({"name": f"matmul {name} [{n}×{n}]²", "ms": spread.scaled(1e3).format(2),
                          "rate": f"{peaks[name] / 1e12:.2f} TFLOP/s (best round)", "fraction": "1 (the peak)",
                          "limit": "measured here"})
  return peaks


def copy_bandwidth(report: Report, sizes: Sizes) -> float:
  """Bytes read + written per second by a large elementwise op (x·2 over float32)."""
  x = jax.random.normal(jax.random.key(12), (sizes.copy_elements,), jnp.float32)
  fn = jax.jit(lambda a: a * 2.0)
  spread = measure(_blocking(fn, x), sizes.limit_rounds)
  bandwidth = 2 * 4 * sizes.copy_elements / spread.min
  report.limits.append({"name": f"elementwise x·2, {4 * sizes.copy_elements / 2**30:.2f} GiB float32",
                        "ms": spread.scaled(1e3).format(3), "rate": f"{bandwidth / 1e9:.0f} GB/s read+write",
                        "fraction": "1 (the bandwidth)", "limit": "measured here"})
  return bandwidth


def kfac_flops(num: int, classes: int, feat_dim: int, embed_dim: int) -> float:
  """Matmul flops of one InfoNCE `kfac_update` call (the laplace module docstring's count)."""
  per_sample = 6 * classes * embed_dim + 4 * embed_dim**2 + 2 * feat_dim**2
  return float(num * per_sample + 2 * classes * embed_dim**2)


def limit_kfac(report: Report, sizes: Sizes, peaks: dict[str, float]) -> None:
  num, classes = sizes.kfac_samples, sizes.kfac_classes
  for tower, feat_dim, embed_dim in sizes.kfac_dims:
    keys = jax.random.split(jax.random.key(13), 3)
    phi = jax.random.normal(keys[0], (num, feat_dim), jnp.float32)
    emb = jax.random.normal(keys[1], (num, embed_dim), jnp.float32)
    targets = jax.random.normal(keys[2], (classes, embed_dim), jnp.float32)
    state = laplace.kfac_init(feat_dim, embed_dim)
    fn = jax.jit(lambda s, p, e, t: laplace.kfac_update(s, p, e, t, 4.6, likelihood="infonce", chunk_size=512))
    out = jax.block_until_ready(fn(state, phi, emb, targets))
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(out)):
      report.errors.append(f"KFAC {tower}: non-finite factors")
    spread = measure(_blocking(fn, state, phi, emb, targets), sizes.limit_rounds)
    rate = kfac_flops(num, classes, feat_dim, embed_dim) / spread.median
    fractions = ", ".join(f"{100 * rate / peaks[k]:.1f}% of {k}" for k in ("fp32 default precision", "bf16")
                          if k in peaks)
    report.limits.append({"name": f"KFAC-GGN accumulation (InfoNCE), ViT-B/32 {tower} {feat_dim}→{embed_dim}, "
                                  f"N={num}, C={classes}, chunk 512, float32",
                          "ms": spread.scaled(1e3).format(2), "rate": f"{rate / 1e12:.2f} TFLOP/s (median)",
                          "fraction": fractions, "limit": "measured matmul peaks above"})


def limit_polya_gamma(report: Report, sizes: Sizes, bandwidth: float) -> None:
  n = sizes.pg_draws
  c = jax.random.uniform(jax.random.key(14), (n,), jnp.float32, 0.0, 10.0)
  fn = jax.jit(lambda key, c: sample_polya_gamma(key, 1, c))
  out = jax.block_until_ready(fn(jax.random.key(15), c))
  if not bool(jnp.all(jnp.isfinite(out) & (out > 0))):
    report.errors.append("PG(1, c): non-finite or non-positive draws")
  del out
  spread = measure(_blocking(fn, jax.random.key(15), c), sizes.limit_rounds)
  floor = 2 * 4 * n / bandwidth  # read c, write ω: the least a sampler must move
  report.limits.append({"name": f"PG(1, c) sampler, {n:.0e} draws, c ~ U(0, 10), float32",
                        "ms": spread.scaled(1e3).format(2), "rate": f"{n / spread.median / 1e9:.2f} Gdraw/s",
                        "fraction": f"{100 * floor / spread.median:.1f}% of the bandwidth floor",
                        "limit": f"{floor * 1e3:.3f} ms = 8 B/draw at {bandwidth / 1e9:.0f} GB/s"})


def limit_epig(report: Report, sizes: Sizes, peaks: dict[str, float]) -> None:
  pool, targets, k, c = sizes.epig_pool, sizes.epig_targets, sizes.epig_samples, sizes.epig_classes
  keys = jax.random.split(jax.random.key(16))
  pool_probs = jax.nn.softmax(jax.random.normal(keys[0], (pool, k, c)), -1)
  target_probs = jax.nn.softmax(jax.random.normal(keys[1], (targets, k, c)), -1)
  fn = jax.jit(epig)
  scores = np.asarray(fn(pool_probs, target_probs))
  if not np.all(np.isfinite(scores)):
    report.errors.append("EPIG: non-finite scores")
  spread = measure(_blocking(fn, pool_probs, target_probs), max(2, sizes.limit_rounds // 2))
  flops = 2.0 * pool * targets * k * c * c
  rate = flops / spread.median
  report.limits.append({"name": f"EPIG pool {pool} × targets {targets}, K={k}, C=C*={c}, default chunks",
                        "ms": spread.scaled(1e3).format(1), "rate": f"{rate / 1e12:.2f} TFLOP/s in the joint matmuls",
                        "fraction": f"{100 * rate / peaks['fp32 default precision']:.1f}% of fp32 default "
                                    "precision peak (+ N·N*·C·C* logarithms)",
                        "limit": "measured matmul peak above"})


def default_matmul_mode() -> str:
  """Whether float32 matmuls at the backend default lose precision (TF32) on this device."""
  keys = jax.random.split(jax.random.key(17))
  x = jax.random.normal(keys[0], (512, 512), jnp.float32)
  y = jax.random.normal(keys[1], (512, 512), jnp.float32)
  reference = np.asarray(x, np.float64) @ np.asarray(y, np.float64)
  error = relative_error(jax.jit(jnp.matmul)(x, y), reference)
  kind = "TF32-like (reduced mantissa)" if error > 1e-5 else "full float32"
  return f"{kind}: relative error {error:.1e} of a random 512² product vs float64"


# ---------------------------------------------------------------------------------------------------------------


def versions(torch) -> str:
  parts = [f"jax {jax.__version__}"]
  try:
    import flax

    parts.append(f"flax {flax.__version__}")
  except ImportError:
    pass
  if torch is not None:
    import transformers

    parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}")
  parts.append(f"Python {platform.python_version()}")
  return ", ".join(parts)


def device_description() -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", str(device))
  return f"{jax.default_backend()}: {kind} (×{jax.device_count()})"


def run_section(report: Report, name: str, fn: Callable[[], Any], start: float, budget: float) -> None:
  if time.perf_counter() - start > budget:
    report.skipped.append(f"{name}: the --budget-s of {budget:.0f} s was spent before it started")
    return
  section_start = time.perf_counter()
  print(f"\n== {name} ==", flush=True)
  try:
    fn()
  except Exception as error:  # one broken section must not hide the others' figures
    traceback.print_exc()
    report.errors.append(f"{name}: {type(error).__name__}: {error}")
  report.meta.setdefault("section_s", {})[name] = round(time.perf_counter() - section_start, 1)


def main(args: argparse.Namespace) -> int:
  start = time.perf_counter()
  sizes = TINY if args.tiny else REAL
  if args.budget_s is None:
    args.budget_s = math.inf if args.tiny else 420.0
  if args.tiny:
    # Tiny shapes: XLA's optimisation passes cost far more compile time than they save (as tests/conftest.py's
    # fast_compiles); the real-size run keeps them.
    jax.config.update("jax_disable_most_optimizations", True)
  sections = set(args.sections.split(","))
  torch, torch_reason = torch_status(args.no_torch)
  report = Report(meta={
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "tiny": args.tiny, "device": device_description(), "host": harness.cpu_description(),
      "versions": versions(torch), "torch": torch_reason or "used", "sizes": dataclasses.asdict(sizes),
      "load_before": harness.load_average()})
  print(f"device {report.meta['device']}; {report.meta['versions']}; torch: {report.meta['torch']}")
  if torch is not None:
    torch.manual_seed(args.seed)
  report.meta["default_matmul"] = default_matmul_mode()
  print(f"float32 matmuls at the backend default: {report.meta['default_matmul']}")

  if "correctness" in sections:
    run_section(report, "correctness: fixture parity", lambda: check_fixture_parity(report, args.fixtures),
                start, args.budget_s)
    run_section(report, "correctness: Pólya-Gamma moments", lambda: check_polya_gamma(report, sizes), start,
                args.budget_s)
    run_section(report, "correctness: OVE-PG loss", lambda: check_ove_pg(report, sizes, args.seed), start,
                args.budget_s)
    run_section(report, "correctness: KFAC N=1", lambda: check_kfac_identity(report, args.seed), start,
                args.budget_s)

  peaks: dict[str, float] = {}
  bandwidth: list[float] = []
  if "limits" in sections or "forward" in sections:
    run_section(report, "limits: matmul peaks", lambda: peaks.update(matmul_peaks(report, sizes)), start,
                args.budget_s)
  config = make_clip_config(sizes.clip_config)
  if sections & {"forward", "coop"}:
    params = clip.init_params(config, jax.random.key(args.seed))
    side = TorchSide(torch, torch_reason, config, params)
    if "forward" in sections:
      run_section(report, "timing: tower forwards", lambda: time_forward(
          report, sizes, config, params, side, peaks.get("bf16"), args.seed), start, args.budget_s)
    if "coop" in sections:
      run_section(report, "timing: CoOp step and OVE-PG step", lambda: time_coop(
          report, sizes, config, params, side, args.seed), start, args.budget_s)
    del side
    if torch is not None and torch.cuda.is_available():
      torch.cuda.empty_cache()
  if "limits" in sections:
    run_section(report, "limits: bandwidth", lambda: bandwidth.append(copy_bandwidth(report, sizes)), start,
                args.budget_s)
    if peaks:
      run_section(report, "limits: KFAC accumulation", lambda: limit_kfac(report, sizes, peaks), start,
                  args.budget_s)
      run_section(report, "limits: EPIG", lambda: limit_epig(report, sizes, peaks), start, args.budget_s)
    if bandwidth:
      run_section(report, "limits: PG sampler", lambda: limit_polya_gamma(report, sizes, bandwidth[0]), start,
                  args.budget_s)

  report.meta["load_after"] = harness.load_average()
  report.meta["total_s"] = round(time.perf_counter() - start, 1)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "device_suite.json").write_text(json.dumps(report.to_json(), indent=1, allow_nan=True))
  (args.out / "device_suite.md").write_text(report.markdown())
  print(f"\nall correctness checks passed: {report.all_passed}; NaN: {report.has_nan()}; "
        f"{report.meta['total_s']:.0f} s; wrote {args.out}/device_suite.{{md,json}}")
  for goal in report.goals:
    verdict = "not judged (--tiny)" if goal["met"] is None else ("met" if goal["met"] else "MISSED")
    print(f"  goal {goal['name']}: {goal['value']:.3g} (target {goal['target']}): {verdict}")
  return 0 if (report.all_passed and not report.has_nan()) else 1


if __name__ == "__main__":
  sys.exit(main(_parse_args()))
