"""Prompt learners on one engine, checked against independent oracles on a tiny random CLIP.

Oracles: zero-shot CLIP (CoOp with the template phrase as context), hand-built prompts (class-token
positions), the shallow model's own intermediate tokens (deep replace semantics), per-layer token
counts and block outputs inside the vision tower (MPL's carry), closed-form and Monte Carlo Gaussian KLs,
brute-force Python loops over Monte Carlo samples (vmap), and invariance of a class's logits to the rest
of the class list (class names change after training).
"""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import bayesprompt.clip as clip
import bayesprompt.prompts as prompts
from bayesprompt.clip import edits as edits_lib
from bayesprompt.clip.layers import ResidualBlock
from bayesprompt.clip.tokenizer import WordTokenizer
from bayesprompt.prompts import engine

WORDS = "a photo of the red blue green circle square star big small striped dog cat on grass".split()
TEMPLATE = "a photo of a {}."
CLASSNAMES = ["red circle", "blue square", "cat", "big striped dog"]
OTHER_CLASSNAMES = ["green star", "cat", "small red square"]  # "cat" shared, other C and lengths
LABELS = np.array([0, 2, 3])
IMAGE_SIZE, PATCH = 16, 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def random_clip_params(config: clip.CLIPConfig, seed: int = 0) -> dict:
  """Random CLIP params with `init_params`'s layout, filled in NumPy (tracing only: no compile)."""
  shapes = jax.eval_shape(lambda key: clip.init_params(config, key), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
    if name.endswith("['bias']"):
      return jnp.asarray(0.05 * rng.normal(size=leaf.shape), jnp.float32)
    if name == "['logit_scale']":
      return jnp.asarray(np.log(1 / 0.07), jnp.float32)
    std = leaf.shape[-2] ** -0.5 if name.endswith("['kernel']") and len(leaf.shape) >= 2 else 0.1
    return jnp.asarray(std * rng.normal(size=leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# Tiny towers: XLA's optimisation passes cost far more than they save.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def tiny_world(tmp_path_factory) -> dict:
  """A random tiny CLIP (16 px ViT, patch 8, 4 vision / 3 text layers, width 32, embed 64) with a word tokenizer
  over WORDS, three random images and random normalised class prototypes."""
  tokenizer = WordTokenizer(WORDS, context_length=20)
  path = tmp_path_factory.mktemp("tokenizer") / "words.json"
  tokenizer.to_json(path)
  config = clip.CLIPConfig(
      vision=clip.VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, width=32, layers=4, heads=2, mlp_dim=64),
      text=clip.TextConfig(vocab_size=tokenizer.vocab_size, context_length=20, width=32, layers=3, heads=2,
                           mlp_dim=64),
      embed_dim=64, tokenizer=str(path))
  params = random_clip_params(config)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3)), jnp.float32)
  prototypes = clip.normalize(jnp.asarray(np.random.default_rng(2).normal(size=(len(CLASSNAMES), 64)), jnp.float32))
  return dict(config=config, params=params, images=images, tokenizer=tokenizer, prototypes=prototypes)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world(tmp_path_factory)


def zero_shot_logits(world, classnames, template=TEMPLATE):
  config, params, tok = world["config"], world["params"], world["tokenizer"]
  text = clip.encode_text(params, tok([template.format(n) for n in classnames]), config=config)
  return clip.contrastive_logits(params, clip.encode_image(params, world["images"], config=config), text)


# Hyper-parameters of one small instance of every method (the towers have 3 text / 4 vision layers).
LEARNERS = {
    "coop": dict(n_ctx=4),
    "cocoop": dict(),
    "maple": dict(depth=2),
    "mpl": dict(depth=2),
    "vpt": dict(num_train_samples=3),
    "vpt_cocoop": dict(conditioning="cocoop", num_train_samples=2),
    "vamp": dict(n_tokens=2, first_layer=1, depth=2, num_train_samples=2, num_test_samples=3),
}


def make(world, key, **overrides):
  method = key.split("_")[0]
  return prompts.make_learner(method, world["config"], **{**LEARNERS[key], **overrides})


_JITTED = {}


def jit_apply(learner, params, clip_params, state, images, rng=None, train=False, labels=None):
  """learner.apply under jit, one compiled function per learner (eager towers are far slower)."""
  if learner not in _JITTED:
    _JITTED[learner] = jax.jit(learner.apply, static_argnums=(5,))
  return _JITTED[learner](params, clip_params, state, images, rng, train, labels)


def jit_text_tower(config):
  """Jitted normalised text features of embeddings; `tokens` [2, M, W_t] are inserted after SOS at layer 1
  and replace themselves at layer 2 (VaMP's schedule with first_layer=1, depth=2)."""

  @jax.jit
  def features(clip_params, embeddings, pool_index, tokens=None):
    schedule = None if tokens is None else {1: [edits_lib.insert(tokens[0], position=1)],
                                            2: [edits_lib.replace(tokens[1], position=1)]}
    text, _ = clip.text_tower_from_embeddings(clip_params, embeddings, pool_index, config=config, edits=schedule)
    return clip.normalize(text)

  return features


# ------------------------------------------------------------------------------------------ CoOp / layout


def test_coop_with_template_phrase_context_reproduces_zero_shot_clip(world):
  learner = prompts.make_learner("coop", world["config"], ctx_init="a photo of a")
  assert learner.n_ctx == 4
  state = learner.prepare_classes(world["params"], CLASSNAMES, templates=TEMPLATE)
  params = learner.init(jax.random.key(0), world["params"], state)
  output = jit_apply(learner, params, world["params"], state, world["images"], None, False)
  expected = zero_shot_logits(world, CLASSNAMES)
  chex.assert_shape(output.logits, (1, 3, len(CLASSNAMES)))
  chex.assert_trees_all_close(output.logits[0], expected, atol=1e-5)
  # The frozen zero-shot classifier in the class state is the same text tower on the template.
  image = clip.normalize(clip.encode_image(world["params"], world["images"], config=world["config"]))
  chex.assert_trees_all_close(jnp.exp(world["params"]["logit_scale"]) * image @ state.zeroshot_text_features.T,
                              expected, atol=1e-5)
  chex.assert_trees_all_close(output.frozen_image_features, image, atol=1e-6)
  # Prompts are trimmed to the longest one (exact under the causal mask); full_context keeps 20 tokens.
  ids = world["tokenizer"]([TEMPLATE.format(n) for n in CLASSNAMES])
  assert state.sequence_length == int(clip.eot_index(ids).max()) + 1 < 20
  full = prompts.make_learner("coop", world["config"], ctx_init="a photo of a", full_context=True)
  full_state = full.prepare_classes(world["params"], CLASSNAMES)
  np.testing.assert_array_equal(engine.build_prompts(full_state, params["ctx"]), clip.embed_tokens(world["params"], ids))


def test_defaults_are_the_paper_recipes(world):
  config = world["config"]  # 3 text / 4 vision layers
  coop, cocoop, maple, mpl, vpt, vamp = (prompts.make_learner(m, config)
                                         for m in ("coop", "cocoop", "maple", "mpl", "vpt", "vamp"))
  assert (coop.n_ctx, coop.ctx_init, coop.class_token_position, coop.class_specific) == (16, None, "end", False)
  assert (cocoop.n_ctx, cocoop.ctx_init) == (4, "a photo of a")
  assert (maple.n_ctx, maple.ctx_init, maple.depth, maple.coupling) == (2, "a photo of a", 2, True)  # 9/12 of 3
  assert (mpl.n_ctx, mpl.fixed_text, mpl.n_add, mpl.n_rm) == (1, "a photo of a", 2, 1)
  assert (vpt.n_ctx, vpt.num_samples(True), vpt.num_samples(False), vpt.kl_weight) == (4, 10, 10, 0.001)
  assert (vamp.num_samples(True), vamp.num_samples(False), vamp.kl_weight) == (1, 10, 1.0)
  assert (vamp.first_layer, vamp.depth) == (0, 3)
  assert prompts.make_learner("maple", clip.get_config("vit_b16")).depth == 9
  b16_vamp = prompts.make_learner("vamp", clip.get_config("vit_b16"))
  assert list(b16_vamp.prompted_layers) == list(range(5, 12))  # MMRL's layers 6..12 (1-based)
  assert [m.touches_image_tower for m in (coop, cocoop, maple, mpl, vpt, vamp)] == [False, False, True, True, False,
                                                                                     True]


def test_zero_shot_features_ensemble_templates(world):
  learner = prompts.make_learner("coop", world["config"], n_ctx=2)
  templates = ["a photo of a {}.", "a {} on grass."]
  state = learner.prepare_classes(world["params"], CLASSNAMES, templates=templates)
  per_template = [clip.normalize(clip.encode_text(world["params"], world["tokenizer"]([t.format(n) for n in CLASSNAMES]),
                                                  config=world["config"])) for t in templates]
  chex.assert_trees_all_close(state.zeroshot_text_features, clip.normalize(sum(per_template)), atol=1e-6)


@pytest.mark.parametrize("position, n_ctx, sentence", [("end", 3, "a photo of {}."), ("front", 3, "{} a photo of."),
                                                      ("middle", 3, "a {} photo of."), ("middle", 2, "a {} photo.")])
def test_class_token_position_places_the_class_name(world, position, n_ctx, sentence):
  """With the context set to the word embeddings of "a photo of", every prompt is a plain sentence: its
  input embeddings and EOT index are those of the tokenized sentence."""
  learner = prompts.make_learner("coop", world["config"], n_ctx=n_ctx, class_token_position=position)
  state = learner.prepare_classes(world["params"], CLASSNAMES)
  ctx = engine.phrase_context(world["params"], world["config"], "a photo of", n_ctx)
  ids = world["tokenizer"]([sentence.format(n) for n in CLASSNAMES])[:, :state.sequence_length]
  np.testing.assert_array_equal(engine.build_prompts(state, ctx), clip.embed_tokens(world["params"], ids))
  np.testing.assert_array_equal(state.pool_index, clip.eot_index(ids))
  assert state.sequence_length == int(clip.eot_index(ids).max()) + 1  # trimmed to the longest prompt


def test_class_specific_context_fills_each_class_with_its_own(world):
  learner = prompts.make_learner("coop", world["config"], ctx_init="a photo of a", class_specific=True)
  state = learner.prepare_classes(world["params"], CLASSNAMES)
  params = learner.init(jax.random.key(0), world["params"], state)
  chex.assert_shape(params["ctx"], (len(CLASSNAMES), 4, 32))
  ids = world["tokenizer"]([TEMPLATE.format(n) for n in CLASSNAMES])[:, :state.sequence_length]
  np.testing.assert_array_equal(engine.build_prompts(state, params["ctx"], class_specific=True),
                                clip.embed_tokens(world["params"], ids))
  ctx = jax.random.normal(jax.random.key(1), params["ctx"].shape)
  built = engine.build_prompts(state, ctx, class_specific=True)
  for c in range(len(CLASSNAMES)):
    np.testing.assert_array_equal(built[c, 1:5], ctx[c])
  other = learner.prepare_classes(world["params"], OTHER_CLASSNAMES)
  with pytest.raises(ValueError, match="class-specific context must be \\[3"):
    jit_apply(learner, params, world["params"], other, world["images"], None, False)


def test_cocoop_prompts_are_coop_prompts_shifted_by_the_meta_net_per_image(world):
  config, clip_params = world["config"], world["params"]
  cocoop = make(world, "cocoop")
  coop = prompts.make_learner("coop", config, ctx_init="a photo of a")  # same layout (n_ctx=4)
  state = cocoop.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE)  # as the zero-shot test's: one compile
  params = cocoop.init(jax.random.key(0), clip_params, state)
  output = jit_apply(cocoop, params, clip_params, state, world["images"], None, False)
  image = clip.normalize(clip.encode_image(clip_params, world["images"], config=config))
  hidden = np.maximum(image @ params["meta_net"]["linear1"]["kernel"] + params["meta_net"]["linear1"]["bias"], 0)
  bias = hidden @ params["meta_net"]["linear2"]["kernel"] + params["meta_net"]["linear2"]["bias"]  # [B, W_t]
  assert np.abs(bias[0] - bias[1]).max() > 1e-3
  for b in range(3):
    shifted = jit_apply(coop, {"ctx": params["ctx"] + bias[b]}, clip_params, state, world["images"], None, False)
    chex.assert_trees_all_close(output.logits[0, b], shifted.logits[0, b], atol=1e-5)


# ------------------------------------------------------------------------------------------ MaPLe / MPL


def test_maple_depth_one_without_coupling_is_shallow_prompting(world):
  maple = prompts.make_learner("maple", world["config"], depth=1, coupling=False)
  coop = prompts.make_learner("coop", world["config"], ctx_init="a photo of a", n_ctx=2)
  state = maple.prepare_classes(world["params"], CLASSNAMES)
  params = maple.init(jax.random.key(0), world["params"], state)
  assert set(params) == {"ctx"} and not maple.touches_image_tower
  params = {"ctx": params["ctx"] + 0.1 * jax.random.normal(jax.random.key(1), params["ctx"].shape)}
  out_maple = jit_apply(maple, params, world["params"], state, world["images"], None, False)
  out_coop = jit_apply(coop, params, world["params"], coop.prepare_classes(world["params"], CLASSNAMES),
                        world["images"], None, False)
  chex.assert_trees_all_close(out_maple.logits, out_coop.logits, atol=1e-5)


def test_maple_deep_prompts_replace_the_previous_prompt_outputs(world):
  """Deep prompts equal to the tokens the shallow model already has at those positions reproduce it:
  text positions 1..n are replaced, and the last n vision tokens are (coupling maps solved exactly)."""
  config, clip_params = world["config"], world["params"]
  shallow = prompts.make_learner("maple", config, depth=1)
  deep = prompts.make_learner("maple", config, depth=3)
  state = deep.prepare_classes(clip_params, CLASSNAMES)
  params = deep.init(jax.random.key(0), clip_params, state)
  shallow_params = {"ctx": params["ctx"], "proj": params["proj"]}
  n = deep.n_ctx
  embeddings = engine.build_prompts(state, params["ctx"])
  text_out = jax.jit(lambda p, e, i: clip.text_tower_from_embeddings(p, e, i, config=config, collect_intermediates=True)[1])(
      clip_params, embeddings, state.pool_index)
  vision_out = jax.jit(lambda p, x, lp: clip.image_tower(p, x, config=config, edits=shallow.vision_edits(lp),
                                                          collect_intermediates=True)[1])(
      clip_params, world["images"], shallow_params)
  # Shared deep prompts must be the same for every class/image: use class 0's and image 0's tokens and
  # check on that class and image.
  deep_text = jnp.stack([text_out["layer_inputs"][i][0, 1:1 + n] for i in (1, 2)])
  targets = jnp.stack([vision_out["layer_inputs"][i][0, -n:] for i in (1, 2)])
  kernel = jnp.stack([jnp.linalg.pinv(deep_text[j]) @ (targets[j] - params["deep_proj"]["bias"][j]) for j in (0, 1)])
  params = {**params, "deep_text": deep_text, "deep_proj": {**params["deep_proj"], "kernel": kernel}}
  chex.assert_trees_all_close(engine.stacked_dense(params["deep_proj"], deep_text), targets, atol=1e-4)
  out_deep = jit_apply(deep, params, clip_params, state, world["images"][:1], None, False)
  out_shallow = jit_apply(shallow, shallow_params, clip_params, state, world["images"][:1], None, False)
  chex.assert_trees_all_close(out_deep.logits, out_shallow.logits, atol=1e-3)
  # ... and a different deep prompt does change the result (the edits are live).
  moved = jit_apply(deep, {**params, "deep_text": deep_text + 1.0}, clip_params, state, world["images"][:1], None, False)
  assert np.abs(moved.logits - out_shallow.logits).max() > 1e-2


def test_maple_vision_side_equals_an_independent_numpy_tower(world, tmp_path):
  """MaPLe's vision prompts, built in NumPy from the learner params (layer 0: proj(ctx) = ctx·W + b appended
  before ln_pre; layers 1..J-1: deep_text_j·W_j + b_j overwriting the last n tokens) and run through the
  independent NumPy CLIP (tests/clip_reference.py), against the learner's image features."""
  from safetensors.numpy import load_file

  from tests import clip_reference

  config, clip_params = world["config"], world["params"]
  learner = prompts.make_learner("maple", config, depth=3)
  state = learner.prepare_classes(clip_params, CLASSNAMES)
  params = learner.init(jax.random.key(0), clip_params, state)
  noise = jax.random.split(jax.random.key(5), 4)
  params = {**params, "ctx": params["ctx"] + 0.3 * jax.random.normal(noise[0], params["ctx"].shape),
            "deep_text": params["deep_text"] + 0.3 * jax.random.normal(noise[1], params["deep_text"].shape),
            "proj": {k: v + 0.1 * jax.random.normal(noise[2], v.shape) for k, v in params["proj"].items()}}
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  layer0 = p["ctx"] @ p["proj"]["kernel"] + p["proj"]["bias"]
  deep = {i: p["deep_text"][i - 1] @ p["deep_proj"]["kernel"][i - 1] + p["deep_proj"]["bias"][i - 1] for i in (1, 2)}
  clip.save_checkpoint(tmp_path / "model", config, clip_params)
  weights = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
  images = np.asarray(world["images"])
  expected, _ = clip_reference.encode_image(weights, images.transpose(0, 3, 1, 2), config.vision.heads,
                                            config.vision.act == "quick_gelu", prompts=layer0, deep_prompts=deep)
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  got = jax.jit(lambda cp, x, lp: engine.image_features(cp, config, x, learner.vision_edits(lp)))(
      clip_params, world["images"], params)
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)
  plain, _ = clip_reference.encode_image(weights, images.transpose(0, 3, 1, 2), config.vision.heads,
                                         config.vision.act == "quick_gelu")
  assert np.max(np.abs(plain / np.linalg.norm(plain, axis=-1, keepdims=True) - expected)) > 1e-3  # live


def test_mpl_vision_prompts_grow_then_are_carried(world):
  config, clip_params = world["config"], world["params"]
  learner = make(world, "mpl", depth=3)  # n_ctx=1, n_add=2, n_rm=1, J=3 on a 4-layer vision tower
  state = learner.prepare_classes(clip_params, CLASSNAMES)
  params = learner.init(jax.random.key(0), clip_params, state)
  params["deep_text"] = params["deep_text"] + jax.random.normal(jax.random.key(3), params["deep_text"].shape)
  assert learner.vision_prompt_counts() == [1, 2, 3, 3]  # 1 -> J, then carried
  _, out = jax.jit(lambda p, x, lp: clip.image_tower(p, x, config=config, edits=learner.vision_edits(lp),
                                                           collect_intermediates=True))(
      clip_params, world["images"], params)
  inputs = out["layer_inputs"]
  base = 1 + NUM_PATCHES
  assert [x.shape[1] - base for x in inputs] == [1, 2, 3, 3]
  block = jax.jit(ResidualBlock(heads=2, mlp_dim=64, act="quick_gelu", ln_eps=1e-5).apply)
  blocks = clip_params["visual"]["blocks"]
  new_tokens = learner._deep_vision_tokens(params)  # [J-1, n_add, W_v]
  for layer in range(3):
    output = block({"params": jax.tree.map(lambda p, i=layer: p[i], blocks)}, inputs[layer])
    kept = output.shape[1] - (learner.n_rm if 1 <= layer + 1 < learner.depth else 0)
    chex.assert_trees_all_close(inputs[layer + 1][:, :kept], output[:, :kept], atol=1e-5)  # carried
    if layer + 1 < learner.depth:
      np.testing.assert_array_equal(inputs[layer + 1][:, kept:], jnp.broadcast_to(new_tokens[layer], (3, 2, 32)))
  # The new tokens are the n_add separate couplings of that layer's text prompt.
  proj = params["deep_proj"]
  for a in range(2):
    chex.assert_trees_all_close(new_tokens[1, a], params["deep_text"][1, 0] @ proj["kernel"][a, 1] + proj["bias"][a, 1],
                                atol=1e-5)
  assert learner.touches_image_tower


# ------------------------------------------------------------------------------------------ Bayesian


def bp_clip_vpt_posterior(params: dict, image: np.ndarray,
                          conditioning: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, log_var) of BPL's residual in float64, transliterated from BP_CLIP's trainers/vpt_ove_pg.py and
  vpt_cocoop_ove_pg.py (MingyuKim87/BP_CLIP), not from bayesprompt: "coopvpt" reads the free parameters
  (`mean_posterior` and `std_posterior`, the latter used as a log-variance: `logvar.exp().sqrt()`);
  "cocoopvpt" runs `Amortized` on the normalised image feature [B, D]: two `InferenceBlock`s
  Linear(D, D/2)-ELU-Linear(D/2, D/2)-ELU-Linear(D/2, W_t), one for the mean and one for the log-variance.
  torch's nn.Linear computes x Wᵀ + b with W [out, in]; ours stores kernel = Wᵀ [in, out]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  if conditioning == "coop":
    return p["posterior"]["mean"], p["posterior"]["log_var"]

  def torch_linear(layer, x):
    weight = layer["kernel"].T  # torch layout [out, in]
    return x @ weight.T + layer["bias"]

  def elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))

  def inference_block(block, x):
    x = elu(torch_linear(block["linear1"], x))
    x = elu(torch_linear(block["linear2"], x))
    return torch_linear(block["linear3"], x)

  x = np.asarray(image, np.float64)
  return inference_block(p["meta_net"]["mean"], x), inference_block(p["meta_net"]["log_var"], x)


def _per_layer_mlp(mlp: dict, layer: int, x: np.ndarray) -> np.ndarray:
  """Layer `layer`'s two-layer ReLU MLP of VaMP (x W1 + b1 -> ReLU -> W2 + b2), float64."""
  hidden = np.maximum(x @ mlp["linear1"]["kernel"][layer] + mlp["linear1"]["bias"][layer], 0.0)
  return hidden @ mlp["linear2"]["kernel"][layer] + mlp["linear2"]["bias"][layer]


def vamp_posterior_numpy(params: dict, frozen: np.ndarray, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """VaMP's q(z_i | x) from the paper's equations, layer by layer in float64: the generator Φ_i(f_x) gives the
  M tokens [M, W_t] of layer i; the posterior net φ_i maps each token to [μ | log σ²] (2·W_t). Returns
  (mean, log_var), each [H, B, M, W_t]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  depth = p["generator"]["linear1"]["kernel"].shape[0]  # H prompted layers
  means, log_vars = [], []
  for i in range(depth):
    tokens = _per_layer_mlp(p["generator"], i, np.asarray(frozen, np.float64))  # [B, M·W_t]
    tokens = tokens.reshape(len(frozen), n_tokens, -1)  # z_i = Φ_i(f_x) ∈ R^{M x W_t}
    out = _per_layer_mlp(p["posterior"], i, tokens)  # [B, M, 2 W_t]
    width = tokens.shape[-1]
    means.append(out[..., :width])
    log_vars.append(out[..., width:])
  return np.stack(means), np.stack(log_vars)


def vamp_prior_numpy(params: dict, prototypes: np.ndarray, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """VaMP's class-aware prior p(z_i | o_y) = N(μ̂_i, σ̂_i²), [μ̂_i | log σ̂_i²] = ψ_i(o_y) per token (the
  ψ_i output [2·M·W_t] read as M rows of [μ̂ | log σ̂²]), float64: (mean, log_var), each [H, B, M, W_t]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  depth = p["prior"]["linear1"]["kernel"].shape[0]  # H prompted layers
  means, log_vars = [], []
  for i in range(depth):
    out = _per_layer_mlp(p["prior"], i, np.asarray(prototypes, np.float64))
    out = out.reshape(len(prototypes), n_tokens, -1)
    width = out.shape[-1] // 2
    means.append(out[..., :width])
    log_vars.append(out[..., width:])
  return np.stack(means), np.stack(log_vars)


def vamp_image_features_numpy(world: dict, params: dict, first_layer: int, tmp_path) -> np.ndarray:
  """VaMP's vision side in the independent NumPy CLIP (tests/clip_reference.py), float64: the shared prompts
  z̃_J [M, W_v] appended after the patches before block J, z̃_i overwriting the last M tokens before each later
  prompted block i; normalised image features [B, D]."""
  from safetensors.numpy import load_file

  from tests import clip_reference

  config = world["config"]
  vision_prompts = np.asarray(params["vision_prompts"], np.float64)  # [H, M, W_v]
  clip.save_checkpoint(tmp_path / "model", config, world["params"])
  weights = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
  images = np.asarray(world["images"]).transpose(0, 3, 1, 2)
  deep = {first_layer + h: vision_prompts[h] for h in range(1, len(vision_prompts))}
  appended = {first_layer: vision_prompts[0]}
  features, _ = clip_reference.encode_image(weights, images, config.vision.heads,
                                            config.vision.act == "quick_gelu", appended_prompts=appended,
                                            deep_prompts=deep)
  return features / np.linalg.norm(features, axis=-1, keepdims=True)



@pytest.mark.parametrize("key", ["vpt", "vpt_cocoop"])
def test_vpt_samples_equal_a_python_loop_and_log_mean_exp(world, key):
  """Brute force: one text-tower call per sample (and image), the residual drawn from the same ε, the
  posterior (free, or BP_CLIP's amortised meta-net) computed in NumPy from the params."""
  config, clip_params = world["config"], world["params"]
  learner = make(world, key)
  state = learner.prepare_classes(clip_params, CLASSNAMES)
  params = learner.init(jax.random.key(0), clip_params, state)
  if "posterior" in params:  # the official init has μ = 0: move it so that a swapped (μ, ℓ) shows
    shape = params["posterior"]["mean"].shape
    params["posterior"]["mean"] = 0.3 * jax.random.normal(jax.random.key(8), shape)
  rng = jax.random.key(7)
  output = jit_apply(learner, params, clip_params, state, world["images"], rng, train=True)
  num_samples = learner.num_samples(True)
  chex.assert_shape(output.logits, (num_samples, 3, len(CLASSNAMES)))
  image = clip.normalize(clip.encode_image(clip_params, world["images"], config=config))
  mean, log_var = bp_clip_vpt_posterior(params, image, learner.conditioning)  # BP_CLIP's nets, not ours
  assert mean.shape == ((32,) if key == "vpt" else (3, 32))
  eps = np.asarray(jax.random.normal(rng, (num_samples, *mean.shape)))
  scale = np.exp(world["params"]["logit_scale"])
  text_features = jit_text_tower(config)
  expected = np.zeros(output.logits.shape)
  for s in range(num_samples):
    for b in range(3):
      r = (mean if mean.ndim == 1 else mean[b]) + np.exp(0.5 * (log_var if log_var.ndim == 1 else log_var[b])) * (
          eps[s] if eps.ndim == 2 else eps[s, b])
      embeddings = engine.build_prompts(state, params["ctx"] + r)
      expected[s, b] = scale * np.asarray(image[b] @ text_features(clip_params, embeddings, state.pool_index).T)
  chex.assert_trees_all_close(output.logits, expected, atol=1e-4)
  # Test rule: log-mean-exp over samples of the log-softmax.
  log_probs = expected - scipy.special.logsumexp(expected, axis=-1, keepdims=True)
  log_mean_exp = scipy.special.logsumexp(log_probs, axis=0) - np.log(num_samples)
  chex.assert_trees_all_close(learner.predict_probs(output), np.exp(log_mean_exp), atol=1e-5)
  # KL as the official code: mean over latent dims (and batch) of KL(N(μ, e^ℓ) ‖ N(0, 1)).
  sigma2 = np.exp(np.asarray(log_var))
  closed = np.mean(0.5 * (sigma2 + np.asarray(mean) ** 2 - 1.0 - np.log(sigma2)))
  chex.assert_trees_all_close(output.kl, closed, atol=1e-5)
  assert learner.kl_weight == 0.001


def test_gaussian_kl_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mean_q, mean_p = rng.normal(size=6), rng.normal(size=6)
  log_var_q, log_var_p = rng.normal(size=6) * 0.5, rng.normal(size=6) * 0.5
  kl = np.asarray(engine.gaussian_kl(mean_q, log_var_q, mean_p, log_var_p))
  sq, sp = np.exp(0.5 * log_var_q), np.exp(0.5 * log_var_p)
  textbook = np.log(sp / sq) + (sq**2 + (mean_q - mean_p) ** 2) / (2 * sp**2) - 0.5
  np.testing.assert_allclose(kl, textbook, atol=1e-6)
  z = mean_q + sq * rng.normal(size=(200_000, 6))
  log_ratio = -0.5 * ((z - mean_q) / sq) ** 2 - np.log(sq) + 0.5 * ((z - mean_p) / sp) ** 2 + np.log(sp)
  standard_error = log_ratio.std(0) / np.sqrt(len(z))
  assert np.all(np.abs(log_ratio.mean(0) - kl) < 5 * standard_error)


def test_vamp_kl_equals_closed_form_and_monte_carlo(world):
  config, clip_params = world["config"], world["params"]
  learner = make(world, "vamp")
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE, class_prototypes=world["prototypes"])
  params = learner.init(jax.random.key(0), clip_params, state)
  output = jit_apply(learner, params, clip_params, state, world["images"], jax.random.key(1), True, LABELS)
  frozen = clip.normalize(clip.encode_image(clip_params, world["images"], config=config))
  mean, log_var = vamp_posterior_numpy(params, frozen, learner.n_tokens)  # [H, B, M, W], NumPy
  prototypes = np.asarray(world["prototypes"])[LABELS]
  prior_mean, prior_log_var = vamp_prior_numpy(params, prototypes, learner.n_tokens)
  # The library's own networks, used by the last check below, equal these.
  for got, want in zip((*jax.jit(learner.posterior)(params, frozen),
                        *jax.jit(learner.prior)(params, world["prototypes"][LABELS])),
                       (mean, log_var, prior_mean, prior_log_var), strict=True):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  sq, sp = np.exp(0.5 * log_var), np.exp(0.5 * prior_log_var)
  closed = np.log(sp / sq) + (sq**2 + (mean - prior_mean) ** 2) / (2 * sp**2) - 0.5
  expected = closed.mean(axis=(2, 3)).sum(0).mean()
  chex.assert_trees_all_close(output.kl, expected, rtol=1e-4, atol=1e-5)
  # Monte Carlo estimate of the same reduction: E_q[log q(z) - log p(z | o_y)].
  z = mean + sq * np.random.default_rng(0).normal(size=(4000, *mean.shape))
  log_ratio = (-0.5 * ((z - mean) / sq) ** 2 - np.log(sq) + 0.5 * ((z - prior_mean) / sp) ** 2 + np.log(sp))
  estimates = log_ratio.mean(axis=(3, 4)).sum(1).mean(1)  # per draw
  assert abs(estimates.mean() - expected) < 5 * estimates.std() / np.sqrt(len(estimates))
  # At test time the prior is N(0, I).
  test_kl = (0.5 * (sq**2 + mean**2 - 1.0) - np.log(sq)).mean(axis=(2, 3)).sum(0).mean()
  chex.assert_trees_all_close(learner._kl(params, state, jnp.asarray(mean), jnp.asarray(log_var), False, None), test_kl,
                              rtol=1e-4, atol=1e-5)
  assert learner.kl_weight == 1.0


def test_vamp_samples_equal_a_python_loop_over_the_whole_text_tower(world, tmp_path):
  """The shared-prefix split and the vmap over samples against one full text-tower call per (sample, image);
  the vision side (shared prompts appended at layer J, replaced after) and the posterior nets in NumPy."""
  config, clip_params = world["config"], world["params"]
  learner = make(world, "vamp")
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE, class_prototypes=world["prototypes"])
  params = learner.init(jax.random.key(0), clip_params, state)
  params["vision_prompts"] = jax.random.normal(jax.random.key(4), params["vision_prompts"].shape)
  rng = jax.random.key(3)
  output = jit_apply(learner, params, clip_params, state, world["images"], rng, True, LABELS)  # as the KL test's
  num_samples = learner.num_samples(True)
  chex.assert_shape(output.logits, (num_samples, 3, len(CLASSNAMES)))
  frozen = clip.normalize(clip.encode_image(clip_params, world["images"], config=config))
  image = vamp_image_features_numpy(world, params, learner.first_layer, tmp_path)
  np.testing.assert_allclose(np.asarray(output.image_features), image, atol=2e-5)
  assert np.max(np.abs(image - np.asarray(frozen))) > 1e-2  # the vision prompts are live
  chex.assert_trees_all_close(output.frozen_image_features, frozen, atol=1e-6)
  mean, log_var = vamp_posterior_numpy(params, frozen, learner.n_tokens)
  eps = np.asarray(jax.random.normal(rng, (num_samples, *mean.shape)))
  ids = world["tokenizer"]([TEMPLATE.format(n) for n in CLASSNAMES])[:, :state.sequence_length]
  np.testing.assert_array_equal(state.token_ids, ids)  # VaMP's text input is the hand-crafted template
  scale = np.exp(clip_params["logit_scale"])
  text_features = jit_text_tower(config)  # z inserted after SOS at layer 1, replaced at layer 2
  for s in range(num_samples):
    for b in range(3):
      z = mean[:, b] + np.exp(0.5 * log_var[:, b]) * eps[s, :, b]  # [H, M, W]
      text = text_features(clip_params, state.token_embeddings, state.pool_index, jnp.asarray(z, jnp.float32))
      expected = scale * image[b] @ np.asarray(text, np.float64).T
      np.testing.assert_allclose(np.asarray(output.logits[s, b]), expected, atol=5e-4)
  unshared = make(world, "vamp", share_text_prefix=False)
  chex.assert_trees_all_close(jit_apply(unshared, params, clip_params, state, world["images"], rng, True, LABELS).logits,
                              output.logits, atol=1e-5)


# ------------------------------------------------------------------------------------------ all learners


def ce_loss(learner, params, clip_params, state, images, rng, labels):
  output = learner.apply(params, clip_params, state, images, rng, True, labels)
  log_probs = jax.nn.log_softmax(output.logits, axis=-1)
  nll = -jnp.mean(jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1))
  return nll + learner.kl_weight * output.kl, output


@pytest.mark.parametrize("key", sorted(LEARNERS))
def test_jitted_step_reaches_exactly_the_learner_params_and_transfers_to_new_classes(world, key):
  """One jitted value-and-grad step per learner: every learner leaf gets a gradient; new values do not
  retrace; the stepped params then apply to another class list (other C, other prompt lengths), where a
  class in both lists gets the same logits whatever the other classes are."""
  clip_params = world["params"]
  learner = make(world, key)
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE, class_prototypes=world["prototypes"])
  params = learner.init(jax.random.key(0), clip_params, state)
  labels = jnp.asarray(LABELS)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, images, rng):
    return jax.value_and_grad(lambda p: ce_loss(learner, p, clip_params, state, images, rng, labels),
                              has_aux=True)(params)

  (loss, output), grads = step(params, state, world["images"], jax.random.key(1))
  num_samples = learner.num_samples(True)
  chex.assert_shape(output.logits, (num_samples, 3, len(CLASSNAMES)))
  chex.assert_shape(output.kl, ())
  chex.assert_shape(output.image_features, (3, 64))
  chex.assert_tree_all_finite((loss, output, grads))
  chex.assert_trees_all_close(jnp.linalg.norm(output.image_features, axis=-1), jnp.ones(3), atol=1e-5)
  assert (output.frozen_image_features is None) == (learner.touches_image_tower and key != "vamp")
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(grad)).max() > 0, f"{key}: no gradient reaches {jax.tree_util.keystr(path)}"
  assert (learner.kl_weight > 0) == (key.startswith("vpt") or key == "vamp")
  chex.assert_trees_all_close(learner.predict_probs(output).sum(-1), jnp.ones(3), atol=1e-5)
  # New values, same shapes: no retrace (assert_max_traces).
  params = jax.tree.map(lambda p, g: p - 0.5 * g / (jnp.abs(g).max() + 1e-12), params, grads)
  images, rng = world["images"] + 0.1, jax.random.key(2)
  (_, trained), _ = step(params, state, images, rng)
  # Class names change after training: "cat" is class 2 of CLASSNAMES and class 1 of OTHER_CLASSNAMES.
  other = learner.prepare_classes(clip_params, OTHER_CLASSNAMES, class_prototypes=world["prototypes"][:3])
  transferred = jit_apply(learner, params, clip_params, other, images, rng, True, labels % 3)
  chex.assert_shape(transferred.logits, (num_samples, 3, len(OTHER_CLASSNAMES)))
  chex.assert_trees_all_close(transferred.logits[..., 1], trained.logits[..., 2], atol=1e-4)


# ------------------------------------------------------------------------------------------ bad input


def test_a_learner_owns_its_class_state(world, monkeypatch):
  """Per-class state of one learner lives in `ClassState.learner_state`, filled by its own
  `learner_class_state`: a learner written as one new file (here: CoOp plus a per-class logit bias) adds an
  array without touching the shared ClassState, and it flows through jit; other learners' states lack it."""
  from bayesprompt.prompts import base, coop

  @dataclasses.dataclass(frozen=True)
  class BiasedCoOp(coop.CoOp):
    method = "biased_coop_for_test"

    def learner_class_state(self, clip_params, classnames, **kwargs):
      state = super().learner_class_state(clip_params, classnames, **kwargs)
      return {**state, "class_bias": jnp.arange(len(classnames), dtype=jnp.float32)}

    def apply(self, learner_params, clip_params, class_state, images, rng=None, train=False, labels=None):
      output = super().apply(learner_params, clip_params, class_state, images, rng, train, labels)
      return output.replace(logits=output.logits + class_state.learner_state["class_bias"])

  monkeypatch.setitem(base._REGISTRY, BiasedCoOp.method, BiasedCoOp)
  config, clip_params, images = world["config"], world["params"], world["images"]
  learner = prompts.make_learner(BiasedCoOp.method, config, n_ctx=2)
  plain = prompts.make_learner("coop", config, n_ctx=2)
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE)
  plain_state = plain.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE)
  assert set(state.learner_state) == {"class_bias"} and plain_state.learner_state == {}
  params = plain.init(jax.random.key(0), clip_params, plain_state)
  biased = jax.jit(lambda s: learner.apply(params, clip_params, s, images).logits)(state)
  expected = plain.apply(params, clip_params, plain_state, images).logits + np.arange(len(CLASSNAMES))
  np.testing.assert_allclose(np.asarray(biased), np.asarray(expected), atol=1e-5)


def test_renamed_hyper_parameters_still_work_with_a_warning(world):
  """Every learner's old hparam keys (flagfiles, stored run configs) build the same learner as the new field,
  with a FutureWarning naming the new key; old and new together are refused."""
  config = world["config"]
  renamed = {(method, old, new) for method in prompts.methods()
             for old, new in prompts.learner_class(method).renamed_hparams.items()}
  assert {("mmrl", "alpha", "class_head_weight"), ("vamp_mmrl", "alpha", "class_head_weight"),
          ("vpt", "num_mc_samples", "num_train_samples")} <= renamed
  for method, old, new in sorted(renamed):
    value = {"class_head_weight": 0.4, "num_train_samples": 3}[new]
    with pytest.warns(FutureWarning, match=f"{method} hyper-parameter '{old}' is renamed '{new}'"):
      learner = prompts.make_learner(method, config, **{old: value})
    assert learner == prompts.make_learner(method, config, **{new: value})
    assert getattr(learner, new) == value
    with pytest.raises(TypeError, match=f"both '{old}' .* and '{new}'"):
      prompts.make_learner(method, config, **{old: value, new: value})


def test_bad_input_raises_clear_errors(world):
  config, clip_params = world["config"], world["params"]
  # The error lists the registry (derived, so a new learner file needs no edit here); the paper methods are in it.
  assert {"coop", "cocoop", "maple", "mpl", "vpt", "vamp", "apex", "mmrl", "vamp_mmrl"} <= set(prompts.methods())
  with pytest.raises(ValueError, match=re.escape(f"unknown prompt-learning method 'cop'; known methods: "
                                                 f"{', '.join(prompts.methods())}")):
    prompts.make_learner("cop", config)
  with pytest.raises(TypeError, match="unknown hyper-parameter.*'depht'"):
    prompts.make_learner("maple", config, depht=3)
  long_name = "big striped dog on grass " * 3
  with pytest.raises(ValueError, match=f"class '{long_name.strip()}'.*context length is 20"):
    prompts.make_learner("coop", config, n_ctx=4).prepare_classes(clip_params, ["cat", long_name])
  with pytest.raises(ValueError, match="class 'zebra'.*'zebra' .*not in the vocabulary"):
    prompts.make_learner("coop", config, n_ctx=4).prepare_classes(clip_params, ["cat", "zebra"])
  with pytest.raises(ValueError, match="prompt depth 4 exceeds the text tower's 3 layers"):
    prompts.make_learner("maple", config, depth=4)
  with pytest.raises(ValueError, match="prompt depth 5 exceeds the vision tower's 4 layers"):
    prompts.make_learner("maple", config.replace(text=dataclasses.replace(config.text, layers=6)), depth=5)
  with pytest.raises(ValueError, match="exceed the text tower's 3 layers"):
    prompts.make_learner("vamp", config, first_layer=2, depth=2)
  with pytest.raises(ValueError, match="n_rm=3 .* fewer than n_add\\*n_ctx \\+ 1 = 3"):
    prompts.make_learner("mpl", config, depth=2, n_add=2, n_rm=3)
  with pytest.raises(ValueError, match="n_rm=2 exceeds the n_ctx=1"):
    prompts.make_learner("mpl", config, depth=2, n_add=2, n_rm=2)
  with pytest.raises(ValueError, match="n_ctx=5 but the init phrase 'a photo of a' has only 4 tokens"):
    prompts.make_learner("coop", config, n_ctx=5, ctx_init="a photo of a")
  with pytest.raises(ValueError, match="class_token_position"):
    prompts.make_learner("coop", config, n_ctx=2, class_token_position="start")
  with pytest.raises(ValueError, match="classnames is empty"):
    prompts.make_learner("coop", config, n_ctx=2).prepare_classes(clip_params, [])
  vamp = make(world, "vamp")
  with pytest.raises(ValueError, match="class_prototypes must be \\[4, 64\\]"):
    vamp.prepare_classes(clip_params, CLASSNAMES, class_prototypes=np.zeros((3, 64)))
  state = vamp.prepare_classes(clip_params, CLASSNAMES)
  params = vamp.init(jax.random.key(0), clip_params, state)
  with pytest.raises(ValueError, match="class-aware prior needs labels .* and class prototypes"):
    vamp.apply(params, clip_params, state, world["images"], jax.random.key(0), True, LABELS)
  with pytest.raises(ValueError, match="pass a PRNG key as rng"):
    vamp.apply(params, clip_params, state, world["images"], None, False)
