"""The OVE-PG objective in the learner-independent loss slot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesprompt.bayes import ove
from bayesprompt.objectives import make_objective

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")


class _Output:
  def __init__(self, logits, kl=0.0):
    self.logits, self.kl = jnp.asarray(logits, jnp.float32), jnp.asarray(kl, jnp.float32)


def test_samples_average_the_pure_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 6)) * 5  # S = 3 learner samples
  teacher = rng.normal(size=(4, 6)) * 5
  labels = jnp.asarray([0, 5, 2, 2])
  objective = make_objective("ove_pg", prior_precision=1.0, teacher_weight=0.2, mode="corrected")
  key = jax.random.key(1)
  loss, metrics = objective(_Output(logits, kl=3.0), labels, key, jnp.asarray(teacher), default_kl_weight=0.5)
  keys = jax.random.split(key, 3)
  expected = np.mean([ove.ove_pg_loss(k, jnp.asarray(z, jnp.float32), jnp.asarray(teacher, jnp.float32), labels,
                                      prior_precision=1.0, teacher_weight=0.2)[0] for k, z in zip(keys, logits, strict=True)])
  np.testing.assert_allclose(loss, expected + 0.5 * 3.0, rtol=1e-5)
  assert {"loss", "nll", "teacher_reg", "train_accuracy"} <= set(metrics)
  grad = jax.grad(lambda z: objective(_Output(z), labels, key, jnp.asarray(teacher))[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_faithful_differs_from_corrected():
  rng = np.random.default_rng(1)
  logits, teacher = rng.normal(size=(1, 4, 5)) * 4, rng.normal(size=(4, 5)) * 4
  labels = jnp.asarray([1, 3, 0, 4])
  values = {mode: float(make_objective("ove_pg", mode=mode)(_Output(logits), labels, jax.random.key(0),
                                                             jnp.asarray(teacher, jnp.float32),
                                                             official_trainer="CoOp_OVE_PG")[0])
            for mode in ("corrected", "faithful")}
  assert values["corrected"] != pytest.approx(values["faithful"], rel=1e-3)


def test_needs_teacher():
  assert make_objective("ove_pg").needs_teacher
  assert not make_objective("ove_pg", teacher_weight=0.0, omega_source="posterior_gibbs").needs_teacher


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "official"}, "unknown OVE-PG mode 'official'"),
    ({"omega_source": "mean"}, "unknown omega_source 'mean'"),
    ({"prior_precision": -1.0}, "prior_precision .* must be >= 0, got -1.0"),
    ({"teacher_weight": -0.1}, "teacher_weight .* must be >= 0, got -0.1"),
    ({"num_samples": 0}, "num_samples .* >= 1, got 0"),
])
def test_bad_options(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_objective("ove_pg", **kwargs)


def test_old_alpha_key_sets_prior_precision_with_a_warning():
  """Flagfiles and stored run configs written before the rename (`alpha=`) still run, and say so."""
  with pytest.warns(FutureWarning, match="'alpha' is renamed 'prior_precision'"):
    objective = make_objective("ove_pg", alpha=1.7, teacher_weight=0.3)
  assert objective == make_objective("ove_pg", prior_precision=1.7, teacher_weight=0.3)
  with pytest.raises(TypeError, match="both 'alpha' .* and 'prior_precision'"):
    make_objective("ove_pg", alpha=1.0, prior_precision=1.0)


# ------------------------------------------------------------------ faithful = the official trainer of the learner


def official_vpt_trainer_numpy(pred, learned_pred, label, eps, *, alpha, lambda_1):
  """BP_CLIP's VPT_OVE_PG / VPT_CoCoOp_OVE_PG `CustomCLIP.forward` training branch (OVE-PG and KD terms; the
  KL term is the learner's, added outside), transliterated to NumPy in float64.

  pred [L, n, C] the L prompt samples' logits, learned_pred [n, C] the frozen zero-shot logits (expanded over
  L), label [n]; eps [M, L, n, C−1] feeds the true-class rows (the only ones the loss reads; the others get
  other noise, as the official code draws noise for every class row).
  """
  pred, learned = np.asarray(pred, np.float64), np.asarray(learned_pred, np.float64)
  num_l, n, n_cls = pred.shape
  learned = np.broadcast_to(learned, pred.shape)
  other_noise = np.random.default_rng(99)

  def affine_matrix(y):  # affine_matrix(LongTensor([y]), C): N = 1
    a = np.zeros((n_cls - 1, n_cls))
    a[np.arange(n_cls - 1), y] = 1.0
    a[np.arange(n_cls - 1), [c for c in range(n_cls) if c != y]] = -1.0
    return a

  batch_a = np.stack([affine_matrix(j) for j in range(n_cls)])  # [C, C-1, C]
  tile_one_hot = np.tile(np.eye(n_cls)[label][None], (num_l, 1, 1))  # [L, n, C]
  kappa = tile_one_hot - 0.5
  task_losses, kd_losses = 0.0, 0.0
  num_draws = eps.shape[0]
  for m in range(num_draws):
    ove_logits = np.einsum("lnk,jhk->lnjh", pred, batch_a)
    learned_ove_logits = np.einsum("lnk,jhk->lnjh", learned, batch_a)
    new_logits = []
    for cls_idx in range(n_cls):
      logit, learned_ove_logit = ove_logits[:, :, cls_idx], learned_ove_logits[:, :, cls_idx]  # [L, n, C-1]
      kappa_c = np.broadcast_to(kappa[..., cls_idx][..., None], logit.shape)  # unsqueeze(-1).expand: correct
      c_clamped = np.clip(learned_ove_logit, 1e-8, 20)
      omega = 1.0 / (c_clamped + 1e-8) * np.tanh(np.minimum(0.5 * c_clamped, 10))
      shape = logit.shape
      logit, kappa_c, omega = logit.reshape(-1, 1), kappa_c.reshape(-1, 1), omega.flatten()
      sigma_inv_diag = (omega + alpha)[:, None]
      mu = (alpha * logit + kappa_c) / sigma_inv_diag
      sigma = 1 / sigma_inv_diag
      noise = other_noise.standard_normal(shape)
      rows = label == cls_idx
      noise[:, rows] = eps[m][:, rows]
      new_logits.append((mu + np.sqrt(sigma) * noise.reshape(-1, 1)).reshape(shape))
    new_logits = np.stack(new_logits, axis=-1).swapaxes(-2, -1)  # [L, n, C, C-1]
    log_prob = (-np.logaddexp(0.0, -new_logits)).sum(-1)  # log_softmax_ove
    task_log_py = (log_prob * tile_one_hot).sum(-1)  # [L, n]
    task_score = np.logaddexp.reduce(task_log_py, axis=0) - np.log(num_l)
    task_losses += -task_score.mean()
    kd_losses += np.mean((learned - pred) ** 2)
  return (task_losses + lambda_1 * kd_losses) / num_draws


class _Output64:
  def __init__(self, logits):
    self.logits, self.kl = logits, jnp.zeros((), logits.dtype)


def _learner_trainer(method: str) -> str | None:
  """`official_ove_pg_trainer` of a learner (VPT's depends on its conditioning: "vpt_cocoop")."""
  import types

  from bayesprompt.prompts import base

  if method.startswith("vpt"):
    conditioning = "cocoop" if method == "vpt_cocoop" else "coop"
    return base._REGISTRY["vpt"].official_ove_pg_trainer.fget(types.SimpleNamespace(conditioning=conditioning))
  return base._REGISTRY[method].official_ove_pg_trainer


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "apex", "vpt", "vpt_cocoop"])
def test_faithful_is_the_official_trainer_of_the_learner(method):
  """mode="faithful" against a NumPy transliteration of that learner's BP_CLIP trainer, loss and gradient
  (float64). CoOp/CoCoOp/MaPLe/APEX share one OVE-PG block (tests/test_ove.official_loss_numpy: the tiled κ);
  the VPT trainers broadcast κ correctly and take logsumexp over the L samples."""
  from tests.test_ove import official_loss_numpy, reference_noise

  trainer = _learner_trainer(method)
  vpt = method.startswith("vpt")
  num_mc, n, num_classes, draws = (3 if vpt else 1), 4, 5, 2
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(num_mc, n, num_classes)) * 3
  teacher = rng.normal(size=(n, num_classes)) * 3
  teacher[0, 1] = -25.0  # a clipped teacher OVE logit (> 20) and negative ones: the official "PG mean" quirks
  labels = np.asarray([0, 2, 2, 4], np.int32)
  key = jax.random.key(3)
  objective = make_objective("ove_pg", mode="faithful", prior_precision=1.3, teacher_weight=0.2,
                             num_samples=draws)
  with jax.enable_x64(True):
    if vpt:
      eps = np.stack([np.asarray(jax.random.normal(k, (num_mc, n, num_classes - 1), jnp.float64))
                      for k in jax.random.split(key, draws)])

      def reference(z):
        return official_vpt_trainer_numpy(z, teacher, labels, eps, alpha=1.3, lambda_1=0.2)
    else:
      eps, _ = reference_noise(jax.random.split(key, 1)[0], n, num_classes, draws, "prior_mean", None, jnp.float64)
      eps = np.asarray(eps)

      def reference(z):
        return official_loss_numpy(z[0], teacher, labels, eps, alpha=1.3, lambda_1=0.2)

    def loss(z):
      return objective(_Output64(z), jnp.asarray(labels), key, jnp.asarray(teacher), official_trainer=trainer)[0]

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
    np.testing.assert_allclose(float(value), reference(logits), rtol=1e-10)
    step, numeric = 1e-6, np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
      bump = np.zeros_like(logits)
      bump[index] = step
      numeric[index] = (reference(logits + bump) - reference(logits - bump)) / (2 * step)
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-6)
    # The other trainer's loss differs on this batch: the two official blocks are not interchangeable.
    other = "CoOp_OVE_PG" if vpt else "VPT_OVE_PG"
    other_value = objective(_Output64(jnp.asarray(logits)), jnp.asarray(labels), key, jnp.asarray(teacher),
                            official_trainer=other)[0]
    assert abs(float(other_value) - float(value)) > 1e-3


@pytest.mark.parametrize("method", ["mpl", "vamp", "mmrl", "vamp_mmrl"])
def test_faithful_is_refused_where_no_official_trainer_exists(method):
  assert _learner_trainer(method) is None
  logits = jnp.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="no(ne)? .*official_trainer=None.*use mode='corrected'"):
    make_objective("ove_pg", mode="faithful")(_Output(logits), jnp.asarray([0, 1]), jax.random.key(0),
                                              jnp.zeros((2, 3)), official_trainer=_learner_trainer(method))
