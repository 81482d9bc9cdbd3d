"""Contrastive pretraining of the sandbox CLIP on the sandbox caption corpus (DESIGN §7); the binary is
experiments.pretrain_sandbox.

Symmetric InfoNCE with a learnable logit scale (clipped at ln 100, as CLIP), AdamW with linear warmup and
cosine decay, gradient clipping. Every step's batch (which images, which of their five captions) is a pure
function of (seed, step), so a resumed run (cfg["resume"]) is the uninterrupted run, bitwise on CPU.

Writes to cfg["workdir"]: config.json / git.json / metrics.jsonl / tensorboard/ (the run directory),
checkpoints/ (orbax, every checkpoint_every steps, the last keep_checkpoints kept) and results.json
(zero-shot accuracies of the final model); the final model is exported in open_clip hub layout with its
tokenizer to cfg["export_dir"] (default <workdir>/sandbox_clip).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from bayesprompt import clip
from bayesprompt.data.sandbox import builder, evaluate, model, tasks
from bayesprompt.train import checkpoint as checkpoint_lib
from bayesprompt.train import run_dir as run_dir_lib

# Flags that may differ between a run and its resumption.
RESUME_NEUTRAL = ("resume", "stop_after", "export_dir", "data_dir", "workdir", "log_every", "eval_every",
                  "overwrite")
SMOKE_COUNTS = {"captions": 192, "colour_shape": 2, "texture_shape": 2, "size_shape": 2, "catalogue": 2}


def resolve_config(values: dict) -> dict:
  """The run's hyper-parameters: `values` (the binary's flags: seed, world_seed, num_steps, batch_size,
  learning_rate, warmup_steps, end_lr_factor, weight_decay, grad_clip, vision_patch, vision_width, vision_layers,
  checkpoint_every, keep_checkpoints, log_every, eval_every, eval_slice, runlocal, resume, stop_after, workdir,
  export_dir, data_dir), shrunk to a seconds-long smoke run when values["runlocal"]."""
  values = dict(values)
  if values["runlocal"]:
    values.update(num_steps=min(values["num_steps"], 6), batch_size=16, warmup_steps=2, checkpoint_every=3,
                  vision_width=64, vision_layers=1, eval_every=0, eval_slice=64, log_every=1)
  return values


def builder_configs(cfg: dict) -> dict[str, str | builder.SandboxConfig]:
  """The TFDS builder configs the run reads: the shipped ones, or tiny ones for --runlocal."""
  out = {}
  for name in ("captions", *tasks.TASKS):
    if cfg["runlocal"]:
      out[name] = builder.SandboxConfig(name=f"{name}_smoke_w{cfg['world_seed']}", task=name,
                                        seed=cfg["world_seed"], count=SMOKE_COUNTS[name])
    elif cfg["world_seed"] != 0:
      out[name] = builder.SandboxConfig(name=f"{name}_w{cfg['world_seed']}", task=name, seed=cfg["world_seed"])
    else:
      out[name] = name  # the registered configs
  return out


def model_config(cfg: dict, tokenizer_spec: str) -> clip.CLIPConfig:
  base = model.config(tokenizer_spec, patch_size=cfg["vision_patch"], width=cfg["vision_width"],
                      layers=cfg["vision_layers"], heads=max(1, cfg["vision_width"] // 64),
                      mlp_dim=4 * cfg["vision_width"])
  if cfg["runlocal"]:
    base = base.replace(text=dataclasses.replace(base.text, width=64, layers=1, heads=1, mlp_dim=128),
                        embed_dim=32)
  return base


def load_corpus(config: str | builder.SandboxConfig, tokenizer, data_dir) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [N, 32, 32, 3] and token ids int32 [N, 1 + CAPTIONS_PER_IMAGE, T] of the caption corpus;
  T is the longest caption (+ SOT/EOT) rounded up to a multiple of 4 — positions past it only ever hold
  padding, which the causal mask keeps away from the pooled EOT feature."""
  data = evaluate.read_split(config, "train", data_dir=data_dir, fields=("image", "caption", "captions"))
  texts = [[c, *cs] for c, cs in zip(data["caption"], data["captions"], strict=True)]
  longest = max(len(tokenizer.encode(t)) for group in texts for t in group) + 2
  length = min(tokenizer.context_length, -(-longest // 4) * 4)
  flat = tokenizer([t for group in texts for t in group], context_length=length)
  return data["image"], flat.reshape(len(texts), len(texts[0]), length)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int,
                  captions_per_image: int) -> tuple[np.ndarray, np.ndarray]:
  """(image indices [B], caption choice [B]) of a step: epochs are seeded permutations of the corpus."""
  steps_per_epoch = num_examples // batch_size
  epoch, position = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  images = order[position * batch_size:(position + 1) * batch_size]
  captions = np.random.default_rng([seed, 1 << 20, step]).integers(0, captions_per_image, batch_size)
  return images, captions


def make_optimizer(cfg: dict) -> optax.GradientTransformation:
  """AdamW + warmup-cosine + clipping. Cached per hyper-parameters: the optimizer is a static argument of the
  jitted step, so an equal one must be the same object to reuse the compiled step."""
  keys = ("learning_rate", "warmup_steps", "num_steps", "end_lr_factor", "weight_decay", "grad_clip")
  return _make_optimizer(tuple((k, cfg[k]) for k in keys))


@functools.lru_cache(maxsize=8)
def _make_optimizer(hyper: tuple) -> optax.GradientTransformation:
  cfg = dict(hyper)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg["learning_rate"], cfg["warmup_steps"], max(cfg["num_steps"], cfg["warmup_steps"] + 1),
      cfg["learning_rate"] * cfg["end_lr_factor"])
  # Decay matrices only (not gains, biases, embeddings' scale-free LayerNorms or the logit scale).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]),
                     optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=cfg["weight_decay"],
                                 mask=decay_mask))


def contrastive_loss(params, images: jax.Array, token_ids: jax.Array, config: clip.CLIPConfig) -> tuple:
  """Symmetric InfoNCE over a batch of matched pairs: uint8 images [B, H, W, 3], ids [B, T]."""
  image_features, _ = clip.image_tower(params, evaluate.normalize_images(images), config=config)
  text_features, _ = clip.text_tower(params, token_ids, config=config)
  logits = clip.contrastive_logits(params, image_features, text_features)
  labels = jnp.arange(images.shape[0])
  loss_i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss_t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
  return (loss_i + loss_t) / 2, {"batch_accuracy": accuracy}


@functools.partial(jax.jit, static_argnames=("config", "optimizer"), donate_argnums=(0,))
def train_step(state: dict, images: jax.Array, token_ids: jax.Array, *, config: clip.CLIPConfig,
               optimizer: optax.GradientTransformation) -> tuple[dict, dict]:
  (loss, aux), grads = jax.value_and_grad(contrastive_loss, has_aux=True)(state["params"], images, token_ids,
                                                                           config)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, jnp.log(100.0))
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "logit_scale": jnp.exp(params["logit_scale"]),
             **aux}
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def summarize(results: dict) -> dict:
  flat = {}
  for name, r in results.items():
    for key in ("base", "new", "hm", "all"):
      flat[f"zeroshot/{name}/{key}"] = r[key]
  return flat


def run(cfg: dict) -> dict:
  """Trains (or resumes) with the resolved config `cfg` (see `resolve_config`).

  Returns:
    {"state": the train state at the last step run, "results": zero-shot results (None when stopped early
    by --stop_after), "export_dir": where the model was exported (None when stopped early)}.
  """
  workdir = pathlib.Path(cfg["workdir"])
  export_dir = pathlib.Path(cfg["export_dir"] or workdir / "sandbox_clip")
  data_dir = cfg["data_dir"]
  configs = builder_configs(cfg)
  tokenizer = model.tokenizer()

  run_dir_lib.check_fresh(workdir, resume=cfg["resume"], overwrite=cfg.get("overwrite", False))
  manager = checkpoint_lib.CheckpointManager(
      workdir / "checkpoints", save_interval_steps=cfg["checkpoint_every"], max_to_keep=cfg["keep_checkpoints"],
      config=cfg, ignore_config_keys=RESUME_NEUTRAL)
  writer = run_dir_lib.RunDir(workdir, cfg)

  started = time.time()
  logging.info("Preparing / reading the caption corpus ...")
  images, token_ids = load_corpus(configs["captions"], tokenizer, data_dir)
  logging.info("Corpus: %d images, tokens %s (%.1f s)", len(images), token_ids.shape, time.time() - started)
  config = model_config(cfg, model.TOKENIZER_FILE)
  optimizer = make_optimizer(cfg)
  params = clip.init_params(config, jax.random.key(cfg["seed"]))
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
  first_step = 0
  if cfg["resume"]:
    restored = manager.restore_latest(state)
    if restored is not None:
      first_step, state = restored
      logging.info("Resumed from step %d", first_step)

  def evaluate_now(limit):
    return evaluate.zero_shot(state["params"], config, tokenizer, data_dir=data_dir, limit=limit,
                              builder_configs=configs)

  last_step = cfg["num_steps"] if not cfg["stop_after"] else min(cfg["num_steps"], cfg["stop_after"])
  train_started, train_cpu_started = time.time(), time.process_time()
  metrics = None
  with tqdm(total=cfg["num_steps"], initial=first_step, desc="pretrain", disable=None) as bar:
    for step in range(first_step + 1, last_step + 1):
      idx, choice = batch_indices(cfg["seed"], step - 1, len(images), cfg["batch_size"], token_ids.shape[1])
      state, metrics = train_step(state, jnp.asarray(images[idx]), jnp.asarray(token_ids[idx, choice]),
                                  config=config, optimizer=optimizer)
      if step % cfg["log_every"] == 0 or step == last_step:
        values = {k: float(v) for k, v in metrics.items()}
        writer.write_scalars(step, {**values, "train_seconds": time.time() - train_started})
        bar.set_postfix(loss=f"{values['loss']:.3f}")
      if cfg["eval_every"] and step % cfg["eval_every"] == 0 and step != cfg["num_steps"]:
        writer.write_scalars(step, summarize(evaluate_now(cfg["eval_slice"])))
      manager.save(step, state, force=step == last_step)
      bar.update(1)
  manager.close()
  train_seconds = time.time() - train_started
  # CPU seconds of this process: unlike wall time, not inflated when other jobs share the cores.
  train_cpu_seconds = time.process_time() - train_cpu_started
  if last_step < cfg["num_steps"]:
    logging.info("Stopped after step %d of %d (--stop_after).", last_step, cfg["num_steps"])
    writer.close()
    return {"state": state, "results": None, "export_dir": None}

  results = evaluate_now(None)
  writer.write_scalars(cfg["num_steps"], summarize(results))
  regression = evaluate.regression_slice(state["params"], config, tokenizer, seed=cfg["world_seed"])
  summary = {
      "zero_shot": results, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
      "total_seconds": time.time() - started,
      "steps": cfg["num_steps"], "batch_size": cfg["batch_size"], "command": " ".join(sys.argv),
      "config": cfg, "model": {"vision": dataclasses.asdict(config.vision), "text": dataclasses.asdict(config.text),
                               "embed_dim": config.embed_dim},
      "corpus_size": len(images), "backend": jax.default_backend(), "regression_slice": regression,
  }
  writer.write_json("results.json", summary)
  # Export: open_clip hub layout, the tokenizer next to it (the config names it relative to the directory).
  clip.save_checkpoint(export_dir, config, jax.device_get(state["params"]))
  tokenizer.to_json(export_dir / model.TOKENIZER_FILE)
  shutil.copy(workdir / "results.json", export_dir / "results.json")
  writer.close()
  for name, r in results.items():
    logging.info("zero-shot %-22s base %.3f  new %.3f  hm %.3f  all %.3f  (chance base %.3f)", name, r["base"],
                 r["new"], r["hm"], r["all"], r["chance_base"])
  print(json.dumps({name: {k: round(v, 4) for k, v in r.items()} for name, r in results.items()}, indent=1))
  print(f"train time {train_seconds:.0f} s; exported to {export_dir}")
  return {"state": state, "results": results, "export_dir": export_dir}

