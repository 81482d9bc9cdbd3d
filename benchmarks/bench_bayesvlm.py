"""Benchmark of the BayesVLM primitives against references measured in the same run.

1. KFAC-GGN accumulation throughput at ViT-B/32 dims (image 768 → 512, text 512 → 512, class batch 4096) as a
   fraction of this machine's plain `jnp.dot` float32 GFLOP/s (the roofline; KFAC flops counted analytically).
2. ProbCosine predictive vs deterministic logits (zero-shot: N images × C classes, D = 512).
3. EPIG at pool × targets × K samples in bounded memory (scaled down by default; the chunked algorithm's cost
   is exactly linear in pool × targets, so the full size is extrapolated from it).

Every timing is reported on two clocks: wall time and process CPU time (all threads). The development machine
is shared (load average 5-10 on 2 cores while this ran), which inflates wall times by 1.5-4x at random; CPU
time charges each computation only for the core-seconds it used, so ratios of CPU-time rates are the stable
figure. Ratios are always between computations measured in the same run, interleaved.

Usage:
  python -m benchmarks.bench_bayesvlm
  python -m benchmarks.bench_bayesvlm --epig_pool=40000 --epig_targets=20000   # the full EPIG size
"""

from __future__ import annotations

import os
import resource

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bayesprompt.bayes import acquisition, laplace, predictive, probcosine
from benchmarks import harness

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "timed repetitions per measurement (the minimum is kept)")
flags.DEFINE_integer("rounds", 3, "interleaved (roofline, KFAC) rounds; the median ratio is reported")
flags.DEFINE_integer("kfac_samples", 4096, "samples per KFAC update call")
flags.DEFINE_integer("class_batch", 4096, "class batch size C of the KFAC targets")
flags.DEFINE_multi_integer("kfac_chunks", [256, 512], "KFAC chunk sizes to try")
flags.DEFINE_integer("zs_images", 8192, "zero-shot images N for the ProbCosine timing")
flags.DEFINE_integer("zs_classes", 1000, "zero-shot classes for the ProbCosine timing")
flags.DEFINE_integer("epig_pool", 2048, "EPIG pool size")
flags.DEFINE_integer("epig_targets", 2048, "EPIG target size")
flags.DEFINE_integer("epig_samples", 100, "EPIG posterior samples K")
flags.DEFINE_integer("epig_classes", 10, "EPIG classes C")
flags.DEFINE_integer("epig_pool_chunk", 256, "EPIG pool chunk")
flags.DEFINE_integer("epig_target_chunk", 256, "EPIG target chunk")
flags.DEFINE_list("parts", ["kfac", "probcosine", "epig"], "which benchmarks to run")


def _time(fn, *args, repeats: int) -> tuple[float, float]:
  """Best (wall, process CPU) seconds of a compiled call, after one warm-up call that compiles."""
  return harness.best_of(lambda: jax.block_until_ready(fn(*args)), repeats=repeats, warmup=1)


ROOFLINE_SHAPES = ((2048, 2048, 2048), (1024, 768, 4096), (512, 512, 4096), (512, 4096, 512))


def matmul_peak(repeats: int, verbose: bool = False) -> tuple[float, float]:
  """Best float32 jnp.dot GFLOP/s (wall, CPU) over a few shapes, including the KFAC's own matmul shapes."""
  best_wall = best_cpu = 0.0
  for m, k, n in ROOFLINE_SHAPES:
    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    y = jax.random.normal(keys[1], (k, n), jnp.float32)
    wall, cpu = _time(jax.jit(jnp.dot), x, y, repeats=repeats)
    flops = 2 * m * k * n
    if verbose:
      rates = f"{flops / wall / 1e9:6.1f} GFLOP/s wall, {flops / cpu / 1e9:6.1f} per CPU-s"
      print(f"  jnp.dot [{m}x{k}] @ [{k}x{n}]: {rates}")
    best_wall, best_cpu = max(best_wall, flops / wall / 1e9), max(best_cpu, flops / cpu / 1e9)
  return best_wall, best_cpu


def kfac_flops(num: int, classes: int, feat_dim: int, embed_dim: int, likelihood: str) -> float:
  """Matmul flops of one `kfac_update` call (see the laplace module docstring)."""
  per_sample = 2 * classes * embed_dim  # cosines
  if likelihood == "infonce":
    per_sample += 4 * classes * embed_dim + 2 * embed_dim**2  # [p; p⊙cos] @ Ŷ, Σ w m mᵀ
  else:
    per_sample += 2 * classes * embed_dim  # (a⊙cos) @ Ŷ
  per_sample += 2 * embed_dim**2 + 2 * feat_dim**2  # Q = Σ u (...)ᵀ, Σ φφᵀ
  return num * per_sample + 2 * classes * embed_dim**2  # Ŷᵀ diag(c) Ŷ once per call


def bench_kfac(repeats: int) -> None:
  print("\n== KFAC-GGN accumulation (float32) vs the jnp.dot roofline, interleaved ==")
  num, classes, embed_dim = FLAGS.kfac_samples, FLAGS.class_batch, 512
  for side, feat_dim in (("image", 768), ("text", 512)):
    for likelihood in ("infonce", "siglip"):
      keys = jax.random.split(jax.random.key(1), 3)
      phi = jax.random.normal(keys[0], (num, feat_dim), jnp.float32)
      emb = jax.random.normal(keys[1], (num, embed_dim), jnp.float32)
      targets = jax.random.normal(keys[2], (classes, embed_dim), jnp.float32)
      state = laplace.kfac_init(feat_dim, embed_dim)
      flops = kfac_flops(num, classes, feat_dim, embed_dim, likelihood)
      for chunk in FLAGS.kfac_chunks:
        fn = jax.jit(
          lambda s, p, e, t, chunk=chunk, likelihood=likelihood: laplace.kfac_update(
            s, p, e, t, 4.6, likelihood=likelihood, logit_bias=-10.0, chunk_size=chunk
          )
        )
        rows = []
        for _ in range(FLAGS.rounds):
          peak_wall, peak_cpu = matmul_peak(repeats)
          wall, cpu = _time(fn, state, phi, emb, targets, repeats=repeats)
          rate_wall, rate_cpu = flops / wall / 1e9, flops / cpu / 1e9
          rows.append((rate_cpu / peak_cpu, rate_wall / peak_wall, rate_cpu, peak_cpu, rate_wall, num / wall))
        rows.sort()
        cpu_ratio, wall_ratio, rate_cpu, peak_cpu, rate_wall, samples = rows[len(rows) // 2]
        print(
          f"  {side:5s} {likelihood:7s} {feat_dim}->{embed_dim} C={classes} N={num} chunk={chunk:4d}: "
          f"{rate_cpu:5.1f} GFLOP/CPU-s vs dot {peak_cpu:5.1f} = {100 * cpu_ratio:4.1f}% of roofline "
          f"[range {100 * rows[0][0]:.0f}-{100 * rows[-1][0]:.0f}%]; wall: {rate_wall:5.1f} GFLOP/s, "
          f"{samples:6.0f} samples/s, {100 * wall_ratio:4.1f}% of the wall roofline"
        )


def bench_probcosine(repeats: int) -> None:
  print("\n== ProbCosine predictive vs deterministic logits (float32) ==")
  num, classes, dim, feat_dim = FLAGS.zs_images, FLAGS.zs_classes, 512, 768
  keys = jax.random.split(jax.random.key(2), 6)
  img = jax.random.normal(keys[0], (num, dim))
  txt = jax.random.normal(keys[1], (classes, dim))
  quad_img = jax.random.uniform(keys[2], (num,))
  quad_txt = jax.random.uniform(keys[3], (classes,))
  b_img = jax.random.uniform(keys[4], (dim,)) * 1e-3
  b_txt = jax.random.uniform(keys[5], (dim,)) * 1e-3
  var_img, var_txt = quad_img[:, None] * b_img, quad_txt[:, None] * b_txt
  scale = 4.6

  def normalise(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def logits(img, txt):
    return jnp.exp(scale) * normalise(img) @ normalise(txt).T

  def factored(img, quad_img, b_img, txt, quad_txt, b_txt):
    return probcosine.probcosine_logits_factored(img, quad_img, b_img, txt, quad_txt, b_txt, scale)

  cases = {
    "deterministic logits": (jax.jit(logits), (img, txt)),
    "deterministic softmax predictive": (jax.jit(lambda i, t: jax.nn.softmax(logits(i, t), -1)), (img, txt)),
    "ProbCosine logit moments (KFAC-factored)": (
      jax.jit(factored),
      (img, quad_img, b_img, txt, quad_txt, b_txt),
    ),
    "ProbCosine + probit predictive (factored)": (
      jax.jit(lambda *a: predictive.probit_predictive(*factored(*a))),
      (img, quad_img, b_img, txt, quad_txt, b_txt),
    ),
    "ProbCosine + probit (general diagonal var)": (
      jax.jit(
        lambda i, vi, t, vt: predictive.probit_predictive(*probcosine.probcosine_logits(i, vi, t, vt, scale))
      ),
      (img, var_img, txt, var_txt),
    ),
  }
  # Interleave the cases over rounds and keep each one's best, so all see similar machine load.
  best = {name: (float("inf"), float("inf")) for name in cases}
  for _ in range(FLAGS.rounds):
    for name, (fn, args) in cases.items():
      wall, cpu = _time(fn, *args, repeats=repeats)
      best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
  ref_wall, ref_cpu = best["deterministic logits"]
  soft_wall, soft_cpu = best["deterministic softmax predictive"]
  print(f"  N={num} images x {classes} classes, D={dim}; ratio = CPU-time ratio (wall-time ratio)")
  for name, (wall, cpu) in best.items():
    print(
      f"  {name:44s} {1e3 * wall:7.1f} ms wall, {1e3 * cpu:7.1f} ms CPU: "
      f"{cpu / ref_cpu:4.2f}x ({wall / ref_wall:4.2f}x) logits, "
      f"{cpu / soft_cpu:4.2f}x ({wall / soft_wall:4.2f}x) softmax predictive"
    )

  # End to end from the cached pre-projection features: projection (+ the φᵀA'⁻¹φ form) + logits + predictive.
  phi = jax.random.normal(keys[0], (num, feat_dim)) / np.sqrt(feat_dim)
  kernel = jax.random.normal(keys[1], (feat_dim, dim)) / np.sqrt(feat_dim)
  a = jax.random.normal(keys[2], (feat_dim, feat_dim))
  b = jax.random.normal(keys[3], (dim, dim))
  post = laplace.posterior_from_factors(
    a @ a.T / feat_dim, b @ b.T / dim, pseudo_data_count=10.0, prior_precision=1e2
  )

  @jax.jit
  def end_to_end_det(phi, kernel, txt):
    return jax.nn.softmax(logits(phi @ kernel, txt), axis=-1)

  @jax.jit
  def end_to_end_bayes(phi, kernel, post, txt, quad_txt, b_txt):
    quad, b_diag = laplace.embedding_variance_factors(post, phi)
    return predictive.probit_predictive(*factored(phi @ kernel, quad, b_diag, txt, quad_txt, b_txt))

  det, bayes = (float("inf"),) * 2, (float("inf"),) * 2
  for _ in range(FLAGS.rounds):
    det = tuple(map(min, det, _time(end_to_end_det, phi, kernel, txt, repeats=repeats)))
    bayes = tuple(
      map(min, bayes, _time(end_to_end_bayes, phi, kernel, post, txt, quad_txt, b_txt, repeats=repeats))
    )
  print(
    f"  end to end from features (d_in={feat_dim}, incl. projection): "
    f"deterministic {1e3 * det[1]:.1f} ms CPU, "
    f"BayesVLM {1e3 * bayes[1]:.1f} ms CPU = {bayes[1] / det[1]:4.2f}x ({bayes[0] / det[0]:4.2f}x wall); "
    f"flop ratio (2·d·D + 2·d² + 2·D·C)/(2·d·D + 2·D·C) = "
    f"{(feat_dim * dim + feat_dim**2 + dim * classes) / (feat_dim * dim + dim * classes):.2f}"
  )


def bench_epig(repeats: int) -> None:
  pool, targets, samples, classes = (
    FLAGS.epig_pool,
    FLAGS.epig_targets,
    FLAGS.epig_samples,
    FLAGS.epig_classes,
  )
  pc, tc = FLAGS.epig_pool_chunk, FLAGS.epig_target_chunk
  print("\n== EPIG (float32) ==")
  keys = jax.random.split(jax.random.key(3), 2)
  pool_probs = jax.nn.softmax(2 * jax.random.normal(keys[0], (pool, samples, classes)), -1)
  target_probs = jax.nn.softmax(2 * jax.random.normal(keys[1], (targets, samples, classes)), -1)
  fn = jax.jit(lambda p, t: acquisition.epig(p, t, pool_chunk=pc, target_chunk=tc))
  wall, cpu = _time(fn, pool_probs, target_probs, repeats=repeats)
  flops = 2 * pool * targets * samples * classes**2
  bound_mib = 3 * pc * tc * classes**2 * 4 / 2**20
  inputs_mib = (pool + targets) * samples * classes * 4 / 2**20
  print(
    f"  pool {pool} x targets {targets} x K={samples}, C={classes}, chunks {pc}x{tc}: {wall:.2f} s wall, "
    f"{cpu:.2f} CPU-s; {flops / cpu / 1e9:.1f} GFLOP/CPU-s in the joint matmuls"
  )
  print(
    f"  working-set bound 3·pc·tc·C²·4 B = {bound_mib:.0f} MiB (+ inputs {inputs_mib:.0f} MiB); "
    f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
    "(includes the other benchmarks run before it)"
  )
  factor = 40_000 * 20_000 / (pool * targets)
  if factor != 1:
    print(
      f"  extrapolated to pool 40000 x targets 20000 (x{factor:.0f}; same K, C, chunks): "
      f"{cpu * factor:.0f} CPU-s = {cpu * factor / os.cpu_count():.0f} s on {os.cpu_count()} idle cores "
      f"({wall * factor:.0f} s at this run's load); inputs {60_000 * samples * classes * 4 / 2**20:.0f} MiB"
    )


def main(argv):
  del argv
  print(f"devices: {jax.devices()}; {harness.cpu_description()}; load average {harness.load_average():.1f}")
  print("== float32 matmul roofline (plain jnp.dot) ==")
  peak_wall, peak_cpu = matmul_peak(FLAGS.repeats, verbose=True)
  print(f"  peak: {peak_wall:.1f} GFLOP/s wall, {peak_cpu:.1f} GFLOP per CPU-second")
  parts = {"kfac": bench_kfac, "probcosine": bench_probcosine, "epig": bench_epig}
  for part in FLAGS.parts:
    if part not in parts:
      raise app.UsageError(f"--parts: unknown part {part!r}; expected some of {sorted(parts)}")
    parts[part](FLAGS.repeats)
  print(f"load average after: {harness.load_average():.1f} on {harness.schedulable_cores()} core(s)")


if __name__ == "__main__":
  app.run(main)
