"""Checkpoint loading: every format, and a clear error (never a half-loaded model) for every bad input."""

import json
import shutil
import sys

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bayesprompt.clip as clip

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_bare_open_clip_safetensors_infers_architecture(fixtures_dir):
  """A bare file: architecture from shapes (heads = width // 64), activation from the quick_gelu argument."""
  config, params = clip.load_checkpoint(fixtures_dir / "openclip_vit_tiny" / "open_clip_model.safetensors",
                                        quick_gelu=True)
  dir_config, _ = clip.load_checkpoint(fixtures_dir / "openclip_vit_tiny")
  assert config == dir_config
  io = np.load(fixtures_dir / "openclip_vit_tiny.io.npz")
  features = clip.encode_image(params, io["images"].transpose(0, 2, 3, 1), config=config)
  chex.assert_trees_all_close(features, io["image_features"], atol=1e-4)


def test_bare_file_default_is_quick_gelu_and_gelu_is_selectable(fixtures_dir):
  path = fixtures_dir / "openclip_vit_tiny_gelu" / "open_clip_model.safetensors"
  assert clip.load_checkpoint(path)[0].vision.act == "quick_gelu"
  config, params = clip.load_checkpoint(path, quick_gelu=False)
  io = np.load(fixtures_dir / "openclip_vit_tiny_gelu.io.npz")
  chex.assert_trees_all_close(clip.encode_text(params, io["tokens"].astype(np.int32), config=config),
                              io["text_features"], atol=1e-4)


def test_save_load_round_trip(tmp_path, fixtures_dir):
  config, params = clip.load_checkpoint(fixtures_dir / "openclip_vit_tiny")
  clip.save_checkpoint(tmp_path / "copy", config, params)
  again_config, again = clip.load_checkpoint(tmp_path / "copy")
  assert again_config == config
  chex.assert_trees_all_equal(again, params)
  original = load_file(str(fixtures_dir / "openclip_vit_tiny" / "open_clip_model.safetensors"))
  written = load_file(str(tmp_path / "copy" / "open_clip_model.safetensors"))
  assert sorted(original) == sorted(written)
  for key in original:
    np.testing.assert_array_equal(written[key].reshape(original[key].shape), original[key], err_msg=key)
  # Saving over an existing directory replaces it atomically.
  clip.save_checkpoint(tmp_path / "copy", config, params)
  assert not (tmp_path / "copy.tmp").exists() and not (tmp_path / "copy.old").exists()


def _copy(fixtures_dir, tmp_path, name="openclip_vit_tiny"):
  target = tmp_path / name
  shutil.copytree(fixtures_dir / name, target)
  return target


def _edit_state(directory, edit, filename="open_clip_model.safetensors"):
  state = load_file(str(directory / filename))
  edit(state)
  save_file(state, str(directory / filename))


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    clip.load_checkpoint(tmp_path / "does-not-exist")


def test_unknown_layout(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(clip.CheckpointError, match="unknown checkpoint layout"):
    clip.load_checkpoint(tmp_path)
  with pytest.raises(clip.CheckpointError, match="unknown weight file type '.npz'"):
    clip.load_checkpoint(tmp_path / "weights.npz")


def test_open_clip_dir_without_weights(fixtures_dir, tmp_path):
  directory = _copy(fixtures_dir, tmp_path)
  (directory / "open_clip_model.safetensors").unlink()
  with pytest.raises(clip.CheckpointError, match="without weights"):
    clip.load_checkpoint(directory)


def test_missing_key_is_named(fixtures_dir, tmp_path):
  directory = _copy(fixtures_dir, tmp_path)
  _edit_state(directory, lambda s: s.pop("visual.transformer.resblocks.1.ln_2.bias"))
  with pytest.raises(clip.CheckpointError, match=r"missing keys: visual\.transformer\.resblocks\.1\.ln_2\.bias"):
    clip.load_checkpoint(directory)


def test_unexpected_key_is_named(fixtures_dir, tmp_path):
  directory = _copy(fixtures_dir, tmp_path)
  _edit_state(directory, lambda s: s.update({"visual.extra_adapter.weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(clip.CheckpointError, match=r"unexpected keys: visual\.extra_adapter\.weight"):
    clip.load_checkpoint(directory)


def test_shape_mismatch_names_tensor_and_shapes(fixtures_dir, tmp_path):
  directory = _copy(fixtures_dir, tmp_path)
  _edit_state(directory, lambda s: s.update({"visual.proj": np.zeros((128, 32), np.float32)}))
  with pytest.raises(clip.CheckpointError, match=r"visual\.proj has shape \(128, 32\).*expected \(128, 64\)"):
    clip.load_checkpoint(directory)


def test_config_disagreeing_with_weights(fixtures_dir, tmp_path):
  directory = _copy(fixtures_dir, tmp_path)
  cfg = json.loads((directory / "open_clip_config.json").read_text())
  cfg["model_cfg"]["vision_cfg"]["layers"] = 3
  (directory / "open_clip_config.json").write_text(json.dumps(cfg))
  with pytest.raises(clip.CheckpointError, match=r"missing keys: visual\.transformer\.resblocks\.2\."):
    clip.load_checkpoint(directory)


def test_unsupported_open_clip_option(fixtures_dir, tmp_path):
  directory = _copy(fixtures_dir, tmp_path)
  cfg = json.loads((directory / "open_clip_config.json").read_text())
  cfg["model_cfg"]["vision_cfg"]["attentional_pool"] = True
  (directory / "open_clip_config.json").write_text(json.dumps(cfg))
  with pytest.raises(clip.CheckpointError, match="unsupported open_clip vision_cfg options.*attentional_pool"):
    clip.load_checkpoint(directory)


def test_corrupt_safetensors(tmp_path):
  (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
  with pytest.raises(clip.CheckpointError, match="not a readable safetensors file"):
    clip.load_checkpoint(tmp_path / "broken.safetensors")


def test_pickle_refused_without_allow_pickle(tmp_path):
  for name in ("ViT-B-16.pt", "open_clip_pytorch_model.bin"):
    (tmp_path / name).write_bytes(b"not really a pickle")
    with pytest.raises(clip.CheckpointError, match="allow_pickle=True"):
      clip.load_checkpoint(tmp_path / name)


def test_pickle_with_allow_pickle_needs_torch(tmp_path, monkeypatch):
  """Without torch, allow_pickle=True still refuses clearly (torch hidden: sys.modules["torch"] = None)."""
  monkeypatch.setitem(sys.modules, "torch", None)
  (tmp_path / "model.pt").write_bytes(b"x")
  with pytest.raises(clip.CheckpointError, match="needs torch"):
    clip.load_checkpoint(tmp_path / "model.pt", allow_pickle=True)


def test_unknown_hf_model_type(fixtures_dir, tmp_path):
  directory = _copy(fixtures_dir, tmp_path, "hf_clip_tiny")
  cfg = json.loads((directory / "config.json").read_text())
  cfg["model_type"] = "blip"
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(clip.CheckpointError, match="unsupported transformers model_type 'blip'"):
    clip.load_checkpoint(directory)


@pytest.fixture(scope="module")
def tiny():
  config = clip.get_config("tiny")
  import jax

  return config, clip.init_params(config, jax.random.key(0))


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((32, 32, 3), np.float32), ValueError, r"NHWC \[batch, 32, 32, 3\]"),
    (np.zeros((2, 3, 32, 32), np.float32), ValueError, "NHWC"),
    (np.zeros((2, 64, 64, 3), np.float32), ValueError, "must be 32x32.*got 64x64"),
    (np.zeros((2, 32, 32, 3), np.uint8), TypeError, "float array.*uint8"),
])
def test_bad_images(tiny, images, error, message):
  config, params = tiny
  with pytest.raises(error, match=message):
    clip.encode_image(params, images, config=config)


@pytest.mark.parametrize("tokens, error, message", [
    (np.full((2, 77), 1000), ValueError, r"token id 1000 out of range \[0, 1000\)"),
    (np.full((2, 77), -1), ValueError, "token id -1 out of range"),
    (np.zeros((2, 78), np.int32), ValueError, "length 78 > context length 77"),
    (np.zeros((77,), np.int32), ValueError, r"\[M, context_length\]"),
    (np.zeros((2, 77), np.float32), TypeError, "must be integers"),
])
def test_bad_token_ids(tiny, tokens, error, message):
  config, params = tiny
  with pytest.raises(error, match=message):
    clip.encode_text(params, tokens, config=config)


def test_long_texts_truncate_like_clip(tiny):
  ids = clip.tokenize(["word " * 200])
  assert ids.shape == (1, 77) and ids[0, -1] == 49407
  config, params = tiny
  assert jnp.all(jnp.isfinite(clip.encode_text(params, ids % 1000, config=config)))
