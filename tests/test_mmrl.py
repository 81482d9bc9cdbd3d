"""MMRL and VaMP-on-MMRL, checked against independent oracles on the tiny random CLIP of the learner tests.

Oracles: a block-by-block re-implementation of the official forward pass (explicit concatenation of the
representation tokens after CLS / SOS, a causal mask rebuilt for the grown text sequence, the EOT index + K,
ln_post per representation token then the mean) that also gives every tower's per-layer inputs; the loss
formula by hand in NumPy (and OVE-PG's pure loss per head); exact zeros of the gradient where a head or a
regulariser cannot depend on a parameter; VaMP-on-MMRL against MMRL itself (collapsed posterior) and a
Python loop over Monte Carlo samples and images; the closed-form Gaussian KL.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

import bayesprompt.clip as clip
import bayesprompt.prompts as prompts
from bayesprompt.bayes import ove
from bayesprompt.clip.layers import ResidualBlock
from bayesprompt.objectives import make_objective
from bayesprompt.prompts import LearnerOutput
from bayesprompt.train import prompt_trainer
from tests import test_prompts_learners as learner_tests
from tests.test_prompts_learners import CLASSNAMES, LABELS, TEMPLATE, jit_text_tower

# The learner tests' tiny random CLIP (3 text / 4 vision layers) and their fast-compile setting.
world = learner_tests.world
pytestmark = pytest.mark.usefixtures("fast_compiles")

# K representation tokens; prompted blocks FIRST..FIRST+DEPTH-1 of the 3-layer text / 4-layer vision towers.
K, FIRST, DEPTH = 2, 1, 2
HPARAMS = dict(n_tokens=K, first_layer=FIRST, depth=DEPTH, class_head_weight=0.7, reg_weight=0.6)
VAMP_HPARAMS = dict(HPARAMS, num_train_samples=2, num_test_samples=3)
_JITTED = {}


def jit_apply(learner, params, clip_params, state, images, rng, train, labels=None):
  """learner.apply under jit, one compiled function per learner."""
  if learner not in _JITTED:
    _JITTED[learner] = jax.jit(learner.apply, static_argnums=(5,))
  return _JITTED[learner](params, clip_params, state, images, rng, train, labels)


def layer_norm(params, x, eps=1e-5):
  x = np.asarray(x, np.float64)
  centred = x - x.mean(-1, keepdims=True)
  scaled = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)
  return scaled * np.asarray(params["scale"]) + np.asarray(params["bias"])


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_forward(config, clip_params, learner_params, state, images):
  """MMRL's forward pass written as the official code does it, block by block (float64 glue, blocks float32).

  Returns per-layer block inputs of both towers, R_t / R_v, the text features [C, D], the class-head and
  representation-head image features [B, D] (all normalised).
  """
  block_fns = {}

  def block(tower, params, layer, x, causal):
    key = (tower.width, x.shape, causal)
    if key not in block_fns:
      module = ResidualBlock(heads=tower.heads, mlp_dim=tower.mlp_dim, act=tower.act, ln_eps=tower.ln_eps)
      block_fns[key] = jax.jit(module.apply)
    mask = np.tril(np.ones((x.shape[1], x.shape[1]), bool)) if causal else None
    layer_params = jax.tree.map(lambda p: p[layer], params["blocks"])
    return np.asarray(block_fns[key]({"params": layer_params}, jnp.asarray(x, jnp.float32), mask), np.float64)

  space = np.asarray(learner_params["rep_tokens"], np.float64)  # [K, d_r]
  rep_text = np.stack([space @ np.asarray(learner_params["to_text"]["kernel"][h])
                       + np.asarray(learner_params["to_text"]["bias"][h]) for h in range(DEPTH)])
  rep_vision = np.stack([space @ np.asarray(learner_params["to_vision"]["kernel"][h])
                         + np.asarray(learner_params["to_vision"]["bias"][h]) for h in range(DEPTH)])

  def run(tower, params, x, rep, causal):
    inputs = []
    for layer in range(tower.layers):
      h = layer - FIRST
      if 0 <= h < DEPTH:
        tokens = np.broadcast_to(rep[h], (x.shape[0], K, x.shape[2]))
        # Insert after the first token (SOS / CLS) at J; later, replace the previous layer's outputs there.
        x = np.concatenate([x[:, :1], tokens, x[:, 1 if h == 0 else 1 + K:]], axis=1)
      inputs.append(x)
      x = block(tower, params, layer, x, causal)
    return x, inputs

  # Text: token embeddings + positions, the representation tokens, EOT pooled at its shifted index.
  text_params = clip_params["text"]
  length = state.sequence_length
  x = np.asarray(state.token_embeddings, np.float64) + np.asarray(text_params["positional_embedding"][:length])
  x, text_inputs = run(config.text, text_params, x, rep_text, causal=True)
  pooled = layer_norm(text_params["ln_final"], x)[np.arange(x.shape[0]), np.asarray(state.pool_index) + K]
  text = normalize(pooled @ np.asarray(text_params["proj"]["kernel"]))

  # Vision: patch embedding as a strided convolution, CLS, positions, ln_pre.
  v, vis = config.vision, clip_params["visual"]
  batch, grid = images.shape[0], v.image_size // v.patch_size
  patches = np.asarray(images, np.float64).reshape(batch, grid, v.patch_size, grid, v.patch_size, 3)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, -1)
  x = patches @ np.asarray(vis["conv1"]["kernel"]).reshape(-1, v.width)
  x = np.concatenate([np.broadcast_to(np.asarray(vis["class_embedding"]), (batch, 1, v.width)), x], axis=1)
  x = layer_norm(vis["ln_pre"], x + np.asarray(vis["positional_embedding"]))
  x, vision_inputs = run(v, vis, x, rep_vision, causal=False)
  image = normalize(layer_norm(vis["ln_post"], x[:, 0]) @ np.asarray(vis["proj"]["kernel"]))
  rep_pooled = layer_norm(vis["ln_post"], x[:, 1:1 + K]).mean(axis=1)  # ln_post per token, then the mean
  rep_image = normalize(rep_pooled @ np.asarray(learner_params["rep_proj"]["kernel"]))
  return dict(text_inputs=text_inputs, vision_inputs=vision_inputs, rep_text=rep_text, rep_vision=rep_vision,
              text=text, image=image, rep_image=rep_image)


def cross_entropy(logits, labels):
  log_probs = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  return -np.mean(log_probs[np.arange(len(labels)), labels])


@pytest.fixture(scope="module")
def case(world):
  """One MMRL instance with perturbed params (the trainable projection moved off its frozen init), its class
  state, the jitted train output and the reference forward pass."""
  config, clip_params = world["config"], world["params"]
  learner = prompts.make_learner("mmrl", config, **HPARAMS)
  state = learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE,
                                  class_prototypes=world["prototypes"])
  params = learner.init(jax.random.key(0), clip_params, state)
  np.testing.assert_array_equal(params["rep_proj"]["kernel"], clip_params["visual"]["proj"]["kernel"])
  keys = iter(jax.random.split(jax.random.key(1), 4))
  for leaf, scale in ((("rep_tokens",), 1.0), (("rep_proj", "kernel"), 0.1), (("to_text", "kernel"), 0.2),
                      (("to_vision", "kernel"), 0.2)):
    holder = params if len(leaf) == 1 else params[leaf[0]]
    holder[leaf[-1]] = holder[leaf[-1]] + scale * jax.random.normal(next(keys), holder[leaf[-1]].shape)
  output = jit_apply(learner, params, clip_params, state, world["images"], None, True, jnp.asarray(LABELS))
  reference = reference_forward(config, clip_params, params, state, world["images"])
  frozen_image = normalize(clip.encode_image(clip_params, world["images"], config=config))
  template_ids = world["tokenizer"]([TEMPLATE.format(n) for n in CLASSNAMES])
  zeroshot_text = normalize(clip.encode_text(clip_params, template_ids, config=config))
  return dict(learner=learner, state=state, params=params, output=output, reference=reference,
              frozen_image=frozen_image, zeroshot_text=zeroshot_text,
              scale=float(np.exp(clip_params["logit_scale"])))


# ------------------------------------------------------------------------------------------ MMRL


def test_defaults_are_the_recipe_scaled_to_the_tower(world):
  b16 = prompts.make_learner("mmrl", clip.get_config("vit_b16"))
  assert list(b16.prompted_layers) == list(range(5, 12))  # 1-based layers 6..12
  assert (b16.n_tokens, b16.rep_dim, b16.class_head_weight, b16.reg_weight) == (5, 512, 0.7, 1.0)
  assert b16.rep_proj_init == "frozen"
  four_layers = dict(width=128, layers=4, heads=2, mlp_dim=512)  # the sandbox model's shape
  sandbox = prompts.make_learner("mmrl", clip.CLIPConfig(
      vision=clip.VisionConfig(image_size=32, patch_size=8, **four_layers),
      text=clip.TextConfig(vocab_size=92, context_length=32, **four_layers), embed_dim=128))
  assert (list(sandbox.prompted_layers), sandbox.rep_dim) == ([1, 2, 3], 128)
  vamp_mmrl = prompts.make_learner("vamp_mmrl", clip.get_config("vit_b16"))
  assert list(vamp_mmrl.prompted_layers) == list(range(5, 12))
  assert (vamp_mmrl.num_samples(False), vamp_mmrl.kl_weight) == (10, 1.0)
  assert vamp_mmrl.needs_class_prototypes
  assert b16.needs_train_classes and vamp_mmrl.needs_train_classes and b16.touches_image_tower


def test_forward_equals_the_block_by_block_reference(world, case):
  """Both heads' logits and the text / image features against the official-style forward pass."""
  output, ref, scale = case["output"], case["reference"], case["scale"]
  chex.assert_shape((output.logits, output.aux_logits), (1, 3, len(CLASSNAMES)))
  chex.assert_trees_all_close(output.logits[0], scale * ref["image"] @ ref["text"].T, atol=2e-4)
  chex.assert_trees_all_close(output.aux_logits[0], scale * ref["rep_image"] @ ref["text"].T, atol=2e-4)
  chex.assert_trees_all_close(output.image_features, ref["image"], atol=1e-5)
  chex.assert_trees_all_close(output.frozen_image_features, case["frozen_image"], atol=1e-5)
  assert output.aux_weight == pytest.approx(0.3) and float(output.kl) == 0.0
  # The two heads really differ (the representation head is a second classifier).
  assert np.abs(np.asarray(output.logits) - np.asarray(output.aux_logits)).max() > 1e-2


def test_schedule_inside_the_towers_and_the_eot_shift(world, case):
  """Per-layer block inputs (collect_intermediates) against the reference: untouched below J, R inserted after
  SOS / CLS at J, replaced (the rest carried) above; the text EOT index moves by K."""
  config, clip_params = world["config"], world["params"]
  learner, params, state, ref = case["learner"], case["params"], case["state"], case["reference"]
  _, text_out = jax.jit(lambda p, lp: clip.text_tower_from_embeddings(
      p, state.token_embeddings, state.pool_index, config=config, edits=learner.text_edits(lp),
      collect_intermediates=True))(clip_params, params)
  _, vision_out = jax.jit(lambda p, lp: clip.image_tower(
      p, world["images"], config=config, edits=learner.vision_edits(lp), collect_intermediates=True))(
      clip_params, params)
  length, tokens = state.sequence_length, 1 + (config.vision.image_size // config.vision.patch_size) ** 2
  for name, out, expected, base in (("text", text_out, ref["text_inputs"], length),
                                    ("vision", vision_out, ref["vision_inputs"], tokens)):
    inputs = out["layer_inputs"]
    lengths = [base + (K if layer >= FIRST else 0) for layer in range(len(inputs))]
    assert [x.shape[1] for x in inputs] == lengths, name
    for layer, (x, x_ref) in enumerate(zip(inputs, expected, strict=True)):
      chex.assert_trees_all_close(x, x_ref, atol=2e-4, custom_message=f"{name} layer {layer}")
    rep = ref["rep_text" if name == "text" else "rep_vision"]
    for h in range(DEPTH):
      slots = inputs[FIRST + h][:, 1:1 + K]
      np.testing.assert_allclose(slots, np.broadcast_to(rep[h], slots.shape), atol=1e-5)
  np.testing.assert_array_equal(text_out["pool_index"], np.asarray(state.pool_index) + K)
  np.testing.assert_array_equal(vision_out["pool_index"], np.zeros(3))  # CLS stays first


def test_decoupled_inference_fuses_training_classes_only(world, case):
  """Test logits column by column: α·class + (1 − α)·rep where `is_train_class`, the class head elsewhere."""
  learner, params, clip_params, output = case["learner"], case["params"], world["params"], case["output"]
  # prepare_classes marks the training classes of a list (default: all of them).
  state = learner.prepare_classes(clip_params, ["cat", "green star", "red circle"], templates=TEMPLATE,
                                  train_classnames=CLASSNAMES)
  np.testing.assert_array_equal(state.learner_state["is_train_class"], [True, False, True])
  np.testing.assert_array_equal(case["state"].learner_state["is_train_class"], [True] * 4)
  # The rule, on the training list with two of its classes marked as new ones.
  marked = np.array([True, False, True, False])
  marked_state = case["state"].replace(learner_state={**case["state"].learner_state,
                                                     "is_train_class": jnp.asarray(marked)})
  test = jit_apply(learner, params, clip_params, marked_state, world["images"], None, False)
  alpha = learner.class_head_weight
  fused = alpha * np.asarray(output.logits) + (1 - alpha) * np.asarray(output.aux_logits)
  expected = np.where(marked, fused, np.asarray(output.logits))
  chex.assert_trees_all_close(test.logits, expected, atol=1e-5)
  probs = scipy.special.softmax(expected[0], axis=-1)
  chex.assert_trees_all_close(learner.predict_probs(test), probs, atol=1e-5)
  chex.assert_trees_all_close(test.aux_logits, output.aux_logits, atol=1e-6)
  assert test.aux_loss is None and test.frozen_image_features is None  # no regulariser work at test time
  np.testing.assert_allclose(learner.decoupled_logits(output.logits, output.aux_logits, None), fused, atol=1e-6)


def test_loss_equals_the_formula_with_ce_and_ove_pg(world, case):
  output, ref, learner, scale = case["output"], case["reference"], case["learner"], case["scale"]
  labels = np.asarray(LABELS)
  alpha, lam = learner.class_head_weight, learner.reg_weight
  class_logits, rep_logits = scale * ref["image"] @ ref["text"].T, scale * ref["rep_image"] @ ref["text"].T
  regulariser = lam * (1 - np.mean(np.sum(ref["image"] * case["frozen_image"], -1))) + lam * (
      1 - np.mean(np.sum(ref["text"] * case["zeroshot_text"], -1)))
  chex.assert_trees_all_close(output.aux_loss, regulariser, atol=1e-5)
  expected = (alpha * cross_entropy(class_logits, labels) + (1 - alpha) * cross_entropy(rep_logits, labels)
              + regulariser)
  loss, metrics = make_objective("ce")(output, jnp.asarray(labels))
  chex.assert_trees_all_close(loss, expected, atol=1e-4)
  assert {"nll_main", "nll_aux", "aux_loss"} <= set(metrics)
  # OVE-PG: its pure loss on each head (the second head with keys from fold_in(rng, 1)), weighted the same.
  teacher = jnp.asarray(scale * case["frozen_image"] @ case["zeroshot_text"].T, jnp.float32)
  rng = jax.random.key(5)
  loss, metrics = jax.jit(make_objective("ove_pg"))(output, jnp.asarray(labels), rng, teacher)
  pure_loss = jax.jit(lambda key, logits: ove.ove_pg_loss(key, logits, teacher, jnp.asarray(labels))[0])
  heads = [pure_loss(jax.random.split(key, 1)[0], jnp.asarray(logits, jnp.float32))
           for key, logits in ((rng, class_logits), (jax.random.fold_in(rng, 1), rep_logits))]
  chex.assert_trees_all_close(loss, alpha * heads[0] + (1 - alpha) * heads[1] + regulariser, atol=1e-4)
  assert {"ove_pg_main", "ove_pg_aux", "aux_loss"} <= set(metrics)
  # Padded rows (label -1) leave the image regulariser's mean.
  padded = jit_apply(learner, case["params"], world["params"], case["state"], world["images"], None, True,
                     jnp.asarray([0, 2, -1]))
  image_term = lam * (1 - np.mean(np.sum(ref["image"][:2] * case["frozen_image"][:2], -1)))
  text_term = lam * (1 - np.mean(np.sum(ref["text"] * case["zeroshot_text"], -1)))
  chex.assert_trees_all_close(padded.aux_loss, image_term + text_term, atol=1e-5)


def test_gradients_reach_every_learner_param_and_route_by_head(world, case):
  """d(loss) reaches every learner leaf; a head or regulariser that cannot depend on a parameter gets an
  exact zero: the class head never sees `rep_proj`, the image regulariser never sees the text aligners,
  the text regulariser never sees the vision aligners or `rep_proj`."""
  learner, state, clip_params, images = case["learner"], case["state"], world["params"], world["images"]
  labels = jnp.asarray(LABELS)
  objective = make_objective("ce")

  @jax.jit
  def pieces_grads(params):
    def pieces(params):
      output = learner.apply(params, clip_params, state, images, None, True, labels)
      log_probs = jax.nn.log_softmax(output.logits[0])
      image_reg = 1 - jnp.mean(jnp.sum(output.image_features * output.frozen_image_features, -1))
      return {"loss": objective(output, labels)[0],
              "class_ce": -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1)),
              "image_reg": image_reg,
              "text_reg": output.aux_loss / learner.reg_weight - image_reg}  # aux_loss = λ(image + text)
    return jax.jacrev(pieces)(params)

  grads = pieces_grads(case["params"])

  def reaches(piece):
    return {jax.tree_util.keystr(path): bool(np.abs(np.asarray(g)).max() > 0)
            for path, g in jax.tree_util.tree_leaves_with_path(grads[piece])}

  assert all(reaches("loss").values()), reaches("loss")
  assert reaches("class_ce") == {"['rep_proj']['kernel']": False, "['rep_tokens']": True,
                                 "['to_text']['bias']": True, "['to_text']['kernel']": True,
                                 "['to_vision']['bias']": True, "['to_vision']['kernel']": True}
  assert reaches("image_reg") == {"['rep_proj']['kernel']": False, "['rep_tokens']": True,
                                  "['to_text']['bias']": False, "['to_text']['kernel']": False,
                                  "['to_vision']['bias']": True, "['to_vision']['kernel']": True}
  assert reaches("text_reg") == {"['rep_proj']['kernel']": False, "['rep_tokens']": True,
                                 "['to_text']['bias']": True, "['to_text']['kernel']": True,
                                 "['to_vision']['bias']": False, "['to_vision']['kernel']": False}


def one_train_step(learner, objective, clip_params, state, images):
  """The trainer's jitted step (donated state, OVE-PG's teacher from the learner's frozen features); checks
  that it moves every learner param. Returns the metrics."""
  optimizer = optax.adamw(1e-2)
  train_state = prompt_trainer.create_train_state(learner, optimizer, 0, clip_params, state)
  before = jax.tree.map(np.asarray, train_state.params)
  step = prompt_trainer.make_train_step(learner, make_objective(objective), optimizer)
  train_state, metrics = step(train_state, clip_params, state, images, jnp.asarray(LABELS),
                              state.zeroshot_text_features)
  chex.assert_tree_all_finite(metrics)
  assert float(metrics["aux_loss"]) > 0 and int(train_state.step) == 1
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(train_state.params),
                              strict=True):
    assert np.abs(np.asarray(new) - old).max() > 0, f"{learner.method}: {jax.tree_util.keystr(path)} stays"
  return metrics


def test_jitted_train_step_with_ove_pg(world, case):
  """(CE under jit and grad: the gradient test above; VaMP-on-MMRL's step below uses CE.)"""
  metrics = one_train_step(case["learner"], "ove_pg", world["params"], case["state"], world["images"])
  assert {"ove_pg_main", "ove_pg_aux", "teacher_reg"} <= set(metrics)


# ------------------------------------------------------------------------------------------ VaMP on MMRL


@pytest.fixture(scope="module")
def vamp_case(world, case):
  """VaMP-on-MMRL sharing the MMRL case's representation params (so its vision side is the reference's)."""
  learner = prompts.make_learner("vamp_mmrl", world["config"], **VAMP_HPARAMS)
  state = learner.prepare_classes(world["params"], CLASSNAMES, templates=TEMPLATE,
                                  class_prototypes=world["prototypes"])
  # Learner-owned class state: VaMP's prototypes and MMRL's training classes (both parents' entries), and
  # the same token state as MMRL's (one template-input layout).
  assert set(state.learner_state) == {"class_prototypes", "train_text_features", "is_train_class"}
  assert set(case["state"].learner_state) == {"train_text_features", "is_train_class"}
  chex.assert_trees_all_equal(state.replace(learner_state={}), case["state"].replace(learner_state={}))
  params = learner.init(jax.random.key(2), world["params"], state)
  assert set(params) == {"generator", "posterior", "prior", "rep_tokens", "to_text", "to_vision", "rep_proj"}
  params.update({k: case["params"][k] for k in ("rep_tokens", "to_text", "to_vision", "rep_proj")})
  return dict(learner=learner, params=params, state=state)


def test_vamp_mmrl_with_a_collapsed_posterior_is_mmrl(world, case, vamp_case):
  """μ = 0, σ = e^-40: every sample's text tokens are MMRL's, so every output equals MMRL's (train and test)."""
  learner, clip_params, state = vamp_case["learner"], world["params"], vamp_case["state"]
  params = jax.tree.map(lambda p: p, vamp_case["params"])
  t_width = world["config"].text.width
  linear2 = params["posterior"]["linear2"]
  params["posterior"]["linear2"] = {"kernel": jnp.zeros_like(linear2["kernel"]),
                                    "bias": jnp.zeros_like(linear2["bias"]).at[..., t_width:].set(-80.0)}
  labels = jnp.asarray(LABELS)
  train = jit_apply(learner, params, clip_params, state, world["images"], jax.random.key(0), True, labels)
  mmrl = case["output"]
  for field in ("logits", "aux_logits"):
    expected = jnp.broadcast_to(getattr(mmrl, field), (2, 3, 4))
    chex.assert_trees_all_close(getattr(train, field), expected, atol=1e-5)
  chex.assert_trees_all_close(train.aux_loss, mmrl.aux_loss, atol=1e-6)
  chex.assert_trees_all_close(train.image_features, mmrl.image_features, atol=1e-6)
  test = jit_apply(learner, params, clip_params, state, world["images"], jax.random.key(0), False)
  chex.assert_shape(test.logits, (3, 3, 4))
  # Every class of the list is a training class: MMRL's test logits are the fused ones.
  fused = case["learner"].decoupled_logits(mmrl.logits, mmrl.aux_logits, state.learner_state["is_train_class"])
  chex.assert_trees_all_close(learner.predict_probs(test), scipy.special.softmax(fused[0], axis=-1), atol=1e-5)


def test_vamp_mmrl_samples_kl_and_loss_equal_a_python_loop(world, case, vamp_case):
  """Per (sample, image): MMRL's text tokens plus the sampled residual, through the text tower with VaMP's
  schedule, against both heads; KL in closed form on the residual; the CE loss adds it with weight 1."""
  learner, params = vamp_case["learner"], vamp_case["params"]
  clip_params, state = world["params"], vamp_case["state"]
  config, ref, scale = world["config"], case["reference"], case["scale"]
  rng, labels = jax.random.key(3), jnp.asarray(LABELS)
  output = jit_apply(learner, params, clip_params, state, world["images"], rng, True, labels)
  chex.assert_shape((output.logits, output.aux_logits), (2, 3, 4))
  frozen = clip.normalize(clip.encode_image(clip_params, world["images"], config=config))
  mean, log_var = learner_tests.vamp_posterior_numpy(params, frozen, learner.n_tokens)  # [H, B, K, W], NumPy
  eps = np.asarray(jax.random.normal(rng, (2, *mean.shape)))
  text_features = jit_text_tower(config)  # inserted after SOS at block 1, replaced at block 2
  texts = np.zeros((2, 3, 4, 64))
  for s in range(2):
    for b in range(3):
      z = ref["rep_text"] + mean[:, b] + np.exp(0.5 * log_var[:, b]) * eps[s, :, b]
      z = jnp.asarray(z, jnp.float32)
      texts[s, b] = text_features(clip_params, state.token_embeddings, state.pool_index, z)
      chex.assert_trees_all_close(output.logits[s, b], scale * texts[s, b] @ ref["image"][b], atol=2e-4)
      chex.assert_trees_all_close(output.aux_logits[s, b], scale * texts[s, b] @ ref["rep_image"][b], atol=2e-4)
  prior_mean, prior_log_var = learner_tests.vamp_prior_numpy(params, np.asarray(world["prototypes"])[LABELS],
                                                             learner.n_tokens)
  sq, sp = np.exp(0.5 * log_var), np.exp(0.5 * prior_log_var)
  kl = np.log(sp / sq) + (sq**2 + (mean - prior_mean) ** 2) / (2 * sp**2) - 0.5  # [H, B, K, W]
  kl = kl.mean(axis=(2, 3)).sum(0).mean()
  chex.assert_trees_all_close(output.kl, kl, rtol=1e-4, atol=1e-5)
  lam, alpha = learner.reg_weight, learner.class_head_weight
  regulariser = lam * (1 - np.mean(np.sum(ref["image"] * case["frozen_image"], -1))) + lam * (
      1 - np.mean(np.sum(texts * case["zeroshot_text"], -1)))
  chex.assert_trees_all_close(output.aux_loss, regulariser, atol=1e-5)
  ce = [np.mean([cross_entropy(np.asarray(head[s]), LABELS) for s in range(2)])
        for head in (output.logits, output.aux_logits)]
  loss, _ = make_objective("ce")(output, labels, default_kl_weight=learner.kl_weight)
  chex.assert_trees_all_close(loss, alpha * ce[0] + (1 - alpha) * ce[1] + regulariser + kl, atol=1e-4)


def test_vamp_mmrl_jitted_train_step_with_ce(world, case, vamp_case):
  """Every param moves, the class-aware prior's included (through the KL)."""
  metrics = one_train_step(vamp_case["learner"], "ce", world["params"], vamp_case["state"], world["images"])
  assert float(metrics["kl"]) > 0 and {"nll_main", "nll_aux"} <= set(metrics)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors(world, case):
  config, clip_params = world["config"], world["params"]
  for method in ("mmrl", "vamp_mmrl"):
    message = f"{method}: class_head_weight must be a number in \\[0.0, 1.0\\], got 1.5"
    with pytest.raises(ValueError, match=message):
      prompts.make_learner(method, config, class_head_weight=1.5)
    with pytest.raises(ValueError, match=f"{method}: reg_weight must be a number >= 0.0, got -1"):
      prompts.make_learner(method, config, reg_weight=-1)
    with pytest.raises(ValueError, match=f"{method}: prompted layers 2..3 .* exceed the text tower's 3 layers"):
      prompts.make_learner(method, config, first_layer=2, depth=2)
    with pytest.raises(ValueError, match=f"{method}: n_tokens must be an int >= 1, got 0"):
      prompts.make_learner(method, config, n_tokens=0)
    with pytest.raises(ValueError, match=f"{method}: unknown rep_proj_init 'zeros'"):
      prompts.make_learner(method, config, rep_proj_init="zeros")
    with pytest.raises(ValueError, match=f"{method}: needs a CLIP image tower with a class token.*'map'"):
      prompts.make_learner(method, clip.get_config("siglip_b16"))
  learner, params = case["learner"], case["params"]
  with pytest.raises(ValueError, match="train_classnames needs templates"):  # MMRL needs the zero-shot features
    learner.prepare_classes(clip_params, CLASSNAMES)
  no_templates = case["state"].replace(zeroshot_text_features=None)
  with pytest.raises(ValueError, match="mmrl: training needs the frozen zero-shot text features .* templates"):
    jax.eval_shape(lambda p: learner.apply(p, clip_params, no_templates, world["images"], None, True), params)
  with pytest.raises(ValueError, match="train_classnames must be a non-empty sequence"):
    learner.prepare_classes(clip_params, CLASSNAMES, templates=TEMPLATE, train_classnames=[])
  # VaMP shares the template-input prepare_classes: it takes (and, not needing them, ignores) training classes,
  # as prompt_run passes them to every learner.
  vamp = prompts.make_learner("vamp", config, n_tokens=K, first_layer=FIRST, depth=DEPTH)
  assert "is_train_class" not in vamp.prepare_classes(clip_params, CLASSNAMES,
                                                      train_classnames=CLASSNAMES[:2]).learner_state
  vamp_mmrl = prompts.make_learner("vamp_mmrl", config, **VAMP_HPARAMS)
  with pytest.raises(ValueError, match="pass a PRNG key as rng"):
    vamp_mmrl.apply(params, clip_params, case["state"], world["images"], None, False)
  bad = LearnerOutput(logits=jnp.zeros((1, 2, 3)), kl=jnp.zeros(()), image_features=jnp.zeros((2, 4)),
                      aux_logits=jnp.zeros((1, 2, 3)), aux_weight=1.5)
  with pytest.raises(ValueError, match="aux_weight must be in \\[0, 1\\].*got 1.5"):
    make_objective("ce")(bad, jnp.asarray([0, 1]))
