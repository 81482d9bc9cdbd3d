"""One-vs-each likelihood, Pólya-Gamma augmentation and the OVE-PG loss (Kim, Ko & Park, arXiv 2504.14123).

Notation (DESIGN §4): f [n, C] prompt-model logits, f⁰ [n, C] frozen zero-shot ("teacher") logits, y [n]
labels.

* One-vs-each bound: p(y|f) ≥ Π_{c≠y} σ(f_y − f_c). Only the true-class row matters, so the OVE logits are
  ψ_{i,h} = f_{i,y_i} − f_{i,c_h}, h = 0..C−2 indexing the classes c ≠ y_i in increasing order (the official
  code's order). Shape [n, C−1]; memory O(n·C). The official code builds all C rows, n·C·(C−1) floats.
* Pólya-Gamma augmentation: σ(ψ) = ½·e^{ψ/2}·E_{ω~PG(1,0)}[e^{−ωψ²/2}], so given ω the likelihood is Gaussian
  in ψ with κ = ½; with the prior ψ ~ N(m, α⁻¹): ψ | ω ~ N((α·m + κ)/(ω + α), 1/(ω + α)).
* The loss (per sample, per pair, reparameterised ψ' = μ + σ·ε, averaged over M samples):
    L = −(1/n) Σ_i Σ_{c≠y_i} log σ(ψ'_{i,c}) + λ₁·mean_{i,c}(f_{i,c} − f⁰_{i,c})².
  As in the official code, the prior centre m is the prompt model's own ψ (so gradients reach the logits
  through μ, with ∂μ/∂ψ = α/(ω + α)) and ω is computed without gradient.

`mode="faithful"` reproduces the official implementation (the authors' Dassl trainer `APEX_OVE_PG`, whose
OVE-PG block the CoOp/CoCoOp/MaPLe variants share), read for this port:
  1. ω is never sampled: `polya_gamma_mean(b, c)` returns b/(clip(c, 1e-8, 20) + 1e-8)·tanh(min(c/2, 10)) of
     the frozen OVE logits ψ⁰ — twice the true E[PG(1, c)] = tanh(c/2)/(2c) for c > 0, 0.25 for every c ≤ 0,
     and frozen at tanh(10)/20 above c = 20 (`official_pg_mean`).
  2. κ is mis-broadcast: for class row j, `kappa[..., j]` is 1-D [n], `.repeat(1, C−1)` tiles it to
     [k₀..k_{n−1}, k₀..] and the reshape to [n·(C−1), 1] pairs flat position t = i·(C−1) + h with κ of sample
     t mod n. On the true-class row of sample i the pair (i, h) therefore gets κ = +½ only when
     y_{(i·(C−1)+h) mod n} = y_i, else −½ (`official_kappa`); all +½ when n = 1.
  3. λ₁ = 0 crashes there (the teacher is dropped but still called); here it simply drops the teacher term.
`mode="corrected"` (default): κ = +½ for every pair, and ω from
  `omega_source="prior_mean"`: E[PG(1, ψ⁰)] = tanh(|ψ⁰|/2)/(2|ψ⁰|), exact;
  `omega_source="prior_sample"`: ω ~ PG(1, ψ⁰), one draw per Monte Carlo sample (exact Devroye sampler);
  `omega_source="posterior_gibbs"`: ω ~ PG(1, ψ), a Gibbs step at the current OVE logits (stop_gradient).
Without teacher logits (allowed when λ₁ = 0) ψ⁰ falls back to stop_gradient(ψ), so the prior_* sources then
coincide with conditioning ω on the current logits.

Random numbers (part of the contract, so the loss can be reproduced outside). The loss indexes pairs by class
c ≠ y_i in an [n, C] layout (the y_i column unused): k_omega, k_eps = split(rng);
ε[m] = normal(split(k_eps, M)[m], [n, C]) (as `pg_posterior_sample` draws); sampled
ω = sample_polya_gamma(k_omega, 1, ψ⁰_full, shape=[M, n, C]) with ψ⁰_full[i, c] = ψ⁰ of the pair (i, c) and 0
in column y_i. (Raw uint32 keys are read with the default PRNG implementation, as jax.random does.)

Memory: with M = 1, loss + gradient w.r.t. the logits hold no [n, C] float intermediate beyond the inputs
and the gradient (XLA's memory analysis: 0.75x softmax cross-entropy at C = 1000, batch 32, the teacher logits
included; faithful mode adds the official κ as an [n, C] bool; benchmarks/bench_ove_pg_memory.py). How: a
custom JVP whose gradient is one elementwise expression, sums computed one pass at a time, and ε drawn inside
each pass from the key (`_ove_pg_terms`, `_ove_pg_terms_impl`, `_normals_from_key_data`). The sampled ω
sources add the ω array and the PG sampler's working set.

Bad input: shapes, dtypes and static options are validated at trace time (ValueError/TypeError naming the
value). Value checks (labels in [0, C), α ≥ 0, λ₁ ≥ 0) run eagerly wherever the values are concrete (Python
numbers, or any array outside jit); under jit the traced values cannot raise, so a bad label makes its row's
OVE logits NaN and a negative α or λ₁ makes the loss NaN — loud, never silently wrong. (Chosen over
`checkify`, which would force every caller to wrap the train step.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from bayesprompt.bayes._validate import check_nonnegative, concrete
from bayesprompt.bayes.polya_gamma import polya_gamma_mean, sample_polya_gamma

Array = jax.Array

OMEGA_SOURCES = ("prior_mean", "prior_sample", "posterior_gibbs")
MODES = ("corrected", "faithful")


# ------------------------------------------------------------------------------------------------------------
# Validation.


def _check_logits_labels(logits: Any, labels: Any, name: str = "logits") -> None:
  shape = np.shape(logits)
  if len(shape) != 2:
    raise ValueError(f"{name} must be [n, C]; got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
    raise TypeError(f"{name} must be floating; got dtype {jnp.result_type(logits)}")
  n, num_classes = shape
  if num_classes < 2:
    raise ValueError(f"one-vs-each needs C ≥ 2 classes; got {name} with C = {num_classes}")
  if np.shape(labels) != (n,):
    raise ValueError(f"labels must be [n] = [{n}] to match {name} {shape}; got shape {np.shape(labels)}")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"labels must be integers; got dtype {jnp.result_type(labels)}")
  labels_np = concrete(labels)
  if labels_np is not None and labels_np.size:
    bad = (labels_np < 0) | (labels_np >= num_classes)
    if bad.any():
      index = int(np.argmax(bad))
      raise ValueError(f"labels must lie in [0, {num_classes}); got labels[{index}] = {labels_np[index]}")


def _check_nonnegative(name: str, value: Any) -> None:
  value_np = concrete(value)
  if value_np is None:
    return
  if value_np.shape != ():
    raise ValueError(f"{name} must be a scalar; got shape {value_np.shape}")
  if not (np.isfinite(value_np) and value_np >= 0):
    raise ValueError(f"{name} must be finite and ≥ 0; got {name} = {value_np}")


# ------------------------------------------------------------------------------------------------------------
# One-vs-each.


def one_vs_each_differences(logits: Array, labels: Array) -> Array:
  """OVE logits ψ_{i,h} = f_{i,y_i} − f_{i,c_h} for the C − 1 classes c_h ≠ y_i (increasing order).

  Args:
    logits: [n, C] float logits f.
    labels: [n] int labels in [0, C).

  Returns:
    [n, C−1] in the dtype of `logits`. Memory O(n·C): only the true-class row of the OVE matrix is formed.
    Under jit, rows whose label is out of range are NaN.
  """
  _check_logits_labels(logits, labels)
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  num_classes = logits.shape[1]
  others = jnp.arange(num_classes - 1)[None, :]
  others = others + (others >= labels[:, None])  # skip the true class: c_h = h + [h ≥ y]
  true_logit = jnp.take_along_axis(logits, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=1)
  psi = true_logit - jnp.take_along_axis(logits, jnp.clip(others, 0, num_classes - 1), axis=1)
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid[:, None], psi, jnp.nan)


def one_vs_each_log_likelihood(logits: Array, labels: Array) -> Array:
  """log Π_{c≠y_i} σ(f_{i,y_i} − f_{i,c}) = Σ_h log σ(ψ_{i,h}), a lower bound on log softmax(f_i)_{y_i}.

  Args:
    logits: [n, C] float; labels: [n] int in [0, C).

  Returns:
    [n] log-likelihood bound, dtype of `logits`.
  """
  return jnp.sum(jax.nn.log_sigmoid(one_vs_each_differences(logits, labels)), axis=-1)


# ------------------------------------------------------------------------------------------------------------
# The PG-augmented Gaussian posterior over OVE logits.


def pg_posterior(psi_prior_mean: Array, prior_precision: Any, omega: Array,
                 kappa: Any = 0.5) -> tuple[Array, Array]:
  """Conditional posterior ψ | ω ~ N((α·m + κ)/(ω + α), 1/(ω + α)) under the prior ψ ~ N(m, α⁻¹).

  Args:
    psi_prior_mean: m, any shape (e.g. [n, C−1] OVE logits).
    prior_precision: prior precision α ≥ 0 (scalar).
    omega: Pólya-Gamma variables ω ≥ 0, broadcastable to m.
    kappa: y − ½ of the augmented Bernoulli likelihood (+½ for a true-class pair), broadcastable.

  Returns:
    (mean, var), each of the broadcast shape.

  Raises:
    ValueError: α < 0, or any ω < 0 or NaN (when concrete; a Pólya-Gamma variable is never negative, and
      ω < −α would give a negative variance). Under jit such values are not checked.
  """
  _check_nonnegative("prior_precision", prior_precision)
  check_nonnegative("omega", omega, "≥ 0 (Pólya-Gamma variables)")
  precision = omega + prior_precision
  return (prior_precision * psi_prior_mean + kappa) / precision, 1.0 / precision


def pg_posterior_sample(rng: Array, mean: Array, var: Array, num_samples: int | None = None) -> Array:
  """Reparameterised samples mean + √var·ε, ε ~ N(0, I); `num_samples` of them via vmap over split keys.

  Args:
    rng: PRNG key. mean, var: arrays of one broadcast shape S (var > 0).
    num_samples: M ≥ 1, or None for a single sample.

  Returns:
    [M, *S] (or [*S] when num_samples is None); sample m uses ε = normal(split(rng, M)[m], S).
  """
  mean, var = jnp.broadcast_arrays(jnp.asarray(mean), jnp.asarray(var))
  eps = _standard_normals(rng, num_samples, mean.shape, mean.dtype)
  return mean + jnp.sqrt(var) * eps


def _standard_normals(rng: Array, num_samples: int | None, shape: tuple[int, ...], dtype: Any) -> Array:
  if num_samples is None:
    return jax.random.normal(rng, shape, dtype)
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples must be an int ≥ 1; got {num_samples!r}")
  keys = jax.random.split(rng, int(num_samples))
  return jax.vmap(lambda key: jax.random.normal(key, shape, dtype))(keys)


# ------------------------------------------------------------------------------------------------------------
# The official code's behaviours (mode="faithful").


def official_pg_mean(c: Array) -> Array:
  """The official code's "PG mean" for b = 1: 1/(clip(c, 1e-8, 20) + 1e-8)·tanh(min(clip(c)/2, 10)).

  It equals 2·E[PG(1, c)] for 0 < c ≤ 20, 0.25 for every c ≤ 0 (instead of tanh(|c|/2)/(2|c|)) and stays at
  tanh(10)/20 for c > 20.
  """
  clipped = jnp.clip(c, 1e-8, 20.0)
  return jnp.tanh(jnp.minimum(0.5 * clipped, 10.0)) / (clipped + 1e-8)


def official_kappa(labels: Array, num_classes: int) -> Array:
  """The official code's κ on each true-class row, [n, C−1]: +½ if y_{(i·(C−1)+h) mod n} = y_i, else −½.

  (`kappa[..., j].repeat(1, C−1)` tiles the [n] column instead of broadcasting it; see the module docstring.)
  """
  labels = jnp.asarray(labels)
  n = labels.shape[0]
  flat = jnp.arange(n)[:, None] * (num_classes - 1) + jnp.arange(num_classes - 1)[None, :]
  return jnp.where(labels[flat % n] == labels[:, None], 0.5, -0.5)


def _official_kappa_positive(labels: Array, num_classes: int) -> Array:
  """Where `official_kappa` is +½, in the [n, C] layout: [n, C] bool, entry (i, c ≠ y_i) for pair
  h = c − [c > y_i] (column y_i: don't care).

  Pair (i, h) reads sample j = (r_i + h) mod n, r_i = i·(C − 1) mod n: along a row the pattern
  P[i, t] = [y_{(r_i + t) mod n} = y_i] repeats with period n. So the [n, C] array is two tiled [n, n] tables
  (P for c < y_i, P shifted by one for c > y_i): no gather with an [n, C] index array (which XLA-CPU
  materialises as int32, an [n, C] buffer).
  """
  labels = jnp.asarray(labels)
  n = labels.shape[0]
  rows = jnp.arange(n)
  start = (rows * (num_classes - 1)) % n
  pattern = labels[(start[:, None] + rows[None, :]) % n] == labels[:, None]  # P [n, n]
  reps = -(-num_classes // n)

  def tile(table):  # [n, n] → [n, C]: entry (i, c) = table[i, c mod n]
    return jnp.broadcast_to(table[:, None, :], (n, reps, n)).reshape(n, reps * n)[:, :num_classes]

  classes = jnp.arange(num_classes)[None, :]
  return jnp.where(classes > labels[:, None], tile(jnp.roll(pattern, 1, axis=1)), tile(pattern))


# ------------------------------------------------------------------------------------------------------------
# Standard normals that fuse into their consumers.

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_FUSED_NORMAL_BITS = {np.dtype(np.float32): (np.uint32, 32, 23), np.dtype(np.float64): (np.uint64, 64, 52)}


def _threefry2x32(key0: Array, key1: Array, count_hi: Array, count_lo: Array) -> tuple[Array, Array]:
  """Threefry-2x32 (20 rounds) unrolled, bit-identical to JAX's `threefry2x32` primitive.

  JAX lowers that primitive on CPU to a rolled `while` loop whose [M, n, C] state XLA must materialise (~4
  [n, C] buffers for one normal draw); unrolled it is elementwise uint32 arithmetic that XLA fuses into each
  consumer, so the noise costs no memory.
  """
  keys = (key0, key1, key0 ^ key1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = count_hi + keys[0], count_lo + keys[1]
  for block in range(5):
    for rotation in _THREEFRY_ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = (x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation))
      x1 = x0 ^ x1
    x0 = x0 + keys[(block + 1) % 3]
    x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _fusable_key_data(keys: Array, shape: tuple[int, ...], dtype: Any) -> Array | None:
  """Key data [M, 2] uint32 if `_normals_from_key_data` reproduces `normal(keys[m], shape, dtype)`, else None.

  That holds for threefry2x32 keys (JAX's default) under `jax_threefry_partitionable` (the default since JAX
  0.5), float32/float64 and fewer than 2³² elements per draw; anything else takes `jax.random.normal`.
  """
  if not jax.config.jax_threefry_partitionable or np.dtype(dtype) not in _FUSED_NORMAL_BITS:
    return None
  if math.prod(shape) >= 2**32 or str(jax.random.key_impl(keys)) != "threefry2x32":
    return None
  return jax.random.key_data(keys)


def _normals_from_key_data(key_data: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """[M, *shape] standard normals, bit-identical to vmap(lambda k: jax.random.normal(k, shape, dtype))(keys).

  Same steps as `jax.random.normal` (threefry bits of the flat element index, mantissa bits → uniform on
  [nextafter(−1, 0), 1), √2·erf⁻¹), written elementwise; see `_threefry2x32` for why.
  """
  dtype = np.dtype(dtype)
  uint_dtype, bits_width, mantissa_bits = _FUSED_NORMAL_BITS[dtype]
  full_shape = (key_data.shape[0], *shape)
  index = jnp.zeros(full_shape, np.uint32)  # flat element index within one draw (the 64-bit count's low word)
  for axis, stride in enumerate(np.cumprod((1, *shape[:0:-1]))[::-1]):
    index = index + jax.lax.broadcasted_iota(np.uint32, full_shape, axis + 1) * np.uint32(stride)
  key0 = key_data[:, 0].reshape((-1,) + (1,) * len(shape))
  key1 = key_data[:, 1].reshape((-1,) + (1,) * len(shape))
  bits0, bits1 = _threefry2x32(key0, key1, jnp.zeros_like(index), index)
  if bits_width == 32:
    bits = bits0 ^ bits1
  else:
    bits = (bits0.astype(uint_dtype) << uint_dtype(32)) | bits1.astype(uint_dtype)
  one_bits = np.array(1.0, dtype).view(uint_dtype)
  mantissa = (bits >> uint_dtype(bits_width - mantissa_bits)) | one_bits
  floats = jax.lax.bitcast_convert_type(mantissa, dtype) - np.array(1.0, dtype)
  low = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype))
  uniform = jnp.maximum(low, floats * (np.array(1.0, dtype) - low) + low)
  return np.array(np.sqrt(2), dtype) * jax.lax.erf_inv(uniform)


# ------------------------------------------------------------------------------------------------------------
# The loss.


class _LossConfig(NamedTuple):
  """Static options of `_ove_pg_terms`."""

  mode: str
  omega_source: str
  num_samples: int
  fused_noise: bool  # noise = key data [M, 2] (ε drawn in place), else ε [M, n, C]


def _pair_pieces(config: _LossConfig, logits, teacher, omega, kappa_positive, labels, noise,
                 prior_precision) -> dict[str, Array]:
  """Elementwise pieces of one Monte Carlo sample on the [n, C] pair layout (pair (i, c) at column c ≠ y_i).

  Args: as `_ove_pg_terms`, with omega [n, C] (this sample's sampled ω) or None and noise this sample's key
  data [2] or ε [n, C]. Returns a dict of [n, C] arrays (κ may be a scalar).
  """
  dtype = logits.dtype
  num_classes = logits.shape[1]
  in_range = (labels >= 0) & (labels < num_classes)
  label_index = jnp.clip(labels, 0, num_classes - 1)[:, None]
  is_pair = jnp.arange(num_classes)[None, :] != label_index  # [n, C]: c ≠ y_i

  def ove_full(f):
    psi = jnp.take_along_axis(f, label_index, axis=1) - f
    return jnp.where(in_range[:, None], psi, jnp.nan)  # traced bad labels → NaN rows

  psi = ove_full(logits)
  if config.omega_source == "posterior_gibbs" or teacher is None:
    psi_for_omega = jax.lax.stop_gradient(psi)
  else:
    psi_for_omega = ove_full(jax.lax.stop_gradient(teacher))
  if config.mode == "faithful":
    omega = official_pg_mean(psi_for_omega)
    kappa = jnp.where(kappa_positive, 0.5, -0.5).astype(dtype)
  else:
    kappa = 0.5
    if config.omega_source == "prior_mean":
      omega = polya_gamma_mean(1, psi_for_omega).astype(dtype)
  omega = jax.lax.stop_gradient(omega)
  eps = _normals_from_key_data(noise[None], logits.shape, dtype)[0] if config.fused_noise else noise
  precision = omega + prior_precision
  std = jax.lax.rsqrt(precision)
  sample = (prior_precision * psi + kappa) / precision + std * eps  # ψ' = μ + σ·ε
  return dict(psi=psi, is_pair=is_pair, omega=omega, kappa=kappa, eps=eps, precision=precision, std=std,
              sample=sample)


@functools.partial(jax.jit, static_argnums=(0,))  # eager callers: one compiled call, not hundreds of ops
def _ove_pg_terms_impl(config, logits, teacher, omega_sampled, kappa_positive, labels, row_mask, noise,
                       prior_precision, logits_dot=None, teacher_dot=None, prior_precision_dot=None):
  """(nll, teacher_reg, omega_mean, ove_nll) and, given any tangent, their JVP (see `_ove_pg_terms`).

  Tangents: None for a zero tangent (a symbolic zero in the JVP rule); all None returns the values only.

  How the memory stays low. Every sum is a pass over the [n, C] pairs that recomputes the elementwise pieces
  it needs from the inputs (ε included: `_normals_from_key_data`); the passes run one at a time as the
  branches of a `lax.switch` inside a `lax.map` over pass indices. Written as plain code instead, XLA would
  keep each expensive piece two sums share (divide, rsqrt, erf⁻¹, exp) as a full [n, C] buffer rather than
  recompute it, and schedules the sums' materialised inputs (XLA-CPU's sums read one) side by side; in the
  loop only one pass's [n, C] term exists at a time, and XLA places it in the gradient's output buffer, which
  is not yet written. The gradient is one more elementwise pass. (A single variadic reduce over all terms
  needs no buffer either, but XLA-CPU runs it as scalar code, ~5x slower.)
  """
  num_classes = logits.shape[1]
  num_samples = config.num_samples
  # Rows outside `row_mask` (padding) are left out of every sum and every mean: n counts the kept rows.
  n = jnp.maximum(jnp.sum(row_mask.astype(logits.dtype)), 1.0)
  scale = 1.0 / (num_samples * n)
  sampled_omega = omega_sampled is not None

  def pieces(sample, inputs):
    logits, teacher, omega, kappa_positive, labels, noise, prior_precision = inputs
    omega = None if omega is None else omega[sample]
    return _pair_pieces(config, logits, teacher, omega, kappa_positive, labels, noise[sample],
                        prior_precision)

  def pair_term(fn, sample=0):
    """inputs → fn(pieces of `sample`, inputs) on the pairs, 0 in column y_i; [n, C]."""
    def term(inputs):
      p = pieces(sample, inputs)
      return jnp.where(p["is_pair"], fn(p, inputs), 0.0)

    return term

  def slope(p, inputs):
    # ∂(−log σ(ψ'))/∂ψ' = −σ(−ψ'), ∂ψ'/∂ψ = α/(ω + α): the NLL's derivative w.r.t. ψ is −slope.
    return jax.nn.sigmoid(-p["sample"]) * (inputs[-1] / p["precision"])

  def prior_precision_term(p, inputs):
    # ∂ψ'/∂α = (ψ·ω − κ)/(ω + α)² − ½·ε·(ω + α)^{−3/2}.
    d_sample = (p["psi"] * p["omega"] - p["kappa"]) / jnp.square(p["precision"]) - (
        0.5 * p["eps"] * p["std"] / p["precision"])
    return -jax.nn.sigmoid(-p["sample"]) * d_sample

  terms = {"ove": pair_term(lambda p, _: jax.nn.log_sigmoid(jax.lax.stop_gradient(p["psi"])))}
  if teacher is not None:
    terms["teacher"] = lambda inputs: jnp.square(inputs[0] - inputs[1])
  for sample in range(num_samples if sampled_omega else 1):
    terms[f"omega{sample}"] = pair_term(lambda p, _: p["omega"], sample)
  for sample in range(num_samples):
    terms[f"nll{sample}"] = pair_term(lambda p, _: -jax.nn.log_sigmoid(p["sample"]), sample)
    if prior_precision_dot is not None:
      terms[f"prior_precision{sample}"] = pair_term(prior_precision_term, sample)
    if logits_dot is not None:
      terms[f"slope{sample}"] = pair_term(slope, sample)
  inputs = (logits, teacher, omega_sampled, kappa_positive, labels, noise, prior_precision)
  branches = [lambda inputs, fn=fn: jnp.sum(fn(inputs), axis=-1) for fn in terms.values()]  # row sums [n]
  rows = jax.lax.map(lambda index: jax.lax.switch(index, branches, inputs), jnp.arange(len(branches)))
  rows = jnp.where(row_mask[None, :], rows, 0.0)  # `where`, not a product: a padded row may hold NaN/inf
  sums = dict(zip(terms, rows, strict=True))

  def total(prefix, count):
    return sum(jnp.sum(sums[f"{prefix}{sample}"]) for sample in range(count))

  nll = total("nll", num_samples) * scale
  ove_nll = -jnp.sum(sums["ove"]) / n
  omega_draws = num_samples if sampled_omega else 1
  omega_mean = total("omega", omega_draws) / (omega_draws * n * (num_classes - 1))
  teacher_reg = jnp.zeros((), nll.dtype) if teacher is None else jnp.sum(sums["teacher"]) / (n * num_classes)
  primal_out = (nll, teacher_reg, omega_mean, ove_nll)
  if logits_dot is None and teacher_dot is None and prior_precision_dot is None:
    return primal_out

  zero = jnp.zeros((), nll.dtype)
  nll_dot, reg_dot = zero, zero
  if logits_dot is not None:
    # ψ_{i,c} = f_{i,y_i} − f_{i,c}: column c ≠ y_i gets +slope, column y_i gets −Σ_c slope. A row whose
    # label is out of range (NaN loss) gets 0, as autodiff through its NaN mask gives (padding rows).
    row_slope = sum(sums[f"slope{sample}"] for sample in range(num_samples))[:, None]
    is_pair = jnp.arange(num_classes)[None, :] != jnp.clip(labels, 0, num_classes - 1)[:, None]
    pair_slope = sum(pair_term(slope, sample)(inputs) for sample in range(num_samples))
    in_range = ((labels >= 0) & (labels < num_classes) & row_mask)[:, None]
    grad = jnp.where(in_range, jnp.where(is_pair, pair_slope, -row_slope) * scale, 0.0)
    nll_dot = nll_dot + jnp.sum(grad * logits_dot)
  if prior_precision_dot is not None:
    nll_dot = nll_dot + total("prior_precision", num_samples) * scale * prior_precision_dot
  if teacher is not None:
    residual = jnp.where(row_mask[:, None], (2.0 / (n * num_classes)) * (logits - teacher), 0.0)
    if logits_dot is not None:
      reg_dot = reg_dot + jnp.sum(residual * logits_dot)
    if teacher_dot is not None:
      reg_dot = reg_dot - jnp.sum(residual * teacher_dot)
  return primal_out, (nll_dot, reg_dot, zero, zero)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ove_pg_terms(config: _LossConfig, logits, teacher, omega_sampled, kappa_positive, labels, row_mask,
                  noise, prior_precision):
  """(nll, teacher_reg, omega_mean, ove_nll) of `ove_pg_loss`, scalars, with a hand-written derivative.

  Args (validated by the caller): logits [n, C]; teacher [n, C] or None; omega_sampled [M, n, C] (sampled ω
  sources) or None; kappa_positive [n, C] bool, where the official κ is +½ (faithful mode), or None; labels
  [n] int; row_mask [n] bool, the rows that count (the others are left out of every mean); noise: threefry
  key data [M, 2] uint32 (config.fused_noise) or ε [M, n, C]; prior_precision a scalar of the
  logits' dtype.

  Why a custom derivative: under autodiff XLA keeps ~7 [n, C] intermediates alive (ω, μ, σ, the sigmoid,
  the one-hot scatter of the true-class row, …), 3x the memory of softmax cross-entropy at C = 1000
  (benchmarks/bench_ove_pg_memory.py), and autodiff of the pass loop in `_ove_pg_terms_impl` would stack
  residuals per pass. Here the gradient w.r.t. the logits is one elementwise expression (+slope on the
  pairs, −Σ_c slope on the true class), recomputed from the inputs. Derivatives: exact w.r.t. logits (any
  order, forward and reverse: the rule is plain JAX), prior_precision, and teacher (through teacher_reg
  only); ω, κ and the ψ⁰ behind ω are constants (stop_gradient), as in the autodiff formulation; omega_mean
  and ove_nll have zero derivative.
  """
  return _ove_pg_terms_impl(config, logits, teacher, omega_sampled, kappa_positive, labels, row_mask, noise,
                            prior_precision)


@functools.partial(_ove_pg_terms.defjvp, symbolic_zeros=True)
def _ove_pg_terms_jvp(config, primals, tangents):
  logits_dot, teacher_dot, *_, prior_precision_dot = (
      None if isinstance(t, SymbolicZero) else t for t in tangents)
  return _ove_pg_terms_impl(config, *primals, logits_dot, teacher_dot, prior_precision_dot)


def ove_pg_loss(
    rng: Array,
    logits: Array,
    teacher_logits: Array | None,
    labels: Array,
    *,
    prior_precision: Any = 1.0,
    teacher_weight: Any = 0.2,
    num_samples: int = 1,
    omega_source: str = "prior_mean",
    mode: str = "corrected",
    row_mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The OVE-PG objective (DESIGN §4): PG-augmented one-vs-each NLL + λ₁·mean squared distance to the teacher.

  L = −(1/(M·n)) Σ_m Σ_i Σ_{c≠y_i} log σ(ψ'^{(m)}_{i,c}) + λ₁·mean_{i,c}(f_{i,c} − f⁰_{i,c})²,
  ψ'^{(m)} = μ + σ·ε^{(m)}, μ = (α·ψ + κ)/(ω + α), σ² = 1/(ω + α), ψ the OVE logits of `logits`.

  Memory: loss + gradient w.r.t. the logits hold O(1) [n, C] buffers beyond the inputs and the gradient (a
  custom JVP, `_ove_pg_terms`; ε drawn in place, `_normals_from_key_data`), plus the sampler's buffers for
  the sampled ω sources.

  Args:
    rng: PRNG key (ε, and ω for the sampled sources; see the module docstring for the exact key use).
    logits: [n, C] prompt-model logits f (float32 or float64); gradients flow through μ and the teacher term.
    teacher_logits: [n, C] frozen zero-shot logits f⁰ (no gradient), or None — allowed only when λ₁ = 0; ω
      then comes from the prompt model's own ψ (stop_gradient).
    labels: [n] int labels in [0, C).
    prior_precision: prior precision α ≥ 0 (paper: 1).
    teacher_weight: λ₁ ≥ 0 (paper: 0.2); 0 drops the teacher term.
    num_samples: M ≥ 1 reparameterised samples (static).
    omega_source: "prior_mean" | "prior_sample" | "posterior_gibbs" (faithful mode needs "prior_mean").
    mode: "corrected" (default) | "faithful" (the official code's ω and κ).
    row_mask: [n] bool or None (all rows). Rows where it is False (padding) are left out of every mean and
      get zero gradient; their labels may be anything (e.g. −1) and their logits NaN. With the padded rows
      at the end and omega_source="prior_mean", the loss and gradient equal those
      of the batch without them (ε of row i does not depend on n). Not so in faithful mode, whose κ pattern
      depends on the batch size n (the official trainer never sees padding), nor for the sampled ω sources
      (the sampler's draws depend on the array shape).

  Returns:
    (loss scalar, aux) with aux = {"nll": PG-OVE NLL term, "teacher_reg": mean squared logit distance (0
    without teacher), "omega_mean": mean ω, "ove_nll": −mean_i OVE log-likelihood of the plain logits}, all
    scalars.

  Raises:
    ValueError/TypeError: bad shapes/dtypes, n = 0, C < 2, labels outside [0, C) (when concrete), M < 1,
      unknown omega_source/mode, faithful mode with a sampled ω source, α or λ₁ negative or non-finite (when
      concrete), λ₁ > 0 without teacher logits.
  """
  if row_mask is not None:
    if np.shape(row_mask) != np.shape(labels):
      raise ValueError(f"row_mask must be [n] like labels {np.shape(labels)}; got shape {np.shape(row_mask)}")
    row_mask = jnp.asarray(row_mask, bool)
    labels = jnp.where(row_mask, jnp.asarray(labels), 0)  # padded rows' labels are never read
  if np.shape(logits)[:1] == (0,):
    raise ValueError(
        f"ove_pg_loss needs at least one example; got logits of shape {np.shape(logits)} (n = 0)")
  _check_logits_labels(logits, labels)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if omega_source not in OMEGA_SOURCES:
    raise ValueError(f"omega_source must be one of {OMEGA_SOURCES}; got {omega_source!r}")
  if mode == "faithful" and omega_source != "prior_mean":
    raise ValueError(
        f"mode='faithful' reproduces the official code, whose ω is its 'PG mean' of the frozen OVE logits; "
        f"omega_source must be 'prior_mean', got {omega_source!r}"
    )
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples must be an int ≥ 1; got {num_samples!r}")
  _check_nonnegative("prior_precision", prior_precision)
  _check_nonnegative("teacher_weight", teacher_weight)
  if teacher_logits is None:
    weight_np = concrete(teacher_weight)
    if weight_np is None or weight_np != 0:
      raise ValueError(
          f"teacher_logits is None but teacher_weight = {teacher_weight}; pass teacher logits or set it to 0"
      )
  else:
    if np.shape(teacher_logits) != np.shape(logits):
      raise ValueError(f"teacher_logits {np.shape(teacher_logits)} must match logits {np.shape(logits)}")
    if not jnp.issubdtype(jnp.result_type(teacher_logits), jnp.floating):
      raise TypeError(f"teacher_logits must be floating; got dtype {jnp.result_type(teacher_logits)}")

  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  dtype = logits.dtype
  n, num_classes = logits.shape
  num_samples = int(num_samples)
  row_mask = jnp.ones((n,), bool) if row_mask is None else row_mask
  teacher = None if teacher_logits is None else jax.lax.stop_gradient(jnp.asarray(teacher_logits, dtype))
  if not jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # a raw uint32 key: the default implementation, as jax.random does
  key_omega, key_eps = jax.random.split(rng)
  eps_keys = jax.random.split(key_eps, num_samples)

  label_index = jnp.clip(labels, 0, num_classes - 1)[:, None]
  omega_sampled = kappa_positive = None
  if mode == "faithful":
    # Computed once here: its index arithmetic inside the passes' fusions makes XLA-CPU emit scalar code.
    kappa_positive = _official_kappa_positive(label_index[:, 0], num_classes)
  elif omega_source != "prior_mean":
    # The sampler's ψ⁰ in the [n, C] layout (0 in column y_i, ignored; NaN rows for traced bad labels).
    source = logits if (omega_source == "posterior_gibbs" or teacher is None) else teacher
    in_range = ((labels >= 0) & (labels < num_classes))[:, None]
    tilt = jnp.where(in_range, jnp.take_along_axis(source, label_index, axis=1) - source, jnp.nan)
    tilt = jax.lax.stop_gradient(jnp.where(row_mask[:, None], tilt, 0.0))  # padded rows: any finite tilt
    omega_sampled = jax.lax.stop_gradient(
        sample_polya_gamma(key_omega, 1, tilt, shape=(num_samples, n, num_classes), dtype=dtype))

  key_data = _fusable_key_data(eps_keys, (n, num_classes), dtype)
  if key_data is None:
    noise = jax.vmap(lambda key: jax.random.normal(key, (n, num_classes), dtype))(eps_keys)  # [M, n, C]
  else:
    noise = key_data
  config = _LossConfig(mode, omega_source, num_samples, key_data is not None)
  nll, teacher_reg, omega_mean, ove_nll = _ove_pg_terms(
      config, logits, teacher, omega_sampled, kappa_positive, labels, row_mask, noise,
      jnp.asarray(prior_precision, dtype))

  loss = nll if teacher is None else nll + teacher_weight * teacher_reg
  # Traced negative α or λ₁ cannot raise under jit: make the loss NaN instead of silently wrong.
  loss = jnp.where((jnp.asarray(prior_precision) >= 0) & (jnp.asarray(teacher_weight) >= 0), loss, jnp.nan)
  aux = {"nll": nll, "teacher_reg": teacher_reg, "omega_mean": omega_mean, "ove_nll": ove_nll}
  return loss, aux
