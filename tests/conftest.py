"""Shared test set-up: the reference fixtures live in ../shared/fixtures beside the checkout."""

import contextlib
import importlib
import os
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("BAYESPROMPT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))

# JAX's persistent compilation cache for the suite: most of its time is XLA compiling tiny towers, the same
# programs on every run. Executables are stored under ~/.cache/bayesprompt/jax_compilation_cache (a path CI
# can keep between fresh clones), or BAYESPROMPT_JAX_CACHE; BAYESPROMPT_JAX_CACHE="" turns it off. Set through
# the environment so the subprocess tests (multi-device scenarios, binaries) share it, and through
# jax.config in case a plugin imported JAX first. The cache key covers the program, the compile options
# (jax_disable_most_optimizations included), the JAX/XLA version and the device, so a hit is the executable a
# fresh compile would give.
JAX_CACHE_DIR = os.environ.get("BAYESPROMPT_JAX_CACHE",
                               str(pathlib.Path.home() / ".cache" / "bayesprompt" / "jax_compilation_cache"))
if JAX_CACHE_DIR:
  _cache_settings = {
      "jax_compilation_cache_dir": JAX_CACHE_DIR,
      # Every program, however small: ~6000 of the suite's ~7200 programs compile in < 0.1 s (eager ops,
      # chex's without_jit variants) and were recompiled on every run; cached, a warm test_probcosine.py takes
      # 11.2 CPU-s instead of 16.4 and test_metrics.py 5.3 instead of 9.1 (2026-12-03).
      "jax_persistent_cache_min_compile_time_secs": 0,
      "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  for _name, _value in _cache_settings.items():
    os.environ.setdefault(_name.upper(), str(_value))
  if "jax" in sys.modules:
    for _name, _value in _cache_settings.items():
      sys.modules["jax"].config.update(_name, _value)


# XLA:CPU's fusion emitters (the MLIR code generator, on by default) take about twice as long to compile the
# suite's small programs as the classic emitters, and the suite is mostly compiling: cold,
# tests/test_prompts_learners.py took 72 CPU-s with them and 40 without (2026-12-03). Set through XLA_FLAGS
# so the subprocess tests inherit it (`xla_flags` keeps it when a test adds its own flag); a value the user
# set wins. Library code and the binaries keep XLA's defaults.
SUITE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a test's subprocess: the suite's (SUITE_XLA_FLAGS and any the user set) plus `extra`."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


# Under pytest-xdist (pyproject addopts: --dist loadfile) each file goes whole to the next free worker, so a
# long file started last keeps one core busy after the other has finished. These files are handed out first,
# longest first by their wall time in a cold idle suite (2026-12-03, `--durations`: test_posterior_eval ~140 s,
# test_distributed ~105, test_resume_kill ~100, ...; most are subprocess scenarios or every-learner loops), the
# rest follow in collection order. A name here that no longer exists is ignored.
LONGEST_FILES_FIRST = ("test_posterior_eval.py", "test_distributed.py", "test_resume_kill.py", "test_prompt_run.py",
                       "test_bayesvlm_binaries.py", "test_run_hygiene.py", "test_device_suite.py",
                       "test_distributed_binaries.py", "test_sandbox_pretrain.py", "test_sandbox_regime.py")


def pytest_collection_modifyitems(config, items):
  if not hasattr(config, "workerinput"):  # a serial run keeps pytest's order
    return
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


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


@pytest.fixture
def optimized_compiles():
  """One test of a `fast_compiles` module with XLA's optimisation passes back on (e.g. a float64 sum checked to
  1e-15, whose unoptimised reduction order rounds differently)."""
  import jax

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


# BAYESPROMPT_COMPILE_REPORT=<file>: every test's XLA compile seconds in this process (fixture set-up included,
# subprocesses not), appended as JSON lines "nodeid, seconds, programs" per worker: where a cold suite's time
# goes (`sort -t, -k2 -rn`). Run it with an empty BAYESPROMPT_JAX_CACHE to see the cold cost.
COMPILE_REPORT = os.environ.get("BAYESPROMPT_COMPILE_REPORT")
_compile_seconds: dict[str, list[float]] = {}
_current_test: list[str] = []

if COMPILE_REPORT:
  def _on_duration(event: str, duration: float, **_: object) -> None:
    if event == "/jax/core/compile/backend_compile_duration" and _current_test:
      entry = _compile_seconds.setdefault(_current_test[-1], [0.0, 0])
      entry[0] += duration
      entry[1] += 1

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    _current_test.append(item.nodeid)
    yield
    _current_test.pop()

  def pytest_configure(config):
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_on_duration)

  def pytest_sessionfinish(session, exitstatus):
    import json

    with open(COMPILE_REPORT, "a") as report:
      for nodeid, (seconds, programs) in _compile_seconds.items():
        report.write(json.dumps([nodeid, round(seconds, 3), programs]) + "\n")
