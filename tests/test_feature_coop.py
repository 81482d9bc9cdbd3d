"""CoOp on cached image features (bayesprompt.train.feature_coop) against the real learner and trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesprompt.data.sandbox import evaluate, model, tasks
from bayesprompt.objectives import make_objective
from bayesprompt.prompts.coop import CoOp
from bayesprompt.train import feature_coop, optim, prompt_trainer

CLASSES = [0, 5, 9, 13]  # four colour_shape classes
NAMES = [tasks.TASKS["colour_shape"].classnames[k] for k in CLASSES]


@pytest.fixture(scope="module")
def shipped():
  config, params = model.load()
  images, labels = evaluate.generate_in_memory("colour_shape", "test", count=4)
  keep = np.isin(labels, CLASSES)
  remap = {k: i for i, k in enumerate(CLASSES)}
  return config, params, images[keep], np.array([remap[int(v)] for v in labels[keep]], np.int32)


def test_logits_from_features_equal_apply_on_images(shipped):
  config, params, images, _ = shipped
  learner = CoOp(clip_config=config, n_ctx=4)
  state = learner.prepare_classes(params, NAMES)
  ctx = learner.init(jax.random.key(0), params, state)
  from_images = learner.apply(ctx, params, state, evaluate.normalize_images(jnp.asarray(images))).logits[0]
  features = evaluate.image_embeddings(params, images, config)
  from_features = learner.logits_from_features(ctx, params, state, jnp.asarray(features))
  assert np.all(np.isfinite(np.asarray(from_features)))
  np.testing.assert_allclose(np.asarray(from_features), np.asarray(from_images), atol=2e-4)


def test_fit_context_matches_the_prompt_trainer_step(shipped):
  """One full-batch step of fit_context = one step of prompt_trainer's CE train step on the same images (same
  init from the seed, same Dassl schedule and SGD)."""
  config, params, images, labels = shipped
  learner = CoOp(clip_config=config, n_ctx=4)
  features = evaluate.image_embeddings(params, images, config)
  n = len(labels)
  fitted = feature_coop.fit_context(
    learner, params, NAMES, features, labels, epochs=1, batch_size=n, lr=0.5, seed=7, warmup_epochs=0
  )
  tx = optim.make_optimizer("sgd", optim.dassl_cosine_schedule(0.5, 1, 1, warmup_epochs=0), weight_decay=5e-4)
  class_state = learner.prepare_classes(params, NAMES)
  state = prompt_trainer.create_train_state(learner, tx, 7, params, class_state)
  step = prompt_trainer.make_train_step(learner, make_objective("ce"), tx)
  teacher = jnp.zeros((len(NAMES), config.embed_dim))
  before = np.asarray(state.params["ctx"]).copy()  # the jitted step donates its input state
  after, _ = step(
    state, params, class_state, evaluate.normalize_images(jnp.asarray(images)), jnp.asarray(labels), teacher
  )
  moved = np.abs(np.asarray(after.params["ctx"]) - before).max()
  assert moved > 1e-4  # the step did something
  np.testing.assert_allclose(
    np.asarray(fitted["ctx"]), np.asarray(after.params["ctx"]), atol=1e-5 + 1e-3 * moved
  )


def test_fit_context_learns_and_views_are_drawn(shipped):
  config, params, images, labels = shipped
  learner = CoOp(clip_config=config, n_ctx=4)
  features = evaluate.image_embeddings(params, images, config)
  views = np.stack([features, evaluate.image_embeddings(params, images[:, :, ::-1], config)], axis=1)
  init = learner.init(jax.random.key(1), params, learner.prepare_classes(params, NAMES))
  before = feature_coop.accuracy(learner, init, params, NAMES, features, labels)
  ctx = feature_coop.fit_context(
    learner, params, NAMES, views, labels, epochs=60, batch_size=8, lr=2e-2, seed=1
  )
  after = feature_coop.accuracy(learner, ctx, params, NAMES, features, labels)
  assert after >= 0.875 and after > before, (before, after)  # 16 training images, 4 classes


def test_fit_context_rejects_bad_input(shipped):
  config, params, images, labels = shipped
  learner = CoOp(clip_config=config, n_ctx=4)
  features = np.zeros((len(labels), config.embed_dim), np.float32)
  with pytest.raises(ValueError, match="labels must lie"):
    feature_coop.fit_context(
      learner, params, NAMES[:2], features, labels, epochs=1, batch_size=4, lr=1e-3, seed=0
    )
  with pytest.raises(ValueError, match="batch_size"):
    feature_coop.fit_context(
      learner, params, NAMES, features, labels, epochs=1, batch_size=99, lr=1e-3, seed=0
    )
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    feature_coop.fit_context(
      learner, params, NAMES, features[:3], labels, epochs=1, batch_size=2, lr=1e-3, seed=0
    )
