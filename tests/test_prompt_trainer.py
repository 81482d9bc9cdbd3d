"""The jit train step's teacher logits and its guard against non-finite updates.

Oracles: the official PyTorch models' zero-shot logits stored with every backbone fixture
(`logits_per_image` = exp(s)·cos, + logit_bias for SigLIP), and the params/optimizer state before a step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bayesprompt.clip as clip
from bayesprompt.train import prompt_trainer

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

BACKBONES = ["openclip_vit_tiny", "openclip_vit_tiny_gelu", "hf_clip_tiny", "hf_siglip_tiny"]


@pytest.mark.parametrize("name", BACKBONES)
def test_teacher_logits_are_the_official_zero_shot_logits(fixtures_dir, name):
  """λ₁'s teacher must be the zero-shot logits the learners' own logits are compared with: for SigLIP that
  includes logit_bias (its absence shifted every teacher logit by the bias, −10 on real SigLIP)."""
  config, params = clip.load_checkpoint(fixtures_dir / name)
  io = np.load(fixtures_dir / f"{name}.io.npz")
  text = io["text_features"].astype(np.float64)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  images = jnp.asarray(io["images"].transpose(0, 2, 3, 1))
  computed = prompt_trainer.frozen_teacher_logits(params, config, jnp.asarray(text, jnp.float32), images, None)
  np.testing.assert_allclose(computed, io["logits_per_image"], atol=1e-4)
  # The learner's frozen image features, when it has them, give the same logits.
  image = io["image_features"] / np.linalg.norm(io["image_features"], axis=-1, keepdims=True)
  reused = prompt_trainer.frozen_teacher_logits(params, config, jnp.asarray(text, jnp.float32), images,
                                                jnp.asarray(image, jnp.float32))
  np.testing.assert_allclose(reused, io["logits_per_image"], atol=1e-4)
  if "logit_bias" in io.files:  # the bias is a real term here (not ~0), so leaving it out would fail above
    assert abs(float(io["logit_bias"])) > 1e-2


def test_a_non_finite_loss_never_reaches_the_params_or_the_optimizer(tmp_path_factory):
  from bayesprompt import prompts
  from bayesprompt.objectives import make_objective
  from tests.test_prompts_learners import CLASSNAMES, TEMPLATE, tiny_world

  world = tiny_world(tmp_path_factory)
  learner = prompts.make_learner("coop", world["config"], n_ctx=2)
  class_state = learner.prepare_classes(world["params"], CLASSNAMES, templates=[TEMPLATE])
  ce = make_objective("ce")

  def poisoned(output, labels, rng, teacher, **kwargs):  # CE plus a constant NaN on request (finite gradient)
    loss, metrics = ce(output, labels, rng, teacher, **kwargs)
    loss = loss + jnp.where(labels[0] == 0, jnp.nan, 0.0)
    return loss, dict(metrics, loss=loss)

  poisoned.needs_teacher = False
  optimizer = optax.adam(0.1)
  state = prompt_trainer.create_train_state(learner, optimizer, 0, world["params"], class_state)
  step = prompt_trainer.make_train_step(learner, poisoned, optimizer)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  bad_labels, good_labels = jnp.asarray([0, 1, 2], jnp.int32), jnp.asarray([1, 2, 3], jnp.int32)
  state, metrics = step(state, world["params"], class_state, world["images"], bad_labels, None)
  assert np.isnan(float(metrics["loss"])) and float(metrics["nonfinite_skipped"]) == 1.0
  assert int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state), before)
  state, metrics = step(state, world["params"], class_state, world["images"], good_labels, None)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite_skipped"]) == 0.0
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)), state.params, before[0]))
  assert np.all(np.isfinite(moved)) and np.max(moved) > 1e-3
