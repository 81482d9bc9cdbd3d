"""Benchmark of the Pólya-Gamma sampler against polyagamma's C sampler, measured in the same run.

1. PG(1, c) throughput: the jitted JAX sampler (`sample_polya_gamma`, float32) vs polyagamma's C Devroye
   sampler (`random_polyagamma(1, c, method="devroye")`, float64, one thread), 10⁶ draws per call, for fixed
   tilts and for a spread of c (|c| log-uniform on [1e-3, 50], random signs). Repetitions are interleaved; the
   minimum is kept. Both clocks are reported: wall time and process CPU time (core-seconds of all threads).
   The machine is shared (other jobs inflate wall times 1.5–4x at random), so the CPU-time ratio is the stable
   figure; JAX may use both cores, polyagamma uses one, so the wall ratio favours JAX on an idle machine.
   (|c| stays ≤ 50: polyagamma 2.0.2's Devroye sampler returns ≈ 0.16 for every draw beyond |c| ≈ 175.)
The OVE-PG loss's peak memory against cross-entropy is measured by benchmarks/bench_ove_pg_memory.py.

Usage:
  python -m benchmarks.bench_polya_gamma
  python -m benchmarks.bench_polya_gamma --num_draws=1000000 --repeats=7 --key_impl=rbg
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from polyagamma import random_polyagamma

from bayesprompt.bayes.polya_gamma import sample_polya_gamma
from benchmarks import harness

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_draws", 1_000_000, "PG(1, c) draws per timed call")
flags.DEFINE_integer("repeats", 5, "interleaved timed repetitions (the minimum is kept)")
flags.DEFINE_string("key_impl", "threefry2x32", "JAX PRNG implementation for the sampler's key")


def _time(fn, repeats):
  """(min wall s, min CPU s) over `repeats` calls of fn() (which must block until done)."""
  return harness.best_of(fn, repeats=repeats, warmup=0)


def bench_sampler():
  n = FLAGS.num_draws
  rng = np.random.default_rng(0)
  spread = np.sign(rng.uniform(-1, 1, n)) * 10 ** rng.uniform(-3, np.log10(50), n)
  cases = [("c = 0", np.zeros(n)), ("c = 2", np.full(n, 2.0)), ("c = 10", np.full(n, 10.0)),
           ("c = 50", np.full(n, 50.0)), ("spread |c| in [1e-3, 50]", spread)]
  sample = jax.jit(lambda key, c: sample_polya_gamma(key, 1, c))
  key = jax.random.key(0, impl=FLAGS.key_impl)
  print(f"PG(1, c), {n:,} draws per call, JAX key {FLAGS.key_impl}, best of {FLAGS.repeats} (interleaved)")
  print(f"{'tilt':<26}{'JAX wall':>10}{'JAX cpu':>10}{'pg wall':>10}{'pg cpu':>10}"
        f"{'JAX Mdraw/s':>13}{'pg Mdraw/s':>12}{'ratio wall':>12}{'ratio cpu':>11}")
  for name, c in cases:
    c_jax = jnp.asarray(c, jnp.float32)
    sample(key, c_jax).block_until_ready()  # compile
    jax_times, pg_times = [], []
    for repeat in range(FLAGS.repeats):  # interleave so that load changes hit both alike
      round_key = jax.random.fold_in(key, repeat)
      jax_times.append(_time(lambda k=round_key, c=c_jax: sample(k, c).block_until_ready(), 1))
      pg_times.append(_time(lambda c=c: random_polyagamma(1, c, method="devroye", random_state=rng), 1))
    jax_wall, jax_cpu = (min(t[i] for t in jax_times) for i in (0, 1))
    pg_wall, pg_cpu = (min(t[i] for t in pg_times) for i in (0, 1))
    times = f"{jax_wall * 1e3:>8.1f}ms{jax_cpu * 1e3:>8.1f}ms{pg_wall * 1e3:>8.1f}ms{pg_cpu * 1e3:>8.1f}ms"
    rates = f"{n / jax_wall / 1e6:>13.1f}{n / pg_wall / 1e6:>12.1f}"
    print(f"{name:<26}{times}{rates}{pg_wall / jax_wall:>11.2f}x{pg_cpu / jax_cpu:>10.2f}x")
  print("ratio = JAX throughput / polyagamma throughput (> 1: JAX faster)")


def main(argv):
  del argv
  print(f"jax {jax.__version__}, devices {jax.devices()}; {harness.cpu_description()}; "
        f"load average {harness.load_average():.1f}")
  bench_sampler()
  print(f"load average after: {harness.load_average():.1f} on {harness.schedulable_cores()} core(s)")


if __name__ == "__main__":
  app.run(main)
