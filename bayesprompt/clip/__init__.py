"""Frozen CLIP / SigLIP backbones: configs, pure-function towers with token hooks, checkpoints, tokenizers."""

from bayesprompt.clip import edits
from bayesprompt.clip.checkpoint import (
  CheckpointError,
  load_checkpoint,
  register_checkpoint,
  save_checkpoint,
)
from bayesprompt.clip.config import (
  CLIPConfig,
  TextConfig,
  VisionConfig,
  config_names,
  get_config,
  register_config,
)
from bayesprompt.clip.model import (
  contrastive_logits,
  embed_tokens,
  encode_image,
  encode_text,
  eot_index,
  image_tower,
  init_params,
  normalize,
  project_image,
  project_text,
  text_tower,
  text_tower_from_embeddings,
)
from bayesprompt.clip.tokenizer import get_tokenizer as _tokenizer_for_spec
from bayesprompt.clip.tokenizer import tokenize


def get_tokenizer(config_or_spec):
  """The tokenizer a model config uses ("clip_bpe", or a word-level vocabulary JSON for the sandbox)."""
  spec = config_or_spec.tokenizer if isinstance(config_or_spec, CLIPConfig) else config_or_spec
  return _tokenizer_for_spec(spec)


__all__ = [
    "CLIPConfig", "CheckpointError", "TextConfig", "VisionConfig", "config_names", "contrastive_logits",
    "edits", "embed_tokens", "encode_image", "encode_text", "eot_index", "get_config", "get_tokenizer",
    "image_tower",
    "init_params", "load_checkpoint", "normalize", "project_image", "project_text", "register_checkpoint",
    "register_config", "save_checkpoint", "text_tower", "text_tower_from_embeddings", "tokenize",
]
