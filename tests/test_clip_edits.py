"""The per-layer token hook: schedules change exactly what they say, and nothing when empty."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesprompt.clip as clip
from bayesprompt.clip import edits
from bayesprompt.clip.layers import ResidualBlock

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

CONFIG = clip.CLIPConfig(
    vision=clip.VisionConfig(image_size=16, patch_size=8, width=32, layers=4, heads=2, mlp_dim=64),
    text=clip.TextConfig(vocab_size=50, context_length=12, width=32, layers=4, heads=2, mlp_dim=64),
    embed_dim=16)
WIDTH = 32


@pytest.fixture(scope="module")
def setup():
  params = clip.init_params(CONFIG, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  tokens = rng.integers(1, 40, size=(3, 12))
  tokens[:, 0] = 48
  tokens[np.arange(3), [5, 7, 9]] = 49  # EOT (largest id) at different positions
  tokens[0, 6:] = 0
  return params, images, jnp.asarray(tokens, jnp.int32)


def _tokens(key, n, batch=None):
  shape = (n, WIDTH) if batch is None else (batch, n, WIDTH)
  return jax.random.normal(jax.random.key(key), shape)


def test_empty_schedule_is_bit_identical(setup):
  params, images, tokens = setup
  plain_image, _ = clip.image_tower(params, images, config=CONFIG)
  plain_text, _ = clip.text_tower(params, tokens, config=CONFIG)
  for schedule in ({}, {0: ()}, {2: [], 3: ()}):
    image, _ = clip.image_tower(params, images, config=CONFIG, edits=schedule)
    text, _ = clip.text_tower(params, tokens, config=CONFIG, edits=schedule)
    np.testing.assert_array_equal(image, plain_image)
    np.testing.assert_array_equal(text, plain_text)


def test_replacing_tokens_by_themselves_changes_nothing(setup):
  """Replace at layers 1..3 with the very tokens the plain forward has there (grouped into one scan)."""
  params, images, tokens = setup
  plain, out = clip.image_tower(params, images, config=CONFIG, collect_intermediates=True)
  schedule = {layer: [edits.replace(out["layer_inputs"][layer][:, 2:4], position=2)] for layer in (1, 2, 3)}
  edited, _ = clip.image_tower(params, images, config=CONFIG, edits=schedule)
  chex.assert_trees_all_close(edited, plain, atol=1e-6)


def _manual_tower(params, x, pool, schedule, causal):
  """Reference: blocks one at a time in a Python loop (no scan), edits applied before each."""
  block = ResidualBlock(heads=2, mlp_dim=64, act="quick_gelu", ln_eps=1e-5)
  for layer in range(4):
    x, pool = edits.apply_edits(x, pool, schedule.get(layer, ()), "ref")
    mask = jnp.tril(jnp.ones((x.shape[1],) * 2, bool)) if causal else None
    x = block.apply({"params": jax.tree.map(lambda p, i=layer: p[i], params)}, x, mask)
  return x, pool


def test_grouped_scan_equals_layer_by_layer_loop(setup):
  params, _, tokens = setup
  schedule = {1: [edits.replace(_tokens(1, 2), position=1)], 2: [edits.replace(_tokens(2, 2), position=1)],
              3: [edits.replace(_tokens(3, 2), position=1)]}
  _, out = clip.text_tower(params, tokens, config=CONFIG, edits=schedule)
  embeddings = clip.embed_tokens(params, tokens) + params["text"]["positional_embedding"]
  reference, _ = _manual_tower(params["text"]["blocks"], embeddings, clip.eot_index(tokens), schedule, causal=True)
  chex.assert_trees_all_close(out["tokens"], reference, atol=1e-5)


def test_vision_insert_appends_after_patches(setup):
  params, images, _ = setup
  prompts = _tokens(4, 3)
  _, plain_out = clip.image_tower(params, images, config=CONFIG, collect_intermediates=True)
  features, out = clip.image_tower(params, images, config=CONFIG, edits={0: [edits.insert(prompts)]},
                                   collect_intermediates=True)
  entering = out["layer_inputs"][0]
  chex.assert_shape(entering, (3, 5 + 3, WIDTH))
  np.testing.assert_array_equal(entering[:, :5], plain_out["layer_inputs"][0])  # CLS + 4 patches untouched
  np.testing.assert_array_equal(entering[:, 5:], jnp.broadcast_to(prompts, (3, 3, WIDTH)))
  np.testing.assert_array_equal(out["pool_index"], 0)
  assert not np.allclose(features, clip.image_tower(params, images, config=CONFIG)[0])


def test_vision_insert_before_ln_pre(setup):
  """Key -1 edits the embedded sequence before ln_pre, as VPT/MaPLe's official code appends prompts."""
  params, images, _ = setup
  prompts = _tokens(5, 2)
  _, out = clip.image_tower(params, images, config=CONFIG, edits={-1: [edits.insert(prompts)]},
                            collect_intermediates=True)
  from bayesprompt.clip.layers import LayerNorm

  normalised = LayerNorm(1e-5).apply({"params": params["visual"]["ln_pre"]}, prompts)
  chex.assert_trees_all_close(out["layer_inputs"][0][:, 5:], jnp.broadcast_to(normalised, (3, 2, WIDTH)), atol=1e-6)


def test_text_insert_after_eot_is_invisible_to_the_causal_eot_feature(setup):
  """Tokens appended at the end sit after EOT: under the causal mask the pooled EOT feature can't see them."""
  params, _, tokens = setup
  short = tokens[:2, :9]
  plain, _ = clip.text_tower(params, short, config=CONFIG)
  edited, out = clip.text_tower(params, short, config=CONFIG, edits={1: [edits.insert(_tokens(6, 3))]})
  chex.assert_trees_all_close(edited, plain, atol=1e-6)
  np.testing.assert_array_equal(out["pool_index"], clip.eot_index(short))


def test_text_insert_before_eot_shifts_pool_index(setup):
  params, _, tokens = setup
  short = tokens[:, :10]
  plain, _ = clip.text_tower(params, short, config=CONFIG)
  per_example = _tokens(7, 2, batch=3)
  edited, out = clip.text_tower(params, short, config=CONFIG, edits={2: [edits.insert(per_example, position=1)]})
  np.testing.assert_array_equal(out["pool_index"], clip.eot_index(short) + 2)
  chex.assert_shape(out["tokens"], (3, 12, WIDTH))
  assert not np.allclose(edited, plain, atol=1e-4)


def test_drop_undoes_insert(setup):
  params, images, tokens = setup
  plain, _ = clip.image_tower(params, images, config=CONFIG)
  schedule = {1: [edits.insert(_tokens(8, 2)), edits.drop(position=-2, count=2)]}
  edited, _ = clip.image_tower(params, images, config=CONFIG, edits=schedule)
  # Not bitwise: layer 1 now runs outside the scan, and XLA fuses it differently.
  chex.assert_trees_all_close(edited, plain, atol=1e-5)
  short = tokens[:, :10]
  text, _ = clip.text_tower(params, short, config=CONFIG)
  edited_text, out = clip.text_tower(
      params, short, config=CONFIG, edits={2: [edits.insert(_tokens(9, 2), position=1), edits.drop(1, 2)]})
  chex.assert_trees_all_close(edited_text, text, atol=1e-5)
  np.testing.assert_array_equal(out["pool_index"], clip.eot_index(short))


def test_carry_schedule_grows_prompt_count(setup):
  """MPL's pattern: insert 1 at layer 0, then at each layer drop the last 1 and append 2: count grows 1, 2, 3, 4."""
  params, images, _ = setup
  schedule = {0: [edits.insert(_tokens(10, 1))]}
  for layer in (1, 2, 3):
    schedule[layer] = [edits.drop(position=-1, count=1), edits.insert(_tokens(10 + layer, 2))]
  _, out = clip.image_tower(params, images, config=CONFIG, edits=schedule, collect_intermediates=True)
  assert [x.shape[1] - 5 for x in out["layer_inputs"]] == [1, 2, 3, 4]
  # The carried token: the first prompt output of layer 1 enters layer 2 unchanged in position 5.
  chex.assert_shape(out["tokens"], (3, 9, WIDTH))


def test_edits_under_jit_and_grad(setup):
  params, images, _ = setup

  @jax.jit
  def loss(prompts):
    features, _ = clip.image_tower(params, images, config=CONFIG,
                                   edits={0: [edits.insert(prompts[0])], 1: [edits.replace(prompts[1], -2)],
                                          2: [edits.replace(prompts[2], -2)]})
    return jnp.sum(features**2)

  prompts = _tokens(20, 2, batch=3)
  grad = jax.grad(loss)(prompts)
  chex.assert_shape(grad, prompts.shape)
  assert np.all(np.abs(np.asarray(grad)).sum(axis=(1, 2)) > 0)
  chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize("schedule, message", [
    ({4: [edits.insert(jnp.zeros((1, WIDTH)))]}, "edit layer 4 out of range"),
    ({0: [edits.insert(jnp.zeros((1, WIDTH + 1)))]}, r"insert tokens must be \[n, 32\]"),
    ({0: [edits.replace(jnp.zeros((2, WIDTH)), position=4)]}, "does not fit a sequence of 5 tokens"),
    ({0: [edits.insert(jnp.zeros((1, WIDTH)), position=7)]}, "insert position 7 out of range"),
    ({0: ["not an edit"]}, "expected TokenEdit"),
    ({0: [edits.insert(jnp.zeros((2, 1, WIDTH)))]}, "per-example tokens have batch 2"),
])
def test_bad_schedules_raise(setup, schedule, message):
  params, images, _ = setup
  with pytest.raises((ValueError, TypeError), match=message):
    clip.image_tower(params, images, config=CONFIG, edits=schedule)
