"""Optimisers and learning-rate schedules of the prompt-learning recipes.

Dassl (the framework behind CoOp, CoCoOp, MaPLe, MPL and OVE-PG's official code) steps its cosine schedule
once per *epoch*, after one constant warm-up epoch at 1e-5, and uses SGD with momentum 0.9 and coupled weight
decay 5e-4 (torch.optim.SGD adds wd·θ to the gradient before the momentum buffer). Reproduced exactly here.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from bayesprompt.errors import UserError


def dassl_cosine_schedule(base_lr: float, num_epochs: int, steps_per_epoch: int, *, warmup_epochs: int = 1,
                          warmup_lr: float = 1e-5) -> optax.Schedule:
  """lr(step) with epoch e = step // steps_per_epoch:
  e < warmup_epochs: warmup_lr (Dassl's constant warm-up); else base_lr·½(1 + cos(π·e / num_epochs)).

  (Dassl's warm-up wrapper hands over to CosineAnnealingLR(T_max=num_epochs) stepped with the global epoch,
  so the first post-warm-up epoch already has cos(π/num_epochs), not cos(0).)
  """
  if base_lr <= 0 or not math.isfinite(base_lr):
    raise ValueError(f"base learning rate must be positive and finite, got {base_lr}")
  if num_epochs < 1 or steps_per_epoch < 1:
    raise ValueError(f"num_epochs and steps_per_epoch must be >= 1, got {num_epochs}, {steps_per_epoch}")
  if warmup_epochs < 0:
    raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    cosine = 0.5 * base_lr * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))
    return jnp.where(epoch < warmup_epochs, warmup_lr, cosine)

  return schedule


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 5e-4,
                   momentum: float = 0.9, max_grad_norm: float | None = None) -> optax.GradientTransformation:
  """"sgd": torch-style SGD (coupled weight decay, heavy-ball momentum); "adamw": decoupled AdamW;
  "adadelta": torch-style Adadelta (coupled weight decay, rho 0.9, eps 1e-6; APEX's recipe)."""
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  chain = []
  if max_grad_norm is not None:
    chain.append(optax.clip_by_global_norm(max_grad_norm))
  if name == "sgd":
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.sgd(learning_rate, momentum=momentum or None))
  elif name == "adamw":
    chain.append(optax.adamw(learning_rate, weight_decay=weight_decay))
  elif name == "adadelta":
    chain.append(optax.adadelta(learning_rate, rho=0.9, eps=1e-6, weight_decay=weight_decay))
  else:
    raise UserError(f"unknown optimizer {name!r}; expected 'sgd', 'adamw' or 'adadelta'")
  return optax.chain(*chain)
