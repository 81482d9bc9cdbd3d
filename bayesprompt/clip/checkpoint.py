"""Loading and saving the checkpoints users hold: open_clip, transformers (CLIP and SigLIP), OpenAI.

Supported:
  * open_clip hub layout: a directory with `open_clip_config.json` (`model_cfg`) + `open_clip_model.safetensors`
    (or `open_clip_pytorch_model.bin`, pickle);
  * transformers layout: a directory with `config.json` (model_type clip / siglip) + `model.safetensors`
    (or `pytorch_model.bin`, pickle);
  * a bare `.safetensors` file in open_clip or transformers naming: the architecture is inferred from tensor
    shapes (heads = width // 64, as OpenAI does; `quick_gelu` must be given since shapes can't tell);
  * `.pt` / `.bin` pickles (OpenAI's TorchScript `ViT-B-16.pt`, open_clip `.bin`): only with torch installed
    AND `allow_pickle=True` — unpickling runs arbitrary code, so it is never the default;
  * registered names (`register_checkpoint`; e.g. "sandbox": the project's pretrained sandbox CLIP, shipped as
    package data and registered by `bayesprompt.data.sandbox` on import: clip/ imports nothing above itself).

Weight mapping (torch -> Flax): fused `in_proj_weight` [3W, W] splits into q/k/v; `nn.Linear` weights [out, in]
are transposed to Dense kernels [in, out]; conv1 [out, in, kh, kw] -> [kh, kw, in, out]; open_clip's
`visual.proj` and `text_projection` are already used as `x @ P` and are NOT transposed; HF's
`visual_projection.weight` / `text_projection.weight` are Linear weights and are.
Loading is all-or-nothing: every key is checked (missing, unexpected, shape) before params are returned.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesprompt.clip.config import CLIPConfig, TextConfig, VisionConfig
from bayesprompt.errors import UserError, UserFileNotFoundError

Params = dict[str, Any]

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Buffers some exports carry that are not parameters.
_IGNORED_KEYS = re.compile(r"(^|\.)(attn_mask|position_ids|input_resolution|context_length|vocab_size)$")

_NAMED_CHECKPOINTS: dict[str, Callable[[], pathlib.Path]] = {}


class CheckpointError(UserError):
  """A checkpoint could not be loaded; the message names the file, key or shape at fault."""


def register_checkpoint(name: str, locate: Callable[[], pathlib.Path]) -> None:
  """Makes `load_checkpoint(name)` resolve to the directory `locate()` returns."""
  _NAMED_CHECKPOINTS[name] = locate


# ------------------------------------------------------------------------------------------ mappings
# A mapping is a list of (our path, source key, transform name). Transforms are invertible so the same
# table serves loading and saving.

_FORWARD = {
    "id": lambda a: a,
    "T": lambda a: a.T,  # torch Linear [out, in] -> Dense kernel [in, out]
    "conv": lambda a: a.transpose(2, 3, 1, 0),  # [out, in, kh, kw] -> [kh, kw, in, out]
    "scalar": lambda a: a.reshape(()),
}
_INVERSE = {
    "id": lambda a: a,
    "T": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "scalar": lambda a: a,
}


def _block_entries_open_clip(prefix: str, ours: str, layers: int) -> list[tuple]:
  entries = []
  for i in range(layers):
    src, dst = f"{prefix}.{i}", f"{ours}/{i}"
    entries += [
        (f"{dst}/ln_1/scale", f"{src}.ln_1.weight", "id"), (f"{dst}/ln_1/bias", f"{src}.ln_1.bias", "id"),
        (f"{dst}/attn/qkv/kernel", f"{src}.attn.in_proj_weight", "qkv"),
        (f"{dst}/attn/qkv/bias", f"{src}.attn.in_proj_bias", "qkv_bias"),
        (f"{dst}/attn/out/kernel", f"{src}.attn.out_proj.weight", "T"),
        (f"{dst}/attn/out/bias", f"{src}.attn.out_proj.bias", "id"),
        (f"{dst}/ln_2/scale", f"{src}.ln_2.weight", "id"), (f"{dst}/ln_2/bias", f"{src}.ln_2.bias", "id"),
        (f"{dst}/mlp/fc1/kernel", f"{src}.mlp.c_fc.weight", "T"), (f"{dst}/mlp/fc1/bias", f"{src}.mlp.c_fc.bias", "id"),
        (f"{dst}/mlp/fc2/kernel", f"{src}.mlp.c_proj.weight", "T"),
        (f"{dst}/mlp/fc2/bias", f"{src}.mlp.c_proj.bias", "id"),
    ]
  return entries


def _block_entries_hf(prefix: str, ours: str, layers: int) -> list[tuple]:
  entries = []
  for i in range(layers):
    src, dst = f"{prefix}.{i}", f"{ours}/{i}"
    entries += [
        (f"{dst}/ln_1/scale", f"{src}.layer_norm1.weight", "id"), (f"{dst}/ln_1/bias", f"{src}.layer_norm1.bias", "id"),
        (f"{dst}/ln_2/scale", f"{src}.layer_norm2.weight", "id"), (f"{dst}/ln_2/bias", f"{src}.layer_norm2.bias", "id"),
        (f"{dst}/mlp/fc1/kernel", f"{src}.mlp.fc1.weight", "T"), (f"{dst}/mlp/fc1/bias", f"{src}.mlp.fc1.bias", "id"),
        (f"{dst}/mlp/fc2/kernel", f"{src}.mlp.fc2.weight", "T"), (f"{dst}/mlp/fc2/bias", f"{src}.mlp.fc2.bias", "id"),
    ]
    for ours_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
      entries += [(f"{dst}/attn/{ours_name}/kernel", f"{src}.self_attn.{hf_name}.weight", "T"),
                  (f"{dst}/attn/{ours_name}/bias", f"{src}.self_attn.{hf_name}.bias", "id")]
  return entries


def open_clip_mapping(config: CLIPConfig) -> list[tuple]:
  v, t = config.vision, config.text
  if config.kind != "clip":
    raise CheckpointError("open_clip naming is supported for CLIP models; SigLIP loads from transformers layout")
  return [
      ("visual/conv1/kernel", "visual.conv1.weight", "conv"),
      ("visual/class_embedding", "visual.class_embedding", "id"),
      ("visual/positional_embedding", "visual.positional_embedding", "id"),
      ("visual/ln_pre/scale", "visual.ln_pre.weight", "id"), ("visual/ln_pre/bias", "visual.ln_pre.bias", "id"),
      ("visual/ln_post/scale", "visual.ln_post.weight", "id"), ("visual/ln_post/bias", "visual.ln_post.bias", "id"),
      ("visual/proj/kernel", "visual.proj", "id"),
      *_block_entries_open_clip("visual.transformer.resblocks", "visual/blocks", v.layers),
      ("text/token_embedding", "token_embedding.weight", "id"),
      ("text/positional_embedding", "positional_embedding", "id"),
      ("text/ln_final/scale", "ln_final.weight", "id"), ("text/ln_final/bias", "ln_final.bias", "id"),
      ("text/proj/kernel", "text_projection", "id"),
      *_block_entries_open_clip("transformer.resblocks", "text/blocks", t.layers),
      ("logit_scale", "logit_scale", "scalar"),
  ]


def hf_mapping(config: CLIPConfig) -> list[tuple]:
  v, t = config.vision, config.text
  common = [
      ("visual/conv1/kernel", "vision_model.embeddings.patch_embedding.weight", "conv"),
      ("visual/positional_embedding", "vision_model.embeddings.position_embedding.weight", "id"),
      ("visual/ln_post/scale", "vision_model.post_layernorm.weight", "id"),
      ("visual/ln_post/bias", "vision_model.post_layernorm.bias", "id"),
      *_block_entries_hf("vision_model.encoder.layers", "visual/blocks", v.layers),
      ("text/token_embedding", "text_model.embeddings.token_embedding.weight", "id"),
      ("text/positional_embedding", "text_model.embeddings.position_embedding.weight", "id"),
      ("text/ln_final/scale", "text_model.final_layer_norm.weight", "id"),
      ("text/ln_final/bias", "text_model.final_layer_norm.bias", "id"),
      *_block_entries_hf("text_model.encoder.layers", "text/blocks", t.layers),
      ("logit_scale", "logit_scale", "scalar"),
  ]
  if config.kind == "clip":
    return common + [
        ("visual/class_embedding", "vision_model.embeddings.class_embedding", "id"),
        ("visual/ln_pre/scale", "vision_model.pre_layrnorm.weight", "id"),
        ("visual/ln_pre/bias", "vision_model.pre_layrnorm.bias", "id"),
        ("visual/proj/kernel", "visual_projection.weight", "T"),
        ("text/proj/kernel", "text_projection.weight", "T"),
    ]
  head = "vision_model.head"
  return common + [
      ("visual/conv1/bias", "vision_model.embeddings.patch_embedding.bias", "id"),
      ("visual/head/probe", f"{head}.probe", "id"),
      ("visual/head/attn/qkv/kernel", f"{head}.attention.in_proj_weight", "qkv"),
      ("visual/head/attn/qkv/bias", f"{head}.attention.in_proj_bias", "qkv_bias"),
      ("visual/head/attn/out/kernel", f"{head}.attention.out_proj.weight", "T"),
      ("visual/head/attn/out/bias", f"{head}.attention.out_proj.bias", "id"),
      ("visual/head/ln/scale", f"{head}.layernorm.weight", "id"), ("visual/head/ln/bias", f"{head}.layernorm.bias", "id"),
      ("visual/head/fc1/kernel", f"{head}.mlp.fc1.weight", "T"), ("visual/head/fc1/bias", f"{head}.mlp.fc1.bias", "id"),
      ("visual/head/fc2/kernel", f"{head}.mlp.fc2.weight", "T"), ("visual/head/fc2/bias", f"{head}.mlp.fc2.bias", "id"),
      ("text/proj/kernel", "text_model.head.weight", "T"), ("text/proj/bias", "text_model.head.bias", "id"),
      ("logit_bias", "logit_bias", "scalar"),
  ]


# ----------------------------------------------------------------------------------- tree utilities


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _stack_blocks(tree: dict) -> dict:
  """{"blocks": {"0": {...}, "1": {...}}} -> {"blocks": stacked [L, ...]} throughout the tree."""
  out = {}
  for k, v in tree.items():
    if k == "blocks":
      layers = [v[str(i)] for i in range(len(v))]
      out[k] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    elif isinstance(v, dict):
      out[k] = _stack_blocks(v)
    else:
      out[k] = v
  return out


def _unstack_blocks(tree: dict) -> dict:
  out = {}
  for k, v in tree.items():
    if k == "blocks":
      n = jax.tree.leaves(v)[0].shape[0]
      out[k] = {str(i): jax.tree.map(lambda x, i=i: np.asarray(x)[i], v) for i in range(n)}
    elif isinstance(v, dict):
      out[k] = _unstack_blocks(v)
    else:
      out[k] = v
  return out


def _expected_shapes(config: CLIPConfig) -> dict[str, tuple]:
  """Flat {our path: shape} of the architecture, blocks unstacked ("visual/blocks/3/ln_1/scale")."""
  from bayesprompt.clip.model import init_params  # local: avoid an import cycle at module load

  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  flat = {}

  def walk(tree, prefix, layers=None):
    for k, v in tree.items():
      path = f"{prefix}/{k}" if prefix else k
      if k == "blocks":
        n = jax.tree.leaves(v)[0].shape[0]
        for i in range(n):
          walk(v, f"{path}/{i}", layers=True)
      elif isinstance(v, dict):
        walk(v, path, layers)
      else:
        flat[path] = tuple(v.shape[1:] if layers else v.shape)

  walk(shapes, "")
  return flat


def _convert(state: dict[str, np.ndarray], mapping: list[tuple], config: CLIPConfig, source: str) -> Params:
  """Maps a flat torch-named state dict to our params, checking every key and shape first."""
  expected = _expected_shapes(config)
  state = {k: v for k, v in state.items() if not _IGNORED_KEYS.search(k)}
  used = set()
  missing = []
  params: dict = {}
  for ours, src, transform in mapping:
    if src not in state:
      missing.append(src)
      continue
    used.add(src)
    value = np.asarray(state[src], dtype=np.float32)
    if transform in ("qkv", "qkv_bias"):
      width = value.shape[0] // 3
      if value.shape[0] != 3 * width or (transform == "qkv" and value.shape != (3 * width, width)):
        raise CheckpointError(f"{source}: tensor {src} has shape {value.shape}, expected (3W, W) / (3W,)")
      base = ours.rsplit("/", 2)[0]
      leaf = "kernel" if transform == "qkv" else "bias"
      for part, name in zip(np.split(value, 3, axis=0), ("query", "key", "value"), strict=True):
        converted = part.T if transform == "qkv" else part
        _check_shape(expected, f"{base}/{name}/{leaf}", converted, src, source)
        _set(params, f"{base}/{name}/{leaf}", converted)
      continue
    converted = _FORWARD[transform](value)
    _check_shape(expected, ours, converted, src, source)
    _set(params, ours, converted)
  unexpected = sorted(set(state) - used)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys: {', '.join(missing[:12])}" + (f" (+{len(missing) - 12} more)" if len(missing) > 12 else ""))
    if unexpected:
      parts.append(f"unexpected keys: {', '.join(unexpected[:12])}"
                   + (f" (+{len(unexpected) - 12} more)" if len(unexpected) > 12 else ""))
    raise CheckpointError(f"{source}: state dict does not match the architecture; " + "; ".join(parts))
  not_set = sorted(set(expected) - set(_flatten(params)))
  if not_set:
    raise CheckpointError(f"{source}: no tensor for parameters {', '.join(not_set[:12])}")
  return jax.tree.map(jnp.asarray, _stack_blocks(params))


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    flat.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
  return flat


def _check_shape(expected: dict, ours: str, value: np.ndarray, src: str, source: str) -> None:
  want = expected.get(ours)
  if want is None:
    raise CheckpointError(f"{source}: tensor {src} maps to {ours}, which this architecture does not have")
  if tuple(value.shape) != want:
    raise CheckpointError(f"{source}: tensor {src} has shape {tuple(np.shape(value))} after conversion to {ours}, "
                          f"expected {want} for the configured architecture")


def _qkv_inverse(params_flat: dict, base: str, leaf: str) -> np.ndarray:
  parts = [np.asarray(params_flat[f"{base}/{n}/{leaf}"]) for n in ("query", "key", "value")]
  # ascontiguousarray: concatenating transposed views yields Fortran order, which safetensors writes raw.
  return np.ascontiguousarray(np.concatenate([p.T for p in parts] if leaf == "kernel" else parts, axis=0))


def params_to_state_dict(params: Params, mapping: list[tuple]) -> dict[str, np.ndarray]:
  """Inverse of loading: our params -> a torch-named flat state dict (float32 numpy)."""
  flat = _flatten(_unstack_blocks(jax.tree.map(np.asarray, params)))
  state = {}
  for ours, src, transform in mapping:
    if transform in ("qkv", "qkv_bias"):
      state[src] = _qkv_inverse(flat, ours.rsplit("/", 2)[0], "kernel" if transform == "qkv" else "bias")
    elif transform == "scalar":
      state[src] = np.asarray(flat[ours], np.float32).reshape(() if "logit_bias" not in src else (1,))
    else:
      state[src] = np.ascontiguousarray(_INVERSE[transform](np.asarray(flat[ours], np.float32)))
  return state


# ------------------------------------------------------------------------------------------ configs


def _count_layers(keys, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  indices = {int(m.group(1)) for k in keys for m in [pattern.match(k)] if m}
  return max(indices) + 1 if indices else 0


def _shape(state, key, source):
  if key not in state:
    raise CheckpointError(f"{source}: missing key {key} (needed to infer the architecture)")
  return tuple(state[key].shape)


def infer_open_clip_config(state: dict, *, quick_gelu: bool, source: str = "checkpoint") -> CLIPConfig:
  """Architecture of an open_clip/OpenAI-named state dict from tensor shapes (heads = width // 64)."""
  conv = _shape(state, "visual.conv1.weight", source)
  v_width, patch = conv[0], conv[-1]
  positions = _shape(state, "visual.positional_embedding", source)[0]
  grid = int(round((positions - 1) ** 0.5))
  if grid * grid + 1 != positions:
    raise CheckpointError(f"{source}: visual.positional_embedding has {positions} rows, not 1 + grid²")
  v_layers = _count_layers(state, "visual.transformer.resblocks")
  v_mlp = _shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source)[0]
  t_width = _shape(state, "ln_final.weight", source)[0]
  vocab = _shape(state, "token_embedding.weight", source)[0]
  context = _shape(state, "positional_embedding", source)[0]
  t_layers = _count_layers(state, "transformer.resblocks")
  t_mlp = _shape(state, "transformer.resblocks.0.mlp.c_fc.weight", source)[0]
  embed_dim = _shape(state, "text_projection", source)[1]
  act = "quick_gelu" if quick_gelu else "gelu"
  return CLIPConfig(
      vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=v_width, layers=v_layers,
                          heads=max(1, v_width // 64), mlp_dim=v_mlp, act=act),
      text=TextConfig(vocab_size=vocab, context_length=context, width=t_width, layers=t_layers,
                      heads=max(1, t_width // 64), mlp_dim=t_mlp, act=act),
      embed_dim=embed_dim)


_SUPPORTED_OPEN_CLIP_VISION = {"width", "layers", "patch_size", "image_size", "head_width", "mlp_ratio"}
_SUPPORTED_OPEN_CLIP_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def open_clip_config_from_json(cfg: dict, *, source: str) -> CLIPConfig:
  """CLIPConfig from an open_clip `model_cfg` dict."""
  model_cfg = cfg.get("model_cfg", cfg)
  try:
    vc, tc = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    embed_dim = int(model_cfg["embed_dim"])
  except KeyError as e:
    raise CheckpointError(f"{source}: open_clip config lacks {e.args[0]!r}") from None
  for name, section, supported in (("vision_cfg", vc, _SUPPORTED_OPEN_CLIP_VISION),
                                   ("text_cfg", tc, _SUPPORTED_OPEN_CLIP_TEXT)):
    unsupported = sorted(k for k, val in section.items() if k not in supported and val not in (None, False, 0))
    if unsupported:
      raise CheckpointError(f"{source}: unsupported open_clip {name} options {unsupported}; supported: "
                            f"{sorted(supported)}")
  act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
  v_width = int(vc["width"])
  image_size = vc.get("image_size", 224)
  if isinstance(image_size, (list, tuple)):
    if image_size[0] != image_size[1]:
      raise CheckpointError(f"{source}: non-square image_size {image_size} is not supported")
    image_size = image_size[0]
  t_width = int(tc.get("width", 512))
  vision = VisionConfig(image_size=int(image_size), patch_size=int(vc["patch_size"]), width=v_width,
                        layers=int(vc["layers"]), heads=v_width // int(vc.get("head_width", 64)),
                        mlp_dim=int(v_width * float(vc.get("mlp_ratio", 4.0))), act=act)
  text = TextConfig(vocab_size=int(tc.get("vocab_size", 49408)), context_length=int(tc.get("context_length", 77)),
                    width=t_width, layers=int(tc.get("layers", 12)), heads=int(tc.get("heads", 8)),
                    mlp_dim=int(t_width * float(tc.get("mlp_ratio", 4.0))), act=act)
  tokenizer = cfg.get("bayesprompt", {}).get("tokenizer", "clip_bpe")
  return CLIPConfig(vision=vision, text=text, embed_dim=embed_dim, tokenizer=tokenizer)


_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def hf_config_from_json(cfg: dict, *, source: str) -> CLIPConfig:
  """CLIPConfig from a transformers CLIPModel / SiglipModel config.json."""
  model_type = cfg.get("model_type")
  if model_type not in ("clip", "siglip"):
    raise CheckpointError(f"{source}: unsupported transformers model_type {model_type!r}; expected 'clip' or 'siglip'")
  vc, tc = cfg.get("vision_config", {}), cfg.get("text_config", {})

  def act(section):
    name = section.get("hidden_act", "quick_gelu" if model_type == "clip" else "gelu_pytorch_tanh")
    if name not in _HF_ACT:
      raise CheckpointError(f"{source}: unsupported hidden_act {name!r}; supported: {sorted(_HF_ACT)}")
    return _HF_ACT[name]

  siglip = model_type == "siglip"
  eps_default = 1e-6 if siglip else 1e-5
  v_width = vc.get("hidden_size", 768)
  vision = VisionConfig(
      image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 32), width=v_width,
      layers=vc.get("num_hidden_layers", 12), heads=vc.get("num_attention_heads", 12),
      mlp_dim=vc.get("intermediate_size", 3072), act=act(vc), ln_eps=vc.get("layer_norm_eps", eps_default),
      class_token=not siglip, patch_bias=siglip, ln_pre=not siglip, pool="map" if siglip else "cls")
  if siglip and not vc.get("vision_use_head", True):
    raise CheckpointError(f"{source}: SigLIP without the attention-pooling head (vision_use_head=false) is not supported")
  text = TextConfig(
      vocab_size=tc.get("vocab_size", 49408), context_length=tc.get("max_position_embeddings", 77),
      width=tc.get("hidden_size", 512), layers=tc.get("num_hidden_layers", 12),
      heads=tc.get("num_attention_heads", 8), mlp_dim=tc.get("intermediate_size", 2048), act=act(tc),
      ln_eps=tc.get("layer_norm_eps", eps_default), causal=not siglip, pool="last" if siglip else "eot",
      proj_bias=siglip)
  embed_dim = tc.get("projection_size", text.width) if siglip else cfg.get("projection_dim", 512)
  return CLIPConfig(vision=vision, text=text, embed_dim=embed_dim, kind=model_type,
                    tokenizer="siglip_sentencepiece" if siglip else "clip_bpe")


def infer_hf_config(state: dict, *, quick_gelu: bool, source: str) -> CLIPConfig:
  """Architecture of a bare transformers-named CLIP state dict from tensor shapes."""
  if "vision_model.head.probe" in state:
    raise CheckpointError(f"{source}: a bare SigLIP state dict needs its config.json (shapes don't give heads/eps)")
  conv = _shape(state, "vision_model.embeddings.patch_embedding.weight", source)
  positions = _shape(state, "vision_model.embeddings.position_embedding.weight", source)[0]
  grid = int(round((positions - 1) ** 0.5))
  v_width, t_width = conv[0], _shape(state, "text_model.final_layer_norm.weight", source)[0]
  act = "quick_gelu" if quick_gelu else "gelu"
  return CLIPConfig(
      vision=VisionConfig(image_size=grid * conv[-1], patch_size=conv[-1], width=v_width,
                          layers=_count_layers(state, "vision_model.encoder.layers"), heads=max(1, v_width // 64),
                          mlp_dim=_shape(state, "vision_model.encoder.layers.0.mlp.fc1.weight", source)[0], act=act),
      text=TextConfig(vocab_size=_shape(state, "text_model.embeddings.token_embedding.weight", source)[0],
                      context_length=_shape(state, "text_model.embeddings.position_embedding.weight", source)[0],
                      width=t_width, layers=_count_layers(state, "text_model.encoder.layers"),
                      heads=max(1, t_width // 64),
                      mlp_dim=_shape(state, "text_model.encoder.layers.0.mlp.fc1.weight", source)[0], act=act),
      embed_dim=_shape(state, "text_projection.weight", source)[0])


# ------------------------------------------------------------------------------------------- reading


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_pickle(path: pathlib.Path, allow_pickle: bool) -> dict[str, np.ndarray]:
  if not allow_pickle:
    raise CheckpointError(
        f"{path} is a pickle (.pt/.bin); unpickling can run arbitrary code, so it is refused unless you pass "
        "allow_pickle=True (and have torch installed). Prefer a .safetensors export.")
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: loading a pickle checkpoint needs torch installed (pip install torch)") from None
  try:  # OpenAI's TorchScript archives (ViT-B-16.pt)
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
  except RuntimeError:
    state = torch.load(str(path), map_location="cpu", weights_only=False)
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise CheckpointError(f"{path}: pickle holds a {type(state).__name__}, expected a state dict")
  state = {k.removeprefix("module."): v for k, v in state.items()}
  return {k: v.detach().float().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _read_weights(path: pathlib.Path, allow_pickle: bool) -> dict[str, np.ndarray]:
  if path.suffix == ".safetensors":
    return _read_safetensors(path)
  if path.suffix in (".pt", ".bin", ".pth"):
    return _read_pickle(path, allow_pickle)
  raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, .pt or .bin")


def _first_existing(directory: pathlib.Path, names) -> pathlib.Path | None:
  for name in names:
    if (directory / name).exists():
      return directory / name
  return None


def _is_hf_naming(state: dict) -> bool:
  return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def load_checkpoint(path: str | os.PathLike, *, quick_gelu: bool | None = None,
                    allow_pickle: bool = False) -> tuple[CLIPConfig, Params]:
  """Loads (config, params) from an open_clip / transformers directory, a bare weight file, or a name.

  Args:
    path: a directory (open_clip hub layout or transformers layout), a `.safetensors` / `.pt` / `.bin` file,
      or a registered name (`register_checkpoint`; "sandbox" after `import bayesprompt.data`).
    quick_gelu: activation for formats whose config can't say (bare files): True = OpenAI's QuickGELU
      (the default for bare files, as OpenAI weights use it), False = exact GELU (most LAION retrains).
      For a directory with a config it overrides the config when given.
    allow_pickle: permit unpickling `.pt` / `.bin` files (runs arbitrary code; needs torch).
  Returns:
    (config, params) with float32 params; nothing is returned unless every tensor matched.
  Raises:
    CheckpointError (a ValueError) naming the file, key or shape at fault; FileNotFoundError.
  """
  if isinstance(path, str) and path in _NAMED_CHECKPOINTS:
    path = _NAMED_CHECKPOINTS[path]()
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    known = f"; registered names: {', '.join(sorted(_NAMED_CHECKPOINTS)) or 'none'}"
    if str(path) == "sandbox":  # the one name the project ships: say who registers it
      known += " (the sandbox CLIP is registered by `import bayesprompt.data`)"
    raise UserFileNotFoundError(f"checkpoint {str(path)!r} does not exist{known}")
  source = str(path)
  if path.is_dir():
    if (path / OPEN_CLIP_CONFIG).exists():
      weights = _first_existing(path, OPEN_CLIP_WEIGHTS)
      if weights is None:
        raise CheckpointError(f"{path}: open_clip layout without weights; expected one of {OPEN_CLIP_WEIGHTS}")
      config = open_clip_config_from_json(json.loads((path / OPEN_CLIP_CONFIG).read_text()), source=source)
      # A word-tokenizer JSON saved beside the weights is named relative to the checkpoint directory.
      spec = config.tokenizer
      if spec.endswith(".json") and not pathlib.Path(spec).is_absolute() and (path / spec).is_file():
        config = config.replace(tokenizer=str((path / spec).resolve()))
      mapping_fn = open_clip_mapping
    elif (path / HF_CONFIG).exists():
      weights = _first_existing(path, HF_WEIGHTS)
      if weights is None:
        raise CheckpointError(f"{path}: transformers layout without weights; expected one of {HF_WEIGHTS}")
      config = hf_config_from_json(json.loads((path / HF_CONFIG).read_text()), source=source)
      mapping_fn = hf_mapping
    else:
      raise CheckpointError(f"{path}: unknown checkpoint layout; expected {OPEN_CLIP_CONFIG} (open_clip) or "
                            f"{HF_CONFIG} (transformers) in the directory")
    state = _read_weights(weights, allow_pickle)
    if quick_gelu is not None:
      config = _with_activation(config, "quick_gelu" if quick_gelu else "gelu")
  else:
    state = _read_weights(path, allow_pickle)
    if _is_hf_naming(state):
      config, mapping_fn = infer_hf_config(state, quick_gelu=quick_gelu is not False, source=source), hf_mapping
    else:
      config = infer_open_clip_config(state, quick_gelu=quick_gelu is not False, source=source)
      mapping_fn = open_clip_mapping
  params = _convert(state, mapping_fn(config), config, source)
  return config, params


def _with_activation(config: CLIPConfig, act: str) -> CLIPConfig:
  return config.replace(vision=dataclasses.replace(config.vision, act=act),
                        text=dataclasses.replace(config.text, act=act))


def open_clip_config_json(config: CLIPConfig) -> dict:
  v, t = config.vision, config.text
  if v.heads * 64 != v.width and v.width % v.heads:
    raise CheckpointError("vision width must be divisible by heads")
  return {
      "model_cfg": {
          "embed_dim": config.embed_dim,
          "quick_gelu": v.act == "quick_gelu",
          "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                         "patch_size": v.patch_size, "head_width": v.width // v.heads,
                         "mlp_ratio": v.mlp_dim / v.width},
          "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                       "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_dim / t.width},
      },
      "bayesprompt": {"tokenizer": config.tokenizer},
  }


def save_checkpoint(directory: str | os.PathLike, config: CLIPConfig, params: Params) -> pathlib.Path:
  """Writes a CLIP model in open_clip hub layout (open_clip_config.json + open_clip_model.safetensors).

  The write is atomic: files go to a temporary sibling directory that is renamed into place.
  Returns the directory.
  """
  from safetensors.numpy import save_file

  if config.kind != "clip":
    raise CheckpointError("save_checkpoint writes open_clip layout, which holds CLIP models (not SigLIP)")
  if config.vision.ln_eps != 1e-5 or config.text.ln_eps != 1e-5 or config.vision.act != config.text.act:
    raise CheckpointError("open_clip layout stores LayerNorm eps 1e-5 and one activation for both towers")
  directory = pathlib.Path(directory)
  state = params_to_state_dict(params, open_clip_mapping(config))
  tmp = directory.with_name(directory.name + ".tmp")
  if tmp.exists():
    import shutil

    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  save_file(state, str(tmp / OPEN_CLIP_WEIGHTS[0]))
  (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config_json(config), indent=1))
  if directory.exists():
    import shutil

    old = directory.with_name(directory.name + ".old")
    if old.exists():
      shutil.rmtree(old)
    directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old)
  else:
    tmp.rename(directory)
  return directory
