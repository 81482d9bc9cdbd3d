"""Parity of the CLIP / SigLIP towers with open_clip and transformers (../shared/fixtures) and with an
independent NumPy reference on architectures no fixture covers."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesprompt.clip as clip
from tests import clip_reference

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

FIXTURES = ["openclip_vit_tiny", "openclip_vit_tiny_gelu", "hf_clip_tiny", "hf_siglip_tiny"]
ATOL = 1e-4  # the project's parity bar in float32


def _load(fixtures_dir, name):
  config, params = clip.load_checkpoint(fixtures_dir / name)
  io = dict(np.load(fixtures_dir / f"{name}.io.npz"))
  io["images_nhwc"] = io["images"].transpose(0, 2, 3, 1)
  io["tokens"] = io["tokens"].astype(np.int32)
  return config, params, io


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity_float32(fixtures_dir, name):
  config, params, io = _load(fixtures_dir, name)
  image_features, image_out = clip.image_tower(params, jnp.asarray(io["images_nhwc"]), config=config)
  text_features, text_out = clip.text_tower(params, jnp.asarray(io["tokens"]), config=config)
  chex.assert_trees_all_close(image_features, io["image_features"], atol=ATOL)
  chex.assert_trees_all_close(text_features, io["text_features"], atol=ATOL)
  chex.assert_trees_all_close(image_out["pre_projection"], io["image_pre_projection"], atol=ATOL)
  chex.assert_trees_all_close(text_out["pre_projection"], io["text_pre_projection"], atol=ATOL)
  logits = clip.contrastive_logits(params, image_features, text_features)
  chex.assert_trees_all_close(logits, io["logits_per_image"], atol=ATOL)
  chex.assert_trees_all_close(params["logit_scale"], io["logit_scale"].reshape(()), atol=ATOL)
  if "image_residual" in io:
    chex.assert_trees_all_close(image_out["projection_residual"], io["image_residual"], atol=ATOL)
  # The public jit entry points agree with the towers.
  chex.assert_trees_all_close(clip.encode_image(params, io["images_nhwc"], config=config), image_features, atol=1e-6)
  chex.assert_trees_all_close(clip.encode_text(params, io["tokens"], config=config), text_features, atol=1e-6)


@pytest.mark.parametrize("name", FIXTURES)
def test_projection_from_pre_projection_features(fixtures_dir, name):
  """What BayesVLM's Laplace uses: the fixtures' pre-projection features map to the embeddings through our code."""
  config, params, io = _load(fixtures_dir, name)
  image = clip.project_image(params, jnp.asarray(io["image_pre_projection"]), config=config,
                             projection_residual=io.get("image_residual"))
  text = clip.project_text(params, jnp.asarray(io["text_pre_projection"]), config=config)
  chex.assert_trees_all_close(image, io["image_features"], atol=ATOL)
  chex.assert_trees_all_close(text, io["text_features"], atol=ATOL)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity_bfloat16(fixtures_dir, name):
  """bfloat16 compute (params, LayerNorm, softmax and residual stream float32).

  Tolerance: bfloat16 keeps 8 significant bits, a relative rounding of 2^-9 ≈ 2e-3 per matmul input; through
  2 blocks + projection the errors we see are ≤ 1e-2 of the largest feature, so we require max|Δ| ≤ 3e-2·max|f|
  and cosine(bf16, f32) ≥ 0.999 per embedding, i.e. logits within 0.1% of their scale.
  """
  config, params, io = _load(fixtures_dir, name)
  config = config.replace(dtype="bfloat16")
  for features, reference in (
      (clip.encode_image(params, io["images_nhwc"], config=config), io["image_features"]),
      (clip.encode_text(params, io["tokens"], config=config), io["text_features"])):
    assert features.dtype == jnp.float32
    assert np.max(np.abs(features - reference)) <= 3e-2 * np.max(np.abs(reference))
    cosine = np.sum(np.asarray(clip.normalize(features)) * np.asarray(clip.normalize(reference)), axis=-1)
    assert np.all(cosine >= 0.999), cosine


ARCHITECTURES = [
    # (image_size, patch, v_width, v_layers, t_width, t_layers, context, vocab, embed, quick_gelu)
    (48, 16, 64, 3, 128, 1, 20, 300, 32, True),
    (28, 7, 192, 1, 64, 3, 9, 50, 48, False),
    (32, 4, 64, 2, 192, 2, 16, 100, 24, True),
]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_other_architectures_against_numpy_reference(tmp_path, architecture):
  """Save random models of unseen shapes in open_clip format, load them as a bare .safetensors (architecture
  inferred from shapes) and as a hub directory, and compare with the independent NumPy reference."""
  image_size, patch, v_width, v_layers, t_width, t_layers, context, vocab, embed, quick_gelu = architecture
  act = "quick_gelu" if quick_gelu else "gelu"
  config = clip.CLIPConfig(
      vision=clip.VisionConfig(image_size=image_size, patch_size=patch, width=v_width, layers=v_layers,
                               heads=max(1, v_width // 64), mlp_dim=4 * v_width, act=act),
      text=clip.TextConfig(vocab_size=vocab, context_length=context, width=t_width, layers=t_layers,
                           heads=max(1, t_width // 64), mlp_dim=4 * t_width, act=act),
      embed_dim=embed)
  # Perturb LayerNorms so they are not the identity (jitted with the init: one program, not one per leaf).
  params = jax.jit(lambda key: jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(len(path)), x.shape)
      if any(getattr(p, "key", None) in ("scale", "bias") for p in path) else x,
      clip.init_params(config, key)))(jax.random.key(image_size))
  directory = str(tmp_path / "model")
  clip.save_checkpoint(directory, config, params)
  from safetensors.numpy import load_file

  state = load_file(f"{directory}/open_clip_model.safetensors")
  loaded_dir_config, loaded_dir_params = clip.load_checkpoint(directory)
  loaded_config, loaded_params = clip.load_checkpoint(f"{directory}/open_clip_model.safetensors",
                                                      quick_gelu=quick_gelu)
  assert loaded_dir_config == config
  assert loaded_config == config  # heads = width // 64 holds for these shapes
  chex.assert_trees_all_equal(loaded_params, loaded_dir_params)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 3, image_size, image_size)).astype(np.float32)
  tokens = rng.integers(1, vocab - 1, size=(3, context)).astype(np.int32)
  tokens[:, -2] = vocab - 1  # an EOT-like maximum before the end
  tokens[0, 3] = vocab - 1  # an earlier one: pooling takes the first argmax
  ref_image, ref_image_pre = clip_reference.encode_image(state, images, config.vision.heads, quick_gelu)
  ref_text, ref_text_pre = clip_reference.encode_text(state, tokens, config.text.heads, quick_gelu)
  # jit: one program per tower instead of every primitive compiled eagerly (the cold suite's cost).
  image, image_out = jax.jit(clip.image_tower, static_argnames="config")(
      loaded_params, jnp.asarray(images.transpose(0, 2, 3, 1)), config=config)
  text, text_out = jax.jit(clip.text_tower, static_argnames="config")(loaded_params, jnp.asarray(tokens),
                                                                        config=config)
  chex.assert_trees_all_close(image, ref_image.astype(np.float32), atol=ATOL)
  chex.assert_trees_all_close(text, ref_text.astype(np.float32), atol=ATOL)
  chex.assert_trees_all_close(image_out["pre_projection"], ref_image_pre.astype(np.float32), atol=ATOL)
  chex.assert_trees_all_close(text_out["pre_projection"], ref_text_pre.astype(np.float32), atol=ATOL)


def test_named_configs_build():
  for name in ("vit_b32", "vit_b16", "vit_l14", "vit_b16_gelu", "siglip_b16", "tiny"):
    config = clip.get_config(name)
    shapes = jax.eval_shape(lambda c=config: clip.init_params(c, jax.random.key(0)))
    assert shapes["visual"]["blocks"]["ln_1"]["scale"].shape == (config.vision.layers, config.vision.width)
  b16 = clip.get_config("vit_b16")
  assert (b16.vision.patch_size, b16.vision.width, b16.vision.heads, b16.text.width, b16.embed_dim) == (
      16, 768, 12, 512, 512)
  l14 = clip.get_config("vit_l14")
  assert (l14.vision.layers, l14.vision.width, l14.vision.heads, l14.text.width, l14.embed_dim) == (
      24, 1024, 16, 768, 768)
  with pytest.raises(ValueError, match="unknown config 'vit_z1'.*vit_b16"):
    clip.get_config("vit_z1")


def test_config_validation():
  with pytest.raises(ValueError, match="not divisible by heads"):
    clip.CLIPConfig(vision=clip.VisionConfig(width=100, heads=3))
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    clip.CLIPConfig(vision=clip.VisionConfig(image_size=30, patch_size=8))
  with pytest.raises(ValueError, match="unknown activation"):
    clip.CLIPConfig(text=dataclasses.replace(clip.TextConfig(), act="relu"))
