"""Dassl schedule and torch-style SGD, against hand-worked values; cross-entropy objective against brute force."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bayesprompt.objectives import make_objective
from bayesprompt.objectives.ce import per_example_nll
from bayesprompt.train import optim


def test_dassl_schedule_matches_hand_computed_epochs():
  schedule = optim.dassl_cosine_schedule(2e-3, num_epochs=5, steps_per_epoch=3)
  # Epoch 0: constant warm-up 1e-5; epoch e >= 1: 2e-3 · ½(1 + cos(π e / 5)), constant within the epoch.
  expected = [1e-5] * 3 + [2e-3 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in (1, 2, 3, 4) for _ in range(3)]
  got = [float(schedule(step)) for step in range(15)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_schedule_bad_input():
  with pytest.raises(ValueError, match="positive and finite"):
    optim.dassl_cosine_schedule(0.0, 5, 3)
  with pytest.raises(ValueError, match="num_epochs and steps_per_epoch"):
    optim.dassl_cosine_schedule(1e-3, 0, 3)
  with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
    optim.make_optimizer("rmsprop", 1e-3)


def test_sgd_matches_torch_update_rule():
  """torch.optim.SGD(lr, momentum=0.9, weight_decay=wd): g += wd·θ; buf = 0.9·buf + g; θ -= lr·buf."""
  lr, wd, mu = 0.1, 5e-4, 0.9
  tx = optim.make_optimizer("sgd", lr, weight_decay=wd, momentum=mu)
  theta = jnp.array([1.0, -2.0, 3.0])
  state = tx.init(theta)
  ref_theta, buf = np.array(theta), np.zeros(3)
  for step in range(4):
    grad = jnp.array([0.5, step * 1.0, -1.0])
    updates, state = tx.update(grad, state, theta)
    theta = optax.apply_updates(theta, updates)
    g = np.asarray(grad) + wd * ref_theta
    buf = mu * buf + g
    ref_theta = ref_theta - lr * buf
  chex.assert_trees_all_close(theta, ref_theta, atol=1e-6)


def test_adadelta_matches_torch_update_rule():
  """torch.optim.Adadelta(lr, rho=0.9, eps=1e-6, weight_decay=wd): g += wd·θ; v = ρv + (1-ρ)g²;
  δ = sqrt(u + eps)/sqrt(v + eps)·g; u = ρu + (1-ρ)δ²; θ -= lr·δ."""
  lr, wd, rho, eps = 0.15, 1e-3, 0.9, 1e-6
  tx = optim.make_optimizer("adadelta", lr, weight_decay=wd)
  theta = jnp.array([1.0, -2.0, 3.0])
  state = tx.init(theta)
  ref_theta, v, u = np.array(theta, np.float64), np.zeros(3), np.zeros(3)
  for step in range(4):
    grad = jnp.array([0.5, step * 1.0, -1.0])
    updates, state = tx.update(grad, state, theta)
    theta = optax.apply_updates(theta, updates)
    g = np.asarray(grad, np.float64) + wd * ref_theta
    v = rho * v + (1 - rho) * g**2
    delta = np.sqrt(u + eps) / np.sqrt(v + eps) * g
    u = rho * u + (1 - rho) * delta**2
    ref_theta = ref_theta - lr * delta
  chex.assert_trees_all_close(theta, ref_theta.astype(np.float32), atol=1e-6)


class _Output:
  def __init__(self, logits, kl=0.0):
    self.logits, self.kl = jnp.asarray(logits), jnp.asarray(kl)


def test_cross_entropy_against_brute_force():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 5)) * 3  # [S, B, C]
  labels = np.array([0, 4, 2, -1])  # last row is padding
  mean_loss = per_example_nll(jnp.asarray(logits), jnp.asarray(labels), "mean_loss")
  log_mean_prob = per_example_nll(jnp.asarray(logits), jnp.asarray(labels), "log_mean_prob")
  for b in range(3):
    probs = np.exp(logits[:, b]) / np.exp(logits[:, b]).sum(-1, keepdims=True)
    np.testing.assert_allclose(mean_loss[b], -np.mean(np.log(probs[:, labels[b]])), rtol=1e-5)
    np.testing.assert_allclose(log_mean_prob[b], -np.log(np.mean(probs[:, labels[b]])), rtol=1e-5)
  # Jensen: −log E p ≤ E[−log p].
  assert np.all(np.asarray(log_mean_prob) <= np.asarray(mean_loss) + 1e-6)
  objective = make_objective("ce")
  loss, metrics = objective(_Output(logits, kl=2.0), jnp.asarray(labels), None, None,
                            default_sample_reduction="mean_loss", default_kl_weight=0.1)
  np.testing.assert_allclose(loss, np.mean(np.asarray(mean_loss)[:3]) + 0.2, rtol=1e-5)
  assert not objective.needs_teacher
  grad = jax.grad(lambda z: objective(_Output(z), jnp.asarray(labels))[0])(jnp.asarray(logits))
  np.testing.assert_array_equal(grad[:, 3], 0.0)  # padding rows get no gradient


def test_unknown_objective():
  with pytest.raises(ValueError, match="unknown objective 'hinge'.*ce"):
    make_objective("hinge")
