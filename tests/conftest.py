"""Shared test set-up: the reference fixtures live in ../shared/fixtures beside the checkout."""

import contextlib
import importlib
import os
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("BAYESPROMPT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f"reference fixtures not found at {FIXTURES} (expected ../shared/fixtures beside the checkout)")
  return FIXTURES


@contextlib.contextmanager
def binary_module(*names: str):
  """Imports absl binaries (experiments.*) for a test module, then removes the flags they defined.

  Every binary defines its flags on absl's global FLAGS at import, and two binaries that both define e.g.
  --data_dir cannot live in one process. Tests that call binaries in-process import them through this,
  module by module, so the default suite can hold tests of every binary.
  """
  from absl import flags

  before_flags = set(flags.FLAGS)
  before_modules = set(sys.modules)
  modules = [importlib.import_module(name) for name in names]
  try:
    yield modules[0] if len(modules) == 1 else modules
  finally:
    for name in set(flags.FLAGS) - before_flags:
      delattr(flags.FLAGS, name)
    for name in set(sys.modules) - before_modules:
      if name.startswith("experiments.") and name != "experiments.common":
        del sys.modules[name]


@pytest.fixture(scope="module")
def fast_compiles():
  """Turns XLA's optimisation passes off for a test module of tiny towers, where they cost far more than they
  save (~4x compile time). Opt in per module: `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  import jax

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
