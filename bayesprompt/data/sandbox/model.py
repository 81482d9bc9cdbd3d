"""The sandbox CLIP: its architecture, its word tokenizer and where the shipped checkpoint lives.

Shipped checkpoint (open_clip hub layout, written by `clip.save_checkpoint` + the tokenizer JSON):
  bayesprompt/assets/sandbox_clip/
    open_clip_config.json        model_cfg + {"bayesprompt": {"tokenizer": "tokenizer.json"}}
    open_clip_model.safetensors  weights in open_clip key names
    tokenizer.json               the WordTokenizer (vocabulary, context length)
    results.json                 what `experiments.pretrain_sandbox` measured on it (zero-shot accuracies)
The tokenizer spec in the config is relative to the checkpoint directory; `load()` resolves it.
"""

from __future__ import annotations

import dataclasses
import pathlib

from bayesprompt.clip.config import CLIPConfig, TextConfig, VisionConfig
from bayesprompt.clip.tokenizer import WordTokenizer
from bayesprompt.data.sandbox import world

CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parents[2] / "assets" / "sandbox_clip"
TOKENIZER_FILE = "tokenizer.json"
# Captions use <= 23 tokens (20 words, ".", SOT, EOT); the rest is room for learned prompt tokens
# (CoOp n_ctx=16).
CONTEXT_LENGTH = 32
# CLIP's normalisation: the sandbox model is trained with it so every pipeline can treat it like CLIP.
MEAN_RGB = (0.48145466, 0.4578275, 0.40821073)
STD_RGB = (0.26862954, 0.26130258, 0.27577711)


def tokenizer(context_length: int = CONTEXT_LENGTH) -> WordTokenizer:
  """The word tokenizer over the world's vocabulary. Words outside it map to the unknown id (so foreign
  prompt templates still run, with an untrained token) rather than raising."""
  return WordTokenizer(world.vocabulary(), context_length=context_length, unknown="map")


def config(tokenizer_spec: str | None = None, **vision_overrides) -> CLIPConfig:
  """The sandbox architecture: a 32 px ViT (patch 8, width 128, 4 layers) and a 4-layer width-128 text
  transformer over the word vocabulary, joint embedding 128, QuickGELU, float32.

  Args:
    tokenizer_spec: the config's tokenizer spec; default: the shipped tokenizer JSON if present.
    vision_overrides: replace VisionConfig fields (experiments).
  """
  vocab_size = tokenizer().vocab_size
  vision = VisionConfig(image_size=world.IMAGE_SIZE, patch_size=8, width=128, layers=4, heads=2, mlp_dim=512)
  vision = dataclasses.replace(vision, **vision_overrides)
  text = TextConfig(vocab_size=vocab_size, context_length=CONTEXT_LENGTH, width=128, layers=4, heads=2,
                    mlp_dim=512)
  if tokenizer_spec is None:
    tokenizer_spec = str(CHECKPOINT_DIR / TOKENIZER_FILE)
  return CLIPConfig(vision=vision, text=text, embed_dim=128, tokenizer=tokenizer_spec)


def checkpoint_dir() -> pathlib.Path:
  """The shipped checkpoint's directory (raises FileNotFoundError if the package was built without it)."""
  if not (CHECKPOINT_DIR / "open_clip_config.json").exists():
    raise FileNotFoundError(f"the sandbox CLIP checkpoint is missing from {CHECKPOINT_DIR}; "
                            "train it with `python -m experiments.pretrain_sandbox "
                            "--flagfile=experiments/flags/pretrain_sandbox.flags`")
  return CHECKPOINT_DIR


def resolve_tokenizer(cfg: CLIPConfig, directory: pathlib.Path) -> CLIPConfig:
  """A loaded config whose tokenizer spec is relative to the checkpoint `directory`, made absolute."""
  spec = cfg.tokenizer
  if spec != "clip_bpe" and not pathlib.Path(spec).is_absolute() and (directory / spec).is_file():
    return cfg.replace(tokenizer=str(directory / spec))
  return cfg


def load(directory: str | pathlib.Path | None = None):
  """(config, params) of a sandbox checkpoint (default: the shipped one), tokenizer path resolved."""
  from bayesprompt.clip.checkpoint import load_checkpoint

  directory = pathlib.Path(directory) if directory is not None else checkpoint_dir()
  cfg, params = load_checkpoint(directory)
  return resolve_tokenizer(cfg, directory), params


def register() -> None:
  """Registers the CLIP config "sandbox" and the checkpoint name "sandbox"."""
  from bayesprompt.clip.checkpoint import register_checkpoint
  from bayesprompt.clip.config import register_config

  register_config("sandbox", config())
  register_checkpoint("sandbox", checkpoint_dir)
