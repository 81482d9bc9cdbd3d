r"""CoOp train step: bayesprompt (jit-compiled JAX) vs the same work in PyTorch (transformers' CLIPModel).

The work of one CoOp step (issue 5, "Performance"): image tower forward on a batch (frozen, no gradient), text
tower forward + backward over C class prompts "SOS [ctx x n] class name . EOT pad" (gradient w.r.t. the n
context vectors only; the frozen weights get none), CE on exp(logit_scale)·cos logits, and an SGD-momentum
update of the context (Dassl: momentum 0.9, weight decay 5e-4).

  * JAX: the library's own step, `prompt_trainer.make_train_step(learner, ce, sgd)` with
    `make_learner("coop", config, n_ctx=16, full_context=True)`: prompts padded to the full 77 tokens, as the
    reference implementations run them. A second JAX row uses the default trimmed context (prompts cut to the
    longest prompt of the class list; exact under the causal mask) — a separate speed-up, not the same work.
  * PyTorch: transformers' CLIPModel carrying *our* weights (params -> HF state dict, strict load, as in
    bench_clip_forward.py); CoOp's official TextEncoder (prompt embeddings + positional embedding -> causal
    encoder -> final LayerNorm -> EOT feature -> text_projection) on the HF modules, the image tower under
    `torch.no_grad()`, weights with requires_grad=False, `torch.optim.SGD` on the context.
Before timing, both compute the loss and the context gradient at the same point and must agree (relative
error <= 1e-3), so the two columns do the same work.

Timing as in bench_clip_forward.py: both frameworks in one process, pinned to `--threads` cores; warm-up calls
(compilation) excluded; `--runs` interleaved rounds; median wall and process-CPU time per step. On a shared
machine the CPU-time ratio is the steadier figure.

  python benchmarks/bench_coop_step.py                       # ViT-B/16, C=100, batch 32, 5 rounds
  python benchmarks/bench_coop_step.py --batch 8 --classes 50 --runs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="vit_b16", help="named bayesprompt.clip config")
  parser.add_argument("--layers", type=int, default=None, help="override both towers' depth (smaller runs)")
  parser.add_argument("--batch", type=int, default=32, help="images per step")
  parser.add_argument("--classes", type=int, default=100, help="C class prompts per step")
  parser.add_argument("--n_ctx", type=int, default=16)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--no-trimmed", action="store_true", help="skip the trimmed-context JAX row")
  parser.add_argument("--tolerance", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads < len(os.sched_getaffinity(0)):
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])

# This checkout's bayesprompt, not whichever one is pip-installed (the script's own folder is sys.path[0]).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bayesprompt.clip as clip  # noqa: E402
from bayesprompt.objectives import make_objective  # noqa: E402
from bayesprompt.prompts import make_learner  # noqa: E402
from bayesprompt.train import optim, prompt_trainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_clip_forward import torch_model  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 2e-3, 0.9, 5e-4
WORDS = ("red green blue small large striped spotted round square wooden metal glass paper stone golden silver "
         "dog cat bird fish car plane boat flower tree house chair table lamp cup bottle shoe hat").split()


def class_names(count: int, seed: int) -> list[str]:
  """`count` distinct 1-3 word class names (varied prompt lengths, as real class lists)."""
  rng = np.random.default_rng(seed)
  names: list[str] = []
  while len(names) < count:
    name = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)), replace=False))
    if name not in names:
      names.append(name)
  return names


def jax_step(config, clip_params, classnames, n_ctx, full_context, seed):
  learner = make_learner("coop", config, n_ctx=n_ctx, full_context=full_context)
  class_state = learner.prepare_classes(clip_params, classnames, templates=["a photo of a {}."])
  optimizer = optim.make_optimizer("sgd", LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM)
  step = prompt_trainer.make_train_step(learner, make_objective("ce"), optimizer)
  state = prompt_trainer.create_train_state(learner, optimizer, seed, clip_params, class_state)
  return learner, class_state, step, state


class TorchCoOp:
  """CoOp's official TextEncoder and step on a transformers CLIPModel (weights frozen, context learned)."""

  def __init__(self, model, class_state, ctx: np.ndarray, device: str = "cpu"):
    import torch

    self.torch = torch
    self.model = model
    for p in model.parameters():
      p.requires_grad_(False)
    embeddings = np.asarray(class_state.token_embeddings)  # [C, T, W] frozen token embeddings
    mask = np.asarray(class_state.ctx_mask)
    n_ctx = ctx.shape[0]
    if not (mask[:, 1:1 + n_ctx].all() and mask.sum() == mask.shape[0] * n_ctx):
      raise ValueError("expected the context at positions 1..n_ctx of every prompt (class token at the end)")
    self.prefix = torch.from_numpy(embeddings[:, :1].copy()).to(device)
    self.suffix = torch.from_numpy(embeddings[:, 1 + n_ctx:].copy()).to(device)
    self.pool_index = torch.from_numpy(np.asarray(class_state.pool_index).astype(np.int64)).to(device)
    length = embeddings.shape[1]
    self.causal = torch.full((length, length), float("-inf"), device=device).triu(1)[None, None]
    self.ctx = torch.nn.Parameter(torch.from_numpy(np.array(ctx)).to(device))
    self.optimizer = torch.optim.SGD([self.ctx], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

  def text_features(self):
    torch, text = self.torch, self.model.text_model
    classes = self.prefix.shape[0]
    prompts = torch.cat([self.prefix, self.ctx[None].expand(classes, -1, -1), self.suffix], dim=1)
    hidden = prompts + text.embeddings.position_embedding.weight[:prompts.shape[1]]
    hidden = text.encoder(inputs_embeds=hidden, attention_mask=self.causal).last_hidden_state
    hidden = text.final_layer_norm(hidden)
    pooled = hidden[torch.arange(classes, device=hidden.device), self.pool_index]
    return self.model.text_projection(pooled)

  def loss(self, pixels, labels):
    torch = self.torch
    with torch.no_grad():
      image = self.model.get_image_features(pixel_values=pixels)
      image = getattr(image, "pooler_output", image)
      image = image / image.norm(dim=-1, keepdim=True)
    text = self.text_features()
    text = text / text.norm(dim=-1, keepdim=True)
    logits = self.model.logit_scale.exp() * image @ text.t()
    return torch.nn.functional.cross_entropy(logits, labels)

  def step(self, pixels, labels):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(pixels, labels)
    loss.backward()
    self.optimizer.step()
    return loss


def main(args: argparse.Namespace) -> int:
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  config = clip.get_config(args.config)
  if args.layers is not None:
    config = config.replace(vision=dataclasses.replace(config.vision, layers=args.layers),
                            text=dataclasses.replace(config.text, layers=args.layers))
  v, t = config.vision, config.text
  print(f"machine: {harness.cpu_description()}")
  print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.threads} thread(s) each")
  print(f"config {args.config}: vision {v.layers}x{v.width} patch {v.patch_size} @ {v.image_size}px, text "
        f"{t.layers}x{t.width} ctx {t.context_length}; batch {args.batch} images, C={args.classes} classes, "
        f"n_ctx={args.n_ctx}; median of {args.runs} rounds after {args.warmup} warm-up step(s)")

  clip_params = clip.init_params(config, jax.random.key(args.seed))
  model = torch_model(config, clip_params, eager_attention=False)
  classnames = class_names(args.classes, args.seed)
  rng = np.random.default_rng(args.seed)
  images = rng.standard_normal((args.batch, v.image_size, v.image_size, 3), dtype=np.float32)
  labels = rng.integers(0, args.classes, size=args.batch).astype(np.int32)
  jax_images, jax_labels = jnp.asarray(images), jnp.asarray(labels)
  pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  torch_labels = torch.from_numpy(labels.astype(np.int64))

  learner, class_state, step, state = jax_step(config, clip_params, classnames, args.n_ctx, True, args.seed)
  print(f"prompt length: full {class_state.sequence_length} tokens", end="")
  reference = TorchCoOp(model, class_state, np.asarray(state.params["ctx"]))
  teacher = class_state.zeroshot_text_features

  # Same work: loss and context gradient at the same point.
  def jax_loss(ctx, clip_params, class_state, jax_images, jax_labels):
    output = learner.apply({"ctx": ctx}, clip_params, class_state, jax_images, None, train=True)
    log_probs = jax.nn.log_softmax(output.logits[0], axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, jax_labels[:, None], axis=-1))

  loss_j, grad_j = jax.jit(jax.value_and_grad(jax_loss))(state.params["ctx"], clip_params, class_state,
                                                      jax_images, jax_labels)
  loss_t = reference.loss(pixels, torch_labels)
  loss_t.backward()
  grad_t = reference.ctx.grad.numpy()
  loss_t = float(loss_t.detach())
  loss_err = abs(float(loss_j) - loss_t) / abs(loss_t)
  grad_err = float(np.linalg.norm(np.asarray(grad_j) - grad_t) / np.linalg.norm(grad_t))
  reference.optimizer.zero_grad(set_to_none=True)

  holder = {"full": state}

  def run_jax_full():
    holder["full"], metrics = step(holder["full"], clip_params, class_state, jax_images, jax_labels, teacher)
    jax.block_until_ready(metrics)

  candidates = {"torch float32 (77 tokens)": lambda: reference.step(pixels, torch_labels),
                "jax float32 (77 tokens)": run_jax_full}
  if not args.no_trimmed:
    _, trimmed_state, trimmed_step, holder["trim"] = jax_step(config, clip_params, classnames, args.n_ctx, False,
                                                              args.seed)
    print(f", trimmed {trimmed_state.sequence_length} tokens")

    def run_jax_trimmed():
      holder["trim"], metrics = trimmed_step(holder["trim"], clip_params, trimmed_state, jax_images, jax_labels,
                                             trimmed_state.zeroshot_text_features)
      jax.block_until_ready(metrics)

    candidates[f"jax float32 (trimmed, {trimmed_state.sequence_length} tokens)"] = run_jax_trimmed
  else:
    print()
  print(f"same work: loss rel. error {loss_err:.1e}, context-gradient rel. error {grad_err:.1e}")
  if max(loss_err, grad_err) > args.tolerance:
    print(f"FAIL: JAX and PyTorch disagree beyond {args.tolerance:g}", file=sys.stderr)
    return 1

  comparison = harness.interleaved(candidates, rounds=args.runs, warmup=args.warmup)
  torch_name = next(iter(candidates))
  print()
  print(comparison.markdown(reference=torch_name))
  ratio = comparison.ratio("jax float32 (77 tokens)", torch_name, "cpu")
  print(f"JAX/PyTorch, same 77-token work, CPU time: {ratio.format(2)} per-round median (min-max) "
        f"({'meets' if ratio.median <= 0.7 else 'misses'} the <= 0.70 target)")
  return 0


if __name__ == "__main__":
  sys.exit(main(ARGS))
