"""Architecture configs of CLIP-style dual encoders (CLIP and SigLIP), and the named ones users hold."""

from __future__ import annotations

import dataclasses

from bayesprompt.errors import UserError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT image tower.

  Attributes:
    image_size: input resolution (square), pixels.
    patch_size: side of the square patches (conv kernel = stride).
    width: residual stream width d_v.
    layers: number of residual blocks.
    heads: attention heads (OpenAI: width // 64).
    mlp_dim: hidden width of the MLP (4·width for CLIP).
    act: MLP activation, one of ACTIVATIONS (OpenAI weights: quick_gelu).
    ln_eps: LayerNorm epsilon (PyTorch CLIP 1e-5, SigLIP 1e-6).
    class_token: prepend a learned [CLS] token (CLIP) or not (SigLIP).
    patch_bias: the patch-embedding conv has a bias (SigLIP) or not (CLIP).
    ln_pre: LayerNorm before the first block (CLIP) or not (SigLIP).
    pool: "cls" (ln_post of the class token, CLIP) or "map" (attention-pooling head, SigLIP).
  """

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  class_token: bool = True
  patch_bias: bool = False
  ln_pre: bool = True
  pool: str = "cls"

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid_size**2 + int(self.class_token)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text transformer.

  Attributes:
    vocab_size: number of token ids.
    context_length: tokens per text (CLIP 77).
    width: residual stream width d_t.
    layers / heads / mlp_dim / act / ln_eps: as for VisionConfig.
    causal: causal attention mask (CLIP) or bidirectional (SigLIP).
    pool: "eot" (feature at argmax(token_ids), CLIP) or "last" (last position, SigLIP).
    proj_bias: the text projection has a bias (SigLIP's `head`) or not (CLIP's `text_projection`).
  """

  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  causal: bool = True
  pool: str = "eot"
  proj_bias: bool = False


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A dual encoder.

  Attributes:
    vision / text: the towers.
    embed_dim: joint embedding dimension D.
    kind: "clip" (InfoNCE, logits = exp(s)·cos) or "siglip" (sigmoid loss, + logit_bias).
    tokenizer: "clip_bpe", or a path / package-relative name of a word-tokenizer JSON (the sandbox).
    dtype: compute dtype of matmuls, "float32" (reference) or "bfloat16" (params, LayerNorm, softmax and
      the residual stream stay float32).
  """

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  embed_dim: int = 512
  kind: str = "clip"
  tokenizer: str = "clip_bpe"
  dtype: str = "float32"

  def __post_init__(self):
    for tower in (self.vision, self.text):
      if tower.act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {tower.act!r}; expected one of {ACTIVATIONS}")
      if tower.width % tower.heads:
        raise ValueError(f"width {tower.width} is not divisible by heads {tower.heads}")
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(
          f"image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}")
    if self.kind not in ("clip", "siglip"):
      raise ValueError(f"unknown model kind {self.kind!r}; expected 'clip' or 'siglip'")
    if self.vision.pool not in ("cls", "map"):
      raise ValueError(f"unknown vision pool {self.vision.pool!r}; expected 'cls' or 'map'")
    if self.vision.pool == "cls" and not self.vision.class_token:
      raise ValueError("vision pool 'cls' needs class_token=True")
    if self.text.pool not in ("eot", "last"):
      raise ValueError(f"unknown text pool {self.text.pool!r}; expected 'eot' or 'last'")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"unknown compute dtype {self.dtype!r}; expected 'float32' or 'bfloat16'")

  def replace(self, **changes) -> CLIPConfig:
    return dataclasses.replace(self, **changes)


def _openai_vit(image_size, patch, width, layers, text_width, text_layers, embed_dim) -> CLIPConfig:
  return CLIPConfig(
      vision=VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                          heads=width // 64, mlp_dim=4 * width),
      text=TextConfig(width=text_width, layers=text_layers, heads=text_width // 64, mlp_dim=4 * text_width),
      embed_dim=embed_dim)


_NAMED = {
    # OpenAI's weights (and open_clip's "openai" / HF's openai/clip-vit-* equivalents): QuickGELU.
    "vit_b32": _openai_vit(224, 32, 768, 12, 512, 12, 512),
    "vit_b16": _openai_vit(224, 16, 768, 12, 512, 12, 512),
    "vit_l14": _openai_vit(224, 14, 1024, 24, 768, 12, 768),
    "vit_l14_336": _openai_vit(336, 14, 1024, 24, 768, 12, 768),
    # A tiny model for tests (the fixtures' shapes).
    "tiny": CLIPConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_dim=512),
        text=TextConfig(vocab_size=1000, context_length=77, width=128, layers=2, heads=2, mlp_dim=512),
        embed_dim=64),
    # SigLIP base (google/siglip-base-patch16-224).
    "siglip_b16": CLIPConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072,
                            act="gelu_tanh", ln_eps=1e-6, class_token=False, patch_bias=True, ln_pre=False,
                            pool="map"),
        text=TextConfig(vocab_size=32000, context_length=64, width=768, layers=12, heads=12, mlp_dim=3072,
                        act="gelu_tanh", ln_eps=1e-6, causal=False, pool="last", proj_bias=True),
        embed_dim=768, kind="siglip", tokenizer="siglip_sentencepiece"),
}


def _with_gelu(config: CLIPConfig) -> CLIPConfig:
  return config.replace(vision=dataclasses.replace(config.vision, act="gelu"),
                        text=dataclasses.replace(config.text, act="gelu"))


# LAION/open_clip retrains of the same shapes use exact GELU.
for _name in ("vit_b32", "vit_b16", "vit_l14"):
  _NAMED[f"{_name}_gelu"] = _with_gelu(_NAMED[_name])


def get_config(name: str) -> CLIPConfig:
  """A named architecture: vit_b32, vit_b16, vit_l14, vit_l14_336 (QuickGELU, OpenAI), `*_gelu` variants
  (LAION/open_clip retrains), siglip_b16, tiny, and the names added by `register_config` ("sandbox" is
  registered by `bayesprompt.data.sandbox`, i.e. by `import bayesprompt.data`: clip/ imports nothing above
  itself)."""
  try:
    return _NAMED[name]
  except KeyError:
    hint = " (the sandbox config is registered by `import bayesprompt.data`)" if name == "sandbox" else ""
    raise UserError(f"unknown config {name!r}; known configs: {', '.join(sorted(_NAMED))}{hint}") from None


def register_config(name: str, config: CLIPConfig) -> None:
  """Adds a named config (used by the sandbox world and by users with custom architectures)."""
  _NAMED[name] = config


def config_names() -> list[str]:
  return sorted(_NAMED)
