r"""CLIP tower forward: bayesprompt.clip (jit-compiled JAX) vs transformers' CLIPModel (PyTorch), same weights.

What is compared (issue 2, "Performance"):
  * image tower: `image_tower` features vs `CLIPModel.get_image_features`, batch 8 images 224 px;
  * text tower:  `text_tower` features vs `CLIPModel.get_text_features`, 100 prompts x 77 tokens;
on the ViT-B/16-sized config `clip.get_config("vit_b16")` with random weights. The PyTorch model gets *our*
weights (params -> HF state dict via `checkpoint.params_to_state_dict(params, hf_mapping(config))`, then a
strict `load_state_dict`), and the script checks that both produce the same features (max over rows of
‖jax - torch‖ / ‖torch‖ ≤ 1e-3) before timing, so the two columns do the same work.

Timing: both frameworks in one process on the same cores. The process is pinned to `--threads` cores
(sched_setaffinity, before jax / torch start): XLA's CPU intra-op pool is sized from the affinity mask, and
torch gets `torch.set_num_threads(threads)`. Warm-up calls (incl. compilation) are excluded; then `--runs`
rounds, each timing every candidate once (interleaved, so drift hits all of them alike); we report the
median (and the inter-quartile range) in ms. PyTorch runs under `torch.inference_mode()` with the default
attention (SDPA). Extra rows: JAX with bfloat16 compute (`config.replace(dtype="bfloat16")`; LayerNorm,
softmax and the residual stream stay float32), whose error against the float32 reference is printed but not
asserted; and with `--unrolled`, the same float32 forward with the 12 blocks executed one by one instead of
under `lax.scan` (an edit schedule that inserts and immediately drops a token before every block: the same
math, bit for bit, but per-layer code) — plus the compile time of both variants (`--compile`).

Run (from the repo root, after `pip install -r requirements-bench.txt`):
  python benchmarks/bench_clip_forward.py                          # table, 20 rounds
  python benchmarks/bench_clip_forward.py --runs 30 --compile --unrolled
  python benchmarks/bench_clip_forward.py --threads 1 --tune-malloc  # 1 core; glibc malloc tuned (see tune_malloc)
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/bench_clip_forward.py   # try an XLA flag

torch and transformers are benchmark-only extras: nothing in `bayesprompt/` or `tests/` imports them.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from collections.abc import Callable


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="vit_b16", help="named bayesprompt.clip config")
  parser.add_argument("--image-batch", type=int, default=8)
  parser.add_argument("--text-batch", type=int, default=100)
  parser.add_argument("--runs", type=int, default=20, help="timed rounds; the median is reported")
  parser.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate after compilation")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="cores for both frameworks (default: all schedulable cores)")
  parser.add_argument("--towers", default="image,text", help="comma-separated subset of image,text")
  parser.add_argument("--no-bf16", action="store_true", help="skip the JAX bfloat16 row")
  parser.add_argument("--unrolled", action="store_true", help="add the JAX row with per-layer (unrolled) blocks")
  parser.add_argument("--compile", action="store_true", help="time lowering+compilation: scan vs unrolled")
  parser.add_argument("--torch-eager-attention", action="store_true",
                      help="use transformers' eager attention instead of SDPA for the PyTorch reference")
  parser.add_argument("--tune-malloc", action="store_true",
                      help="glibc mallopt before jax/torch start: one arena, no trimming, blocks <= 32 MiB from the "
                           "heap (stops XLA's worker threads from page-faulting fresh buffers on every call)")
  parser.add_argument("--tolerance", type=float, default=1e-3, help="max relative feature error (float32)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> None:
  """Keeps freed memory in the process instead of returning it to the kernel after every call.

  XLA runs a computation on its worker threads, whose glibc arenas are mmapped heaps that are trimmed
  (madvise) when buffers are freed, and blocks above the dynamic mmap threshold are mmapped per call: every
  forward then page-faults its activations in anew (the text tower: ~400k minor faults, ~15% of its CPU time,
  all in the kernel). One arena, a high trim threshold and a fixed 32 MiB mmap threshold (glibc's maximum)
  make repeated calls reuse the same pages. Must run before the thread pools allocate.
  """
  libc = ctypes.CDLL("libc.so.6")
  for option, value in ((M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, 1 << 30), (M_MMAP_THRESHOLD, 32 << 20)):
    if libc.mallopt(option, value) != 1:
      raise RuntimeError(f"mallopt({option}, {value}) failed")


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.tune_malloc:
  tune_malloc()
if ARGS is not None and ARGS.threads < len(os.sched_getaffinity(0)):
  # Before jax / torch create their thread pools: both then see `threads` cores.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])

# This checkout's bayesprompt, not whichever one is pip-installed (the script's own folder is sys.path[0]).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bayesprompt.clip as clip  # noqa: E402
from bayesprompt.clip import checkpoint  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

EOT_ID, BOS_ID = 49407, 49406  # CLIP BPE's <end_of_text> / <start_of_text>: EOT is the largest id.


def hf_clip_config(config: clip.CLIPConfig):
  """transformers CLIPConfig with exactly our architecture."""
  import transformers

  v, t = config.vision, config.text
  if config.kind != "clip":
    raise ValueError(f"this benchmark compares CLIP models, got kind {config.kind!r}")
  hf_act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                       hidden_act=hf_act[t.act], layer_norm_eps=t.ln_eps, projection_dim=config.embed_dim,
                       bos_token_id=BOS_ID, eos_token_id=EOT_ID, pad_token_id=1),
      vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                         num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                         hidden_act=hf_act[v.act], layer_norm_eps=v.ln_eps, projection_dim=config.embed_dim),
      projection_dim=config.embed_dim)


def torch_model(config: clip.CLIPConfig, params, eager_attention: bool):
  """transformers CLIPModel carrying `params` (strict load: every tensor mapped, nothing left at random init)."""
  import torch
  import transformers

  hf_config = hf_clip_config(config)
  hf_config._attn_implementation = "eager" if eager_attention else "sdpa"
  model = transformers.CLIPModel(hf_config).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           checkpoint.params_to_state_dict(params, checkpoint.hf_mapping(config)).items()}
  buffers = {name for name, _ in model.named_buffers()}  # position_ids: not weights
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or set(missing) - buffers:
    raise RuntimeError(f"state dict mismatch: missing {sorted(set(missing) - buffers)}, unexpected {unexpected}")
  return model


def random_inputs(config: clip.CLIPConfig, image_batch: int, text_batch: int, seed: int):
  """Images NHWC float32 ~ N(0, 1) (already 'normalised') and CLIP-shaped token ids [M, context]:
  BOS, random word ids, EOT at a random position, zero padding after (as clip.tokenize pads)."""
  rng = np.random.default_rng(seed)
  size, context = config.vision.image_size, config.text.context_length
  images = rng.standard_normal((image_batch, size, size, 3), dtype=np.float32)
  ids = np.zeros((text_batch, context), np.int32)
  lengths = rng.integers(3, context + 1, size=text_batch)  # tokens incl. BOS and EOT
  for row, length in enumerate(lengths):
    ids[row, 0] = BOS_ID
    ids[row, 1:length - 1] = rng.integers(1, min(BOS_ID, config.text.vocab_size - 2), size=length - 2)
    ids[row, length - 1] = EOT_ID
  return images, ids


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """max over rows of ‖ours - reference‖ / ‖reference‖."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.linalg.norm(ours - reference, axis=-1) / np.linalg.norm(reference, axis=-1)))


def per_layer_schedule(config_tower, batch_width: int):
  """Inserts one token and drops it again before every block: identical math, but each block then runs
  on its own instead of under one lax.scan (the tower's 'unrolled' code path)."""
  token = jnp.zeros((1, batch_width), jnp.float32)
  return {layer: (clip.edits.insert(token, position=-1), clip.edits.drop(position=-1, count=1))
          for layer in range(config_tower.layers)}


def jax_forwards(config: clip.CLIPConfig, tower: str, unrolled: bool) -> Callable:
  """A jit-compiled function (params, inputs) -> features [batch, D] of one tower."""
  if tower == "image":
    edits = per_layer_schedule(config.vision, config.vision.width) if unrolled else None
    return jax.jit(lambda p, x: clip.image_tower(p, x, config=config, edits=edits)[0])
  edits = per_layer_schedule(config.text, config.text.width) if unrolled else None
  return jax.jit(lambda p, ids: clip.text_tower(p, ids, config=config, edits=edits)[0])


def compile_seconds(fn, *args) -> float:
  start = time.perf_counter()
  fn.lower(*args).compile()
  return time.perf_counter() - start


def main(args: argparse.Namespace) -> int:
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  config = clip.get_config(args.config)
  print(f"machine: {harness.cpu_description()}")
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}; threads: torch.set_num_threads({torch.get_num_threads()}), XLA intra-op "
        f"pool = affinity mask of {len(os.sched_getaffinity(0))} core(s); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"malloc tuned: {args.tune_malloc}")
  v, t = config.vision, config.text
  print(f"config {args.config}: vision {v.layers}x{v.width} patch {v.patch_size} @ {v.image_size}px, "
        f"text {t.layers}x{t.width} ctx {t.context_length}; batch {args.image_batch} images / {args.text_batch} prompts; "
        f"median of {args.runs} rounds after {args.warmup} warm-up calls")

  params = clip.init_params(config, jax.random.key(args.seed))
  model = torch_model(config, params, args.torch_eager_attention)
  images, ids = random_inputs(config, args.image_batch, args.text_batch, args.seed)
  bf16_config = config.replace(dtype="bfloat16")

  towers = [name.strip() for name in args.towers.split(",") if name.strip()]
  results = []
  compile_rows = []
  failed = False
  for tower in towers:
    if tower == "image":
      jax_input = jnp.asarray(images)
      torch_input = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # NCHW
      torch_fn = model.get_image_features
    elif tower == "text":
      jax_input = jnp.asarray(ids)
      torch_input = torch.from_numpy(ids.astype(np.int64))
      torch_fn = model.get_text_features
    else:
      raise ValueError(f"unknown tower {tower!r}; expected image or text")

    def run_torch(fn=torch_fn, x=torch_input):
      with torch.inference_mode():
        out = fn(x)
      return out.pooler_output if hasattr(out, "pooler_output") else out

    jax_variants = {"jax float32 (scan)": (config, False)}
    if not args.no_bf16:
      jax_variants["jax bfloat16 (scan)"] = (bf16_config, False)
    if args.unrolled or args.compile:
      jax_variants["jax float32 (unrolled)"] = (config, True)
    compiled = {name: jax_forwards(cfg, tower, unrolled) for name, (cfg, unrolled) in jax_variants.items()}
    if args.compile:
      for name in ("jax float32 (scan)", "jax float32 (unrolled)"):
        # A fresh jit object each time, so nothing is cached from an earlier trace.
        fresh = jax_forwards(config, tower, unrolled=name.endswith("(unrolled)"))
        compile_rows.append((tower, name, compile_seconds(fresh, params, jax_input)))

    reference = run_torch().float().numpy()
    errors = {"torch float32": 0.0}
    for name, fn in compiled.items():
      errors[name] = relative_error(np.asarray(fn(params, jax_input)), reference)
      if "float32" in name and errors[name] > args.tolerance:
        print(f"FAIL {tower} {name}: relative feature error {errors[name]:.2e} > {args.tolerance:g}: "
              "the two frameworks do not compute the same function", file=sys.stderr)
        failed = True

    candidates = {"torch float32": run_torch}
    for name, fn in compiled.items():
      if name == "jax float32 (unrolled)" and not args.unrolled:
        continue
      candidates[name] = lambda fn=fn, x=jax_input: fn(params, x).block_until_ready()
    comparison = harness.interleaved(candidates, rounds=args.runs, warmup=args.warmup)
    results.append((tower, comparison, errors))

  for tower, comparison, errors in results:
    print(f"\n{tower} tower (relative feature error vs torch: "
          + ", ".join(f"{name} {error:.1e}" for name, error in errors.items() if name != "torch float32") + ")")
    print(comparison.markdown(reference="torch float32"))
    for name in comparison.samples:
      if name.startswith("jax"):
        ratio = comparison.ratio(name, "torch float32")
        verdict = "meets" if ratio.median <= 0.7 else "misses"
        print(f"  {tower:5} {name:24} x torch ({comparison.headline} time): {ratio.format(2)} "
              f"({verdict} the <= 0.70 target)")
  if compile_rows:
    print("\ncompile time (jit lower + XLA compile, float32):")
    for tower, name, seconds in compile_rows:
      print(f"  {tower:5} {name:24} {seconds:6.2f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(ARGS))
