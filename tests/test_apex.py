"""APEX (text adapter + vision prompts + test-time adaptive ensemble) against independent oracles.

Oracles: zero-shot CLIP (identity adapter and the phrase as context reproduce it exactly; without vision
prompts the whole model does), the vision tower's own intermediate tokens (insert / replace semantics),
brute-force NumPy loops over the ensemble formula (weights, mixed features, logits), the training-mode path
(the ensemble on the training classes is the pure adapted model), and class-list independence of a class's
text feature.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bayesprompt.clip as clip
import bayesprompt.prompts as prompts
from bayesprompt.objectives import make_objective
from bayesprompt.prompts import engine
from bayesprompt.prompts.apex import adaptive_ensemble_weights
from bayesprompt.train import prompt_trainer
from tests.test_prompts_learners import (
  CLASSNAMES,
  LABELS,
  OTHER_CLASSNAMES,
  TEMPLATE,
  tiny_world,
)

IMAGE_SIZE, PATCH = 16, 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2


# Tiny towers: XLA's optimisation passes cost far more than they save.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  world = tiny_world(tmp_path_factory)
  config = world["config"]
  world["learners"] = {"deep": prompts.make_learner("apex", config, vision_depth=2),
                       "zeroshot": prompts.make_learner("apex", config, vision_depth=2, unadapted_text="zeroshot"),
                       "text_only": prompts.make_learner("apex", config, vision_depth=0)}
  return world


_JITTED = {}


def jit_apply(learner, params, clip_params, state, images, train):
  if learner not in _JITTED:
    _JITTED[learner] = jax.jit(learner.apply, static_argnums=(5,))
  return _JITTED[learner](params, clip_params, state, images, None, train)


def perturbed_params(learner, world, seed=0):
  """Learner params away from init: every piece of the model matters (adapter no longer the identity)."""
  state = learner.prepare_classes(world["params"], CLASSNAMES, templates=TEMPLATE)
  params = learner.init(jax.random.key(seed), world["params"], state)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 8))
  noisy = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
  return noisy


def frozen_text(world, classnames):
  """Normalised frozen CLIP features of the template, one plain text-tower call [C, D] (float64)."""
  ids = world["tokenizer"]([TEMPLATE.format(n) for n in classnames])
  features = np.asarray(clip.encode_text(world["params"], ids, config=world["config"]), np.float64)
  return features / np.linalg.norm(features, axis=-1, keepdims=True)


def brute_force_alpha(test, train, beta=4.0, threshold=0.05):
  alpha = []
  for t in test:
    cosines = [float(t @ b / (np.linalg.norm(t) * np.linalg.norm(b))) for b in train]
    d_nn, d_avg = 1.0 - np.max(cosines), 1.0 - np.mean(cosines)  # NaN-propagating, unlike Python's max
    alpha.append(np.exp(-beta * d_avg * (1.0 if d_nn > threshold else 0.0)))
  return np.array(alpha)


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------ reductions


def test_init_reproduces_zero_shot_clip(world):
  """Identity adapter + the phrase "a photo of a" as context: the text side is zero-shot CLIP on the
  template exactly; without vision prompts the whole model is (both modes, any class list)."""
  config, clip_params = world["config"], world["params"]
  text_only = world["learners"]["text_only"]
  assert not text_only.touches_image_tower and world["learners"]["deep"].touches_image_tower
  state = text_only.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE)
  params = text_only.init(jax.random.key(0), clip_params, state)
  assert set(params) == {"ctx", "adapter"}
  np.testing.assert_array_equal(params["adapter"]["kernel"], np.eye(64))
  np.testing.assert_array_equal(params["adapter"]["bias"], np.zeros(64))
  image = unit(clip.encode_image(clip_params, world["images"], config=config))
  expected = np.exp(float(clip_params["logit_scale"])) * image @ frozen_text(world, CLASSNAMES).T
  for train in (True, False):
    output = jit_apply(text_only, params, clip_params, state, world["images"], train)
    chex.assert_shape(output.logits, (1, 3, len(CLASSNAMES)))
    chex.assert_trees_all_close(output.logits[0], expected, atol=1e-4)
    chex.assert_trees_all_close(output.frozen_image_features, image, atol=1e-5)
  # With vision prompts the text side is unchanged: adapted text features at init = zero-shot CLIP's.
  deep = world["learners"]["deep"]
  deep_params = deep.init(jax.random.key(0), clip_params, state)
  chex.assert_shape(deep_params["vision_prompts"], (2, 2, 32))
  text = jax.jit(lambda p: clip.normalize(deep.adapt(p, deep.prompted_text_features(p, clip_params, state))))(
      deep_params)
  chex.assert_trees_all_close(text, frozen_text(world, CLASSNAMES), atol=1e-5)


def test_vision_prompts_are_inserted_then_replace_the_previous_outputs(world):
  config, clip_params = world["config"], world["params"]
  learner = world["learners"]["deep"]  # depth 2 of 4 vision layers, 2 tokens
  prompts_ = perturbed_params(learner, world)["vision_prompts"]
  out = jax.jit(lambda p, x, vp: clip.image_tower(p, x, config=config, edits=learner.vision_edits(
      {"vision_prompts": vp}), collect_intermediates=True)[1])(clip_params, world["images"], prompts_)
  inputs = out["layer_inputs"]
  assert [x.shape[1] for x in inputs] == [1 + NUM_PATCHES + 2] * 4  # appended once, never grows
  # Layer 0 sees ln_pre of the appended prompts (appended before ln_pre, as the official IVLP code).
  ln = clip_params["visual"]["ln_pre"]
  p0 = np.asarray(prompts_[0], np.float64)
  normed = (p0 - p0.mean(-1, keepdims=True)) / np.sqrt(p0.var(-1, keepdims=True) + config.vision.ln_eps)
  layer_norm = normed * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
  chex.assert_trees_all_close(inputs[0][:, -2:], np.broadcast_to(layer_norm, (3, 2, 32)), atol=1e-4)
  # Layer 1 replaces the previous prompt outputs with its own prompts; layers 2, 3 carry the outputs.
  np.testing.assert_array_equal(inputs[1][:, -2:], np.broadcast_to(prompts_[1], (3, 2, 32)))
  assert np.abs(np.asarray(inputs[2][:, -2:]) - np.asarray(prompts_[1])).max() > 1e-2


# ------------------------------------------------------------------------------------------ the ensemble


def test_ensemble_weights_match_the_formula_including_the_threshold():
  rng = np.random.default_rng(0)
  train = unit(rng.normal(size=(5, 64)))

  def at_distance(base, distance):
    """A unit vector at cosine distance `distance` from `base` (rotated towards a random orthogonal one)."""
    other = rng.normal(size=64)
    other = unit(other - (other @ base) * base)
    return (1.0 - distance) * base + np.sqrt(1.0 - (1.0 - distance) ** 2) * other

  test = np.stack([train[1],                    # a training class: d_nn = 0
                   at_distance(train[2], 0.02),  # within the threshold: α = 1 although d_avg ≈ 1
                   at_distance(train[3], 0.08),  # just beyond it
                   unit(rng.normal(size=64))])   # far from all
  expected = brute_force_alpha(test, train)
  test32, train32 = jnp.asarray(test, jnp.float32), jnp.asarray(train, jnp.float32)
  alpha = np.asarray(adaptive_ensemble_weights(test32, train32))
  np.testing.assert_allclose(alpha, expected, atol=1e-5)
  assert alpha[0] == 1.0 and alpha[1] == 1.0  # exactly: the indicator zeroes the exponent
  assert 1.0 - np.mean(test[1] @ train.T) > 0.5  # ... where exp(-4 d_avg) would be < 0.15
  assert 0.0 < alpha[2] < 0.2 and 0.0 < alpha[3] < 0.05
  # Other β and τ: with τ = 0.1 the third class counts as a training class.
  loose = np.asarray(adaptive_ensemble_weights(test32, train32, beta=1.0, threshold=0.1))
  np.testing.assert_allclose(loose, brute_force_alpha(test, train, beta=1.0, threshold=0.1), atol=1e-5)
  assert loose[2] == 1.0


@pytest.mark.parametrize("mode", ["prompted", "zeroshot"])
def test_test_time_logits_equal_a_brute_force_ensemble(world, mode):
  """New classes: α from the formula, text = α·adapted + (1−α)·unadapted, image = ᾱ·prompted + (1−ᾱ)·frozen,
  rebuilt in NumPy from separate tower calls."""
  config, clip_params = world["config"], world["params"]
  learner = world["learners"]["deep" if mode == "prompted" else "zeroshot"]
  params = perturbed_params(learner, world)
  state = learner.prepare_classes(clip_params, OTHER_CLASSNAMES, templates=TEMPLATE,
                                  train_classnames=CLASSNAMES)
  output = jit_apply(learner, params, clip_params, state, world["images"], False)
  zero_shot_new = frozen_text(world, OTHER_CLASSNAMES)
  alpha = brute_force_alpha(zero_shot_new, frozen_text(world, CLASSNAMES))
  # The random CLIP gives all three cases: far (α < 1), shared "cat" (α = 1), near but not shared (α = 1).
  assert alpha[0] < 0.9 and alpha[1] == 1.0 and alpha[2] == 1.0
  chex.assert_trees_all_close(learner.ensemble_weights(state), alpha, atol=1e-5)
  np.testing.assert_array_equal(state.learner_state["is_train_class"], [False, True, False])

  embeddings = engine.build_prompts(state, params["ctx"])
  text_tower = jax.jit(lambda p, e, i: clip.text_tower_from_embeddings(p, e, i, config=config)[0])
  prompted_text = np.asarray(text_tower(clip_params, embeddings, state.pool_index), np.float64)
  kernel, bias = (np.asarray(params["adapter"][k], np.float64) for k in ("kernel", "bias"))
  adapted = prompted_text @ kernel + bias
  a = alpha[:, None]
  if mode == "prompted":
    text = unit(a * adapted + (1 - a) * prompted_text)
  else:
    text = unit(a * unit(adapted) + (1 - a) * zero_shot_new)
  prompted_image = np.asarray(jax.jit(lambda p, x, lp: clip.image_tower(p, x, config=config,
                                                                          edits=learner.vision_edits(lp))[0])(
      clip_params, world["images"], params), np.float64)
  frozen_image = np.asarray(clip.encode_image(clip_params, world["images"], config=config), np.float64)
  image = unit(alpha.mean() * prompted_image + (1 - alpha.mean()) * frozen_image)
  expected = np.exp(float(clip_params["logit_scale"])) * image @ text.T
  chex.assert_trees_all_close(output.logits[0], expected, atol=1e-4)
  chex.assert_trees_all_close(output.image_features, image, atol=1e-5)
  chex.assert_trees_all_close(output.frozen_image_features, unit(frozen_image), atol=1e-5)


def test_training_classes_get_alpha_one_the_pure_adapted_model(world):
  clip_params = world["params"]
  learner = world["learners"]["deep"]
  params = perturbed_params(learner, world)
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE, train_classnames=CLASSNAMES)
  np.testing.assert_array_equal(learner.ensemble_weights(state), np.ones(len(CLASSNAMES)))
  trained = jit_apply(learner, params, clip_params, state, world["images"], True)
  tested = jit_apply(learner, params, clip_params, state, world["images"], False)
  assert trained.frozen_image_features is None and tested.frozen_image_features is not None
  chex.assert_trees_all_close(tested.logits, trained.logits, atol=1e-6)
  # The training path against NumPy: normalised (t·W + b) and the prompted image.
  text = np.asarray(jax.jit(lambda p: learner.prompted_text_features(p, clip_params, state))(params))
  kernel, bias = (np.asarray(params["adapter"][k], np.float64) for k in ("kernel", "bias"))
  text = unit(text.astype(np.float64) @ kernel + bias)
  image = np.asarray(trained.image_features, np.float64)
  chex.assert_trees_all_close(trained.logits[0], np.exp(float(clip_params["logit_scale"])) * image @ text.T,
                              atol=1e-4)


def test_params_transfer_to_other_class_lists(world):
  """Class names change after training: a shared class (α = 1) keeps its adapted text feature whatever the
  other classes are; with no training classes given, the class list is its own training list (α ≡ 1)."""
  clip_params = world["params"]
  learner = world["learners"]["deep"]
  params = perturbed_params(learner, world)
  train_state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE)
  adapted = jax.jit(lambda p: clip.normalize(
      learner.adapt(p, learner.prompted_text_features(p, clip_params, train_state))))(params)
  other = learner.prepare_classes(clip_params, OTHER_CLASSNAMES, templates=TEMPLATE,
                                  train_classnames=CLASSNAMES)
  output = jit_apply(learner, params, clip_params, other, world["images"], False)
  chex.assert_shape(output.logits, (1, 3, len(OTHER_CLASSNAMES)))
  scale = np.exp(float(clip_params["logit_scale"]))
  # "cat" is class 2 of CLASSNAMES and class 1 of OTHER_CLASSNAMES.
  chex.assert_trees_all_close(output.logits[0, :, 1], scale * output.image_features @ adapted[2], atol=1e-4)
  own = learner.prepare_classes(clip_params, OTHER_CLASSNAMES, templates=TEMPLATE)
  np.testing.assert_array_equal(learner.ensemble_weights(own), np.ones(3))
  tested = jit_apply(learner, params, clip_params, own, world["images"], False)
  trained = jit_apply(learner, params, clip_params, own, world["images"], True)
  chex.assert_trees_all_close(tested.logits, trained.logits, atol=1e-6)


# ------------------------------------------------------------------------------------------ training


def test_gradients_reach_exactly_the_learner_params(world):
  clip_params = world["params"]
  learner = world["learners"]["deep"]
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE)
  params = learner.init(jax.random.key(0), clip_params, state)
  labels = jnp.asarray(LABELS)

  def loss(p):
    logits = learner.apply(p, clip_params, state, world["images"], None, True).logits[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

  grads = jax.jit(jax.grad(loss))(params)
  assert set(params) == {"ctx", "adapter", "vision_prompts"}
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(grad)) and np.abs(np.asarray(grad)).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("objective", ["ce", "ove_pg"])
def test_one_jitted_train_step_with_each_objective(world, objective):
  clip_params = world["params"]
  learner = world["learners"]["deep"]
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE, train_classnames=CLASSNAMES)
  optimizer = optax.sgd(1e-2)
  train_state = prompt_trainer.create_train_state(learner, optimizer, 0, clip_params, state)
  before = jax.tree.map(np.asarray, train_state.params)
  step = prompt_trainer.make_train_step(learner, make_objective(objective), optimizer)
  labels = jnp.asarray(LABELS, jnp.int32)
  teacher_text = state.zeroshot_text_features
  train_state, metrics = step(train_state, clip_params, state, world["images"], labels, teacher_text)
  assert int(train_state.step) == 1
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  after = jax.tree.leaves(train_state.params)
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), after, strict=True):
    assert np.abs(np.asarray(new) - old).max() > 0, f"{objective}: {jax.tree_util.keystr(path)} did not move"


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors(world):
  config, clip_params = world["config"], world["params"]
  for depth in (5, -1, 1.5):
    with pytest.raises(ValueError, match="vision_depth must be an int in \\[0, 4\\]"):
      prompts.make_learner("apex", config, vision_depth=depth)
  with pytest.raises(ValueError, match="n_vision_ctx must be an int >= 1, got 0"):
    prompts.make_learner("apex", config, n_vision_ctx=0)
  for name, value in (("beta", -1.0), ("beta", float("nan")), ("distance_threshold", "0.05")):
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
      prompts.make_learner("apex", config, **{name: value})
  with pytest.raises(ValueError, match="unknown unadapted_text 'frozen'.*'prompted', 'zeroshot'"):
    prompts.make_learner("apex", config, unadapted_text="frozen")
  with pytest.raises(ValueError, match="n_ctx=5 but the init phrase 'a photo of a' has only 4 tokens"):
    prompts.make_learner("apex", config, n_ctx=5)
  with pytest.raises(TypeError, match="unknown hyper-parameter.*'depth'.*'vision_depth'"):
    prompts.make_learner("apex", config, depth=1)
  learner = world["learners"]["deep"]
  with pytest.raises(ValueError, match="train_classnames needs templates"):
    learner.prepare_classes(clip_params, CLASSNAMES)
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE)
  params = learner.init(jax.random.key(0), clip_params, state)
  with pytest.raises(ValueError, match="test-time ensemble needs .*train_classnames"):
    learner.apply(params, clip_params, state.replace(learner_state={}), world["images"], None, False)
