"""CLIP / SigLIP towers as pure functions of (params, inputs).

Every tower returns `(features, out)` (big_vision style): `features` are the projected, unnormalised
embeddings [batch, D]; `out` names the intermediates, one code path for all users:
  out["pre_projection"]       input of the projection (BayesVLM's Laplace lives there) [batch, width or mlp_dim]
  out["projection_residual"]  SigLIP image head only: embedding = fc2(pre_projection) + this
  out["tokens"]               final token sequence after the last block (before ln_post / ln_final)
  out["pool_index"]           [batch] index of the pooled token (shifted by inserted tokens)
  out["layer_inputs"]         with collect_intermediates=True: per layer, the tokens entering the block

Parameters are a plain nested dict (see `init_params`); blocks are stored stacked with a leading
[layers] axis so that runs of layers without length-changing edits execute under one `lax.scan`
(a 24-layer tower compiles as fast as one layer).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesprompt.clip import edits as edits_lib
from bayesprompt.clip.config import CLIPConfig, TextConfig, VisionConfig
from bayesprompt.clip.layers import AttentionPoolingHead, LayerNorm, ResidualBlock

Params = dict[str, Any]


def _dtype(config: CLIPConfig):
  return jnp.dtype(config.dtype)


def _block(tower: VisionConfig | TextConfig, dtype) -> ResidualBlock:
  return ResidualBlock(heads=tower.heads, mlp_dim=tower.mlp_dim, act=tower.act, ln_eps=tower.ln_eps, dtype=dtype)


def _map_head(config: CLIPConfig) -> AttentionPoolingHead:
  v = config.vision
  return AttentionPoolingHead(heads=v.heads, mlp_dim=v.mlp_dim, act=v.act, ln_eps=v.ln_eps, dtype=_dtype(config))


def _layer_norm(params: Params, x: jax.Array, eps: float) -> jax.Array:
  return LayerNorm(eps).apply({"params": params}, x)


# ----------------------------------------------------------------------------------------------- init


def init_params(config: CLIPConfig, rng: jax.Array) -> Params:
  """Random parameters with CLIP's initialisation scales (float32).

  Layout:
    visual: conv1.kernel [p, p, 3, W] (+ conv1.bias), class_embedding [W], positional_embedding [P, W],
            ln_pre, blocks (stacked [L, ...]), ln_post, proj.kernel [W, D] (CLIP) or head (SigLIP MAP head)
    text:   token_embedding [V, W_t], positional_embedding [context, W_t], blocks, ln_final,
            proj.kernel [W_t, D] (+ proj.bias for SigLIP)
    logit_scale [] (log space), logit_bias [] (SigLIP)
  """
  v, t = config.vision, config.text
  keys = iter(jax.random.split(rng, 16))
  normal = lambda shape, std: std * jax.random.normal(next(keys), shape, jnp.float32)
  ln = lambda width: {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}

  def blocks(tower, key):
    block = _block(tower, jnp.float32)
    dummy = jnp.zeros((1, 2, tower.width), jnp.float32)
    return jax.vmap(lambda k: block.init(k, dummy)["params"])(jax.random.split(key, tower.layers))

  visual: Params = {
      "conv1": {"kernel": normal((v.patch_size, v.patch_size, 3, v.width), (3 * v.patch_size**2) ** -0.5)},
      "positional_embedding": normal((v.num_positions, v.width), v.width**-0.5),
      "blocks": blocks(v, next(keys)),
      "ln_post": ln(v.width),
  }
  if v.patch_bias:
    visual["conv1"]["bias"] = jnp.zeros((v.width,), jnp.float32)
  if v.class_token:
    visual["class_embedding"] = normal((v.width,), v.width**-0.5)
  if v.ln_pre:
    visual["ln_pre"] = ln(v.width)
  if v.pool == "cls":
    visual["proj"] = {"kernel": normal((v.width, config.embed_dim), v.width**-0.5)}
  else:
    if config.embed_dim != v.width:
      raise ValueError(f"SigLIP's MAP head keeps the width: embed_dim {config.embed_dim} != vision width {v.width}")
    visual["head"] = _map_head(config).init(next(keys), jnp.zeros((1, 2, v.width)))["params"]
  text: Params = {
      "token_embedding": normal((t.vocab_size, t.width), 0.02),
      "positional_embedding": normal((t.context_length, t.width), 0.01),
      "blocks": blocks(t, next(keys)),
      "ln_final": ln(t.width),
      "proj": {"kernel": normal((t.width, config.embed_dim), t.width**-0.5)},
  }
  if t.proj_bias:
    text["proj"]["bias"] = jnp.zeros((config.embed_dim,), jnp.float32)
  params: Params = {"visual": visual, "text": text, "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
  if config.kind == "siglip":
    params["logit_scale"] = jnp.asarray(np.log(10.0), jnp.float32)
    params["logit_bias"] = jnp.asarray(-10.0, jnp.float32)
  return params


# --------------------------------------------------------------------------------------------- blocks


def _slice_layers(stacked: Params, start: int, stop: int) -> Params:
  return jax.tree.map(lambda p: p[start:stop], stacked)


def run_blocks(stacked_params: Params, x: jax.Array, pool_index: jax.Array, *, tower: VisionConfig | TextConfig,
               dtype, causal: bool, schedule: dict, name: str,
               collect_intermediates: bool = False) -> tuple[jax.Array, jax.Array, list]:
  """Runs the residual blocks with a token-edit schedule (see `bayesprompt.clip.edits`).

  Consecutive layers whose edits keep the sequence length and share one static structure (no edits, or
  replaces of the same shape at the same place) run under a single `lax.scan`, the edit tokens scanned
  along; layers that insert or drop tokens run on their own.

  Args:
    stacked_params: block params with a leading [layers] axis.
    x: [batch, T, width] float32 tokens.
    pool_index: [batch] int32.
  Returns:
    (x, pool_index, layer_inputs) — layer_inputs is a list of per-layer block inputs when requested.
  """
  block = _block(tower, dtype)
  num_layers = tower.layers
  layer_inputs: list = []

  def mask_for(length):
    return jnp.tril(jnp.ones((length, length), bool)) if causal else None

  def where(layer):
    return f"{name} tower, layer {layer}"

  def signature(layer, length):
    edits = schedule.get(layer, ())
    return edits_lib.edit_signature(edits, length, where(layer))

  layer = 0
  while layer < num_layers:
    edits = schedule.get(layer, ())
    changes_length = any(e.kind != "replace" for e in edits)
    if changes_length:
      x, pool_index = edits_lib.apply_edits(x, pool_index, edits, where(layer))
      if collect_intermediates:
        layer_inputs.append(x)
      params = jax.tree.map(lambda p, i=layer: p[i], stacked_params)
      x = block.apply({"params": params}, x, mask_for(x.shape[1]))
      layer += 1
      continue
    length = x.shape[1]
    sig = signature(layer, length)
    end = layer + 1
    while end < num_layers and not any(e.kind != "replace" for e in schedule.get(end, ())) \
        and signature(end, length) == sig:
      end += 1
    group_edits = [schedule.get(i, ()) for i in range(layer, end)]
    # The edit tokens of the group, stacked along the scanned axis: one array per edit slot.
    scanned_tokens = [jnp.stack([edits[slot].tokens for edits in group_edits]) for slot in range(len(edits))]
    mask = mask_for(length)
    template = edits

    def body(carry, inputs, template=template, mask=mask, first=layer):
      h, pool = carry
      layer_params, tokens = inputs
      layer_edits = [e.replace(tokens=tok) for e, tok in zip(template, tokens, strict=True)]
      h, pool = edits_lib.apply_edits(h, pool, layer_edits, where(first))
      h_in = h
      h = block.apply({"params": layer_params}, h, mask)
      return (h, pool), (h_in if collect_intermediates else None)

    (x, pool_index), inputs = jax.lax.scan(
        body, (x, pool_index), (_slice_layers(stacked_params, layer, end), scanned_tokens))
    if collect_intermediates:
      layer_inputs.extend(inputs[i] for i in range(end - layer))
    layer = end
  return x, pool_index, layer_inputs


# --------------------------------------------------------------------------------------------- towers


def _check_images(images: jax.Array, config: CLIPConfig) -> None:
  size = config.vision.image_size
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC [batch, {size}, {size}, 3], got shape {tuple(images.shape)}")
  if tuple(images.shape[1:3]) != (size, size):
    raise ValueError(f"images must be {size}x{size} (the model's image_size), got "
                     f"{images.shape[1]}x{images.shape[2]}; resize/crop them in the input pipeline")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be a float array (normalised pixels), got dtype {images.dtype}; "
                    "convert uint8 pixels with the CLIP preprocessing first")


def _pre_edits(schedule: edits_lib.Schedule | None) -> tuple:
  """Edits keyed -1 apply to the embedded sequence before ln_pre / the first block."""
  if not schedule or -1 not in schedule:
    return ()
  e = schedule[-1]
  return (e,) if isinstance(e, edits_lib.TokenEdit) else tuple(e)


def _layer_schedule(schedule, tower, name):
  if not schedule:
    return {}
  return edits_lib.validate_schedule({k: v for k, v in schedule.items() if k != -1}, tower.layers, tower.width, name)


def image_tower(params: Params, images: jax.Array, *, config: CLIPConfig,
                edits: edits_lib.Schedule | None = None,
                collect_intermediates: bool = False) -> tuple[jax.Array, dict[str, Any]]:
  """Image tower: NHWC images [batch, S, S, 3] float (CLIP-normalised) -> features [batch, D].

  Args:
    params: full model params (uses params["visual"]).
    images: [batch, image_size, image_size, 3] float.
    config: the model config (static).
    edits: optional token-edit schedule {layer: edits}; key -1 edits the embedded sequence before ln_pre
      (where VPT/MaPLe's official code appends their layer-0 prompts).
  Returns:
    (features [batch, D] float32, out) — see the module docstring for `out`.
  """
  _check_images(images, config)
  v, dtype = config.vision, _dtype(config)
  p = params["visual"]
  batch, grid, patch = images.shape[0], v.grid_size, v.patch_size
  # Patch embedding as one matmul (a stride-p conv without overlap): [b, g, p, g, p, 3] -> [b, g*g, p*p*3].
  patches = images.reshape(batch, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(batch, grid * grid, patch * patch * 3)
  kernel = p["conv1"]["kernel"].reshape(patch * patch * 3, v.width)
  x = jnp.dot(patches.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
  if v.patch_bias:
    x = x + p["conv1"]["bias"]
  if v.class_token:
    cls = jnp.broadcast_to(p["class_embedding"], (batch, 1, v.width))
    x = jnp.concatenate([cls, x], axis=1)
  x = x + p["positional_embedding"]
  pool_index = jnp.zeros((batch,), jnp.int32)
  out: dict[str, Any] = {}
  pre = _pre_edits(edits)
  if pre:
    edits_lib.validate_schedule({0: pre}, 1, v.width, "image")
    x, pool_index = edits_lib.apply_edits(x, pool_index, pre, "image tower, before ln_pre")
  if v.ln_pre:
    x = _layer_norm(p["ln_pre"], x, v.ln_eps)
  schedule = _layer_schedule(edits, v, "image")
  x, pool_index, layer_inputs = run_blocks(p["blocks"], x, pool_index, tower=v, dtype=dtype, causal=False,
                                           schedule=schedule, name="image",
                                           collect_intermediates=collect_intermediates)
  out["tokens"], out["pool_index"] = x, pool_index
  if collect_intermediates:
    out["layer_inputs"] = layer_inputs
  if v.pool == "cls":
    pooled = _layer_norm(p["ln_post"], x[jnp.arange(batch), pool_index], v.ln_eps)
    out["pre_projection"] = pooled
    features = jnp.dot(pooled.astype(dtype), p["proj"]["kernel"].astype(dtype), preferred_element_type=jnp.float32)
  else:
    x = _layer_norm(p["ln_post"], x, v.ln_eps)
    features, head_out = _map_head(config).apply({"params": p["head"]}, x)
    out.update(head_out)
  return features, out


def embed_tokens(params: Params, token_ids: jax.Array) -> jax.Array:
  """Token embeddings [M, T, W_t] of int ids [M, T] (no positional embedding)."""
  return jnp.take(params["text"]["token_embedding"], token_ids, axis=0)


def eot_index(token_ids: jax.Array) -> jax.Array:
  """[M] position of the EOT token: CLIP's EOT has the largest id, so argmax finds it (first occurrence)."""
  return jnp.argmax(token_ids, axis=-1).astype(jnp.int32)


def text_tower_from_embeddings(params: Params, token_embeddings: jax.Array, pool_index: jax.Array, *,
                               config: CLIPConfig, edits: edits_lib.Schedule | None = None,
                               collect_intermediates: bool = False) -> tuple[jax.Array, dict[str, Any]]:
  """Text tower on token *embeddings* — the entry point prompt learners use.

  Args:
    token_embeddings: [M, T, W_t] float, T ≤ context_length (positional embeddings are added here).
    pool_index: [M] int, the EOT position (ignored when the config pools the last position).
    edits: optional token-edit schedule; key -1 edits the sequence after positional embeddings.
  Returns:
    (features [M, D] float32, out).
  """
  t, dtype = config.text, _dtype(config)
  p = params["text"]
  if token_embeddings.ndim != 3 or token_embeddings.shape[-1] != t.width:
    raise ValueError(f"token embeddings must be [M, T, {t.width}], got shape {tuple(token_embeddings.shape)}")
  length = token_embeddings.shape[1]
  if length > t.context_length:
    raise ValueError(f"text sequence of {length} tokens exceeds the context length {t.context_length}")
  if pool_index.shape != token_embeddings.shape[:1]:
    raise ValueError(f"pool_index must be [{token_embeddings.shape[0]}], got shape {tuple(pool_index.shape)}")
  x = token_embeddings.astype(jnp.float32) + p["positional_embedding"][:length]
  pool_index = pool_index.astype(jnp.int32)
  pre = _pre_edits(edits)
  if pre:
    edits_lib.validate_schedule({0: pre}, 1, t.width, "text")
    x, pool_index = edits_lib.apply_edits(x, pool_index, pre, "text tower, before the first block")
  schedule = _layer_schedule(edits, t, "text")
  x, pool_index, layer_inputs = run_blocks(p["blocks"], x, pool_index, tower=t, dtype=dtype, causal=t.causal,
                                           schedule=schedule, name="text",
                                           collect_intermediates=collect_intermediates)
  out: dict[str, Any] = {"tokens": x, "pool_index": pool_index}
  if collect_intermediates:
    out["layer_inputs"] = layer_inputs
  x = _layer_norm(p["ln_final"], x, t.ln_eps)
  if t.pool == "eot":
    pooled = x[jnp.arange(x.shape[0]), pool_index]
  else:
    pooled = x[:, -1]
  out["pre_projection"] = pooled
  features = jnp.dot(pooled.astype(dtype), p["proj"]["kernel"].astype(dtype), preferred_element_type=jnp.float32)
  if t.proj_bias:
    features = features + p["proj"]["bias"]
  return features, out


def _check_token_ids(token_ids, config: CLIPConfig) -> None:
  t = config.text
  if token_ids.ndim != 2:
    raise ValueError(f"token ids must be [M, context_length], got shape {tuple(token_ids.shape)}")
  if token_ids.shape[1] > t.context_length:
    raise ValueError(f"token ids have length {token_ids.shape[1]} > context length {t.context_length}: tokenize "
                     "with the model's own tokenizer, clip.get_tokenizer(config)")
  if not jnp.issubdtype(token_ids.dtype, jnp.integer):
    raise TypeError(f"token ids must be integers, got dtype {token_ids.dtype}")
  if not isinstance(token_ids, jax.core.Tracer) and token_ids.size:
    ids = np.asarray(token_ids)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= t.vocab_size:
      bad = low if low < 0 else high
      raise ValueError(f"token id {bad} out of range [0, {t.vocab_size}) for this model's vocabulary; "
                       "tokenize with the model's own tokenizer, clip.get_tokenizer(config)")


def text_tower(params: Params, token_ids: jax.Array, *, config: CLIPConfig,
               edits: edits_lib.Schedule | None = None,
               collect_intermediates: bool = False) -> tuple[jax.Array, dict[str, Any]]:
  """Text tower on int token ids [M, T] -> (features [M, D], out). Pools at argmax(ids) (CLIP) or last (SigLIP).

  Token id 0 is never masked: it is a real token ("!") in CLIP's vocabulary; the causal mask alone
  keeps the pooled EOT feature independent of the padding after it.
  """
  _check_token_ids(token_ids, config)
  return text_tower_from_embeddings(params, embed_tokens(params, token_ids), eot_index(token_ids), config=config,
                                    edits=edits, collect_intermediates=collect_intermediates)


@functools.partial(jax.jit, static_argnames=("config",))
def _encode_image(params, images, config):
  return image_tower(params, images, config=config)[0]


@functools.partial(jax.jit, static_argnames=("config",))
def _encode_text(params, token_ids, config):
  return text_tower(params, token_ids, config=config)[0]


def encode_image(params: Params, images: jax.Array, *, config: CLIPConfig) -> jax.Array:
  """Projected, unnormalised image embeddings [N, D] of NHWC float images [N, S, S, 3] (jit-compiled)."""
  images = jnp.asarray(images)
  _check_images(images, config)
  return _encode_image(params, images, config)


def encode_text(params: Params, token_ids: jax.Array, *, config: CLIPConfig) -> jax.Array:
  """Projected, unnormalised text embeddings [M, D] of int token ids [M, T] (jit-compiled)."""
  token_ids = jnp.asarray(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids
  _check_token_ids(token_ids, config)
  return _encode_text(params, jnp.asarray(token_ids, jnp.int32), config)


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ‖x‖ along `axis` (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))


def contrastive_logits(params: Params, image_features: jax.Array, text_features: jax.Array) -> jax.Array:
  """exp(logit_scale)·cos(image, text) (+ logit_bias for SigLIP): [N, D] x [M, D] -> [N, M]."""
  logits = jnp.exp(params["logit_scale"]) * normalize(image_features) @ normalize(text_features).T
  if "logit_bias" in params:
    logits = logits + params["logit_bias"]
  return logits


def project_image(params: Params, pre_projection: jax.Array, *, config: CLIPConfig,
                  projection_residual: jax.Array | None = None) -> jax.Array:
  """Image embedding from the projection's input (the map BayesVLM's Laplace is over)."""
  if config.vision.pool == "cls":
    return pre_projection @ params["visual"]["proj"]["kernel"]
  if projection_residual is None:
    raise ValueError("SigLIP's image head needs projection_residual (out['projection_residual'])")
  fc2 = params["visual"]["head"]["fc2"]
  return pre_projection @ fc2["kernel"] + fc2["bias"] + projection_residual


def project_text(params: Params, pre_projection: jax.Array, *, config: CLIPConfig) -> jax.Array:
  """Text embedding from the projection's input."""
  proj = params["text"]["proj"]
  features = pre_projection @ proj["kernel"]
  return features + proj["bias"] if config.text.proj_bias else features
