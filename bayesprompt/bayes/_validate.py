"""Value checks for the public entry points of `bayesprompt.bayes`, that never break jit.

A check runs only when its input is concrete (a Python number, a NumPy array, or a jax.Array outside jit);
under jit the values are tracers and the check is skipped (the function then documents what bad values do).
Reductions run where the array lives and only a scalar comes to the host, so a check costs one small
transfer, not a copy of the array.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
  """x as a NumPy array, or None when it is a tracer (inside jit/vmap/grad)."""
  return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def is_concrete(*values: Any) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in values)


def check_nonnegative(name: str, values: Any, expected: str = "≥ 0") -> None:
  """Raises ValueError naming the first entry of `values` that is negative or NaN (when concrete)."""
  if not is_concrete(values) or np.size(values) == 0:
    return
  values = jnp.asarray(values)
  smallest = float(jnp.min(values))
  if not smallest >= 0:  # also catches NaN
    flat = jnp.ravel(values)
    index = int(jnp.argmax(jnp.isnan(flat) | (flat < 0)))
    position = np.unravel_index(index, values.shape)
    raise ValueError(f"{name} must be {expected}; got {name}[{', '.join(map(str, position))}] = "
                     f"{float(flat[index])}")
