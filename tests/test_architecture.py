"""The package's layer order (WORKSPACE.md): a lower layer never imports a higher one, binaries never import
binaries, and the primitives of `bayesprompt.bayes` import nothing but jax / numpy (and each other).

Layers, bottom to top:
  0  clip, bayes           the frozen backbone; pure probabilistic primitives (independent of each other)
  1  prompts, objectives   prompt learners on the towers; loss plug-ins (on the bayes primitives)
  2  data                  registry, sources, pipelines, protocols, the sandbox world
  3  train, eval           trainers, run directories; metrics, zero-shot evaluation, results tables
  4  bayesvlm              the BayesVLM pipeline (features, KFAC, posteriors, active learning, experiments)
  5  experiments           absl binaries (flag wiring only) and their shared flag modules
Every import is checked, including lazy ones inside functions (a lazy import still makes the dependency).
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"errors": 0, "options": 0, "clip": 0, "bayes": 0, "prompts": 1, "objectives": 1, "data": 2, "train": 3,
          "eval": 3, "bayesvlm": 4}
EXPERIMENTS_LAYER = 5
# Same-layer packages that must stay independent of each other (layer 0 is the floor everybody builds on).
INDEPENDENT = {frozenset({"clip", "bayes"}), frozenset({"errors", "bayes"}), frozenset({"options", "bayes"})}
# experiments/ modules that are not binaries: shared flag definitions the binaries import.
SHARED_FLAG_MODULES = {"experiments.common", "experiments.bayesvlm_flags"}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, imported module) of every import statement in the file, absolute or relative, at any depth."""
  module = _module_name(path)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the importing package
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      out.append((node.lineno, target))
      # `from bayesprompt import clip` imports the subpackage bayesprompt.clip (likewise for experiments).
      if target in ("bayesprompt", "experiments"):
        out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
  return out


def _layer(module: str) -> tuple[str, int] | None:
  """(unit, layer) of a bayesprompt / experiments module, None for third-party and stdlib modules."""
  parts = module.split(".")
  if parts[0] == "experiments":
    return "experiments", EXPERIMENTS_LAYER
  if parts[0] != "bayesprompt" or len(parts) < 2:
    return None
  if parts[1] not in LAYERS:
    raise AssertionError(f"bayesprompt.{parts[1]} has no layer: add it to LAYERS here and to WORKSPACE.md")
  return parts[1], LAYERS[parts[1]]


def _violations(paths) -> list[str]:
  problems = []
  for path in paths:
    source = _module_name(path)
    if source == "bayesprompt":
      for line, target in _imports(path):
        if target.startswith(("bayesprompt.", "experiments")):
          problems.append(f"{path}:{line}: the top-level package imports {target} (keep it empty)")
      continue
    unit, layer = _layer(source)
    for line, target in _imports(path):
      if target.split(".")[0] == "tests":
        problems.append(f"{path}:{line}: library/binary code imports the tests ({target})")
      if target in ("bayesprompt", "experiments") or target.split(".")[0] == "tests":
        continue
      found = _layer(target)
      if found is None:
        continue
      target_unit, target_layer = found
      if target_layer > layer:
        problems.append(f"{path}:{line}: {source} (layer {layer}, {unit}) imports {target} "
                        f"(layer {target_layer}, {target_unit})")
      elif target_unit != unit and frozenset({unit, target_unit}) in INDEPENDENT:
        problems.append(f"{path}:{line}: {source} imports {target}: {unit} and {target_unit} stay independent")
      elif (unit == "experiments" and target.startswith("experiments.") and target not in SHARED_FLAG_MODULES
            and source not in SHARED_FLAG_MODULES):
        problems.append(f"{path}:{line}: binary {source} imports the binary {target} (move what it needs into "
                        "the library or a shared flag module)")
  return problems


def _sources():
  return sorted([*(REPO / "bayesprompt").rglob("*.py"), *(REPO / "experiments").glob("*.py")])


def test_no_lower_layer_imports_a_higher_one():
  problems = _violations(_sources())
  assert not problems, "layer violations:\n" + "\n".join(problems)


def test_layer_check_catches_upward_lazy_and_binary_imports(tmp_path, monkeypatch):
  """The checker itself: an upward lazy import, a clip -> bayes import and a binary -> binary import fail."""
  files = {
    "bayesprompt/clip/bad.py": "def f():\n  import bayesprompt.data.sandbox\n",
    "bayesprompt/clip/bad2.py": "from bayesprompt.bayes import laplace\n",
    "bayesprompt/data/ok.py": "from bayesprompt import clip\nfrom bayesprompt.data import registry\n",
    "bayesprompt/bayes/bad3.py": "from bayesprompt import eval\n",
    "experiments/bad4.py": "from experiments import common, estimate_hessian\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
  problems = _violations(sorted(tmp_path / name for name in files))
  assert len(problems) == 4, problems
  for culprit in ("bad.py:2", "bad2.py:1", "bad3.py:1", "bad4.py:1"):
    assert any(culprit in p for p in problems), (culprit, problems)


def test_every_binary_is_short_wiring():
  """Binaries are flags -> library calls: at most ~100 lines, no function but main (and flag readers)."""
  for path in (REPO / "experiments").glob("*.py"):
    if _module_name(path) in SHARED_FLAG_MODULES or path.name == "__init__.py":
      continue
    text = path.read_text()
    assert "common.run_binary(main)" in text, f"{path} is not an absl binary run through common.run_binary"
    assert len(text.splitlines()) <= 100, f"{path} has {len(text.splitlines())} lines: move logic into the library"


PRIMITIVES = sorted(p.stem for p in (REPO / "bayesprompt" / "bayes").glob("*.py") if p.stem != "__init__")
_PROBE = """
import json, sys
if sys.argv[1] == "--baseline":
  import jax, numpy, chex  # noqa: F401
else:
  import importlib
  importlib.import_module(sys.argv[1])
third_party = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"bayesprompt"})
print(json.dumps({"bayesprompt": sorted(m for m in sys.modules if m.startswith("bayesprompt")),
                  "third_party": third_party}))
"""


def _probe(argument: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", _PROBE, argument], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_each_primitive_imports_only_jax_numpy_and_primitives_in_a_fresh_interpreter():
  """`bayes/` is importable into anyone's JAX code: a fresh interpreter that imports one primitive module loads
  no other bayesprompt package and no third-party package beyond what `import jax, numpy, chex` loads."""
  assert {"polya_gamma", "ove", "laplace", "probcosine", "predictive", "acquisition"} <= set(PRIMITIVES)
  procs = {name: _probe(f"bayesprompt.bayes.{name}") for name in PRIMITIVES}
  procs["--baseline"] = _probe("--baseline")
  loaded = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"importing {name} failed:\n{err[-3000:]}"
    loaded[name] = json.loads(out.strip().splitlines()[-1])
  allowed_third_party = set(loaded.pop("--baseline")["third_party"])
  for name, found in loaded.items():
    others = [m for m in found["bayesprompt"] if m not in ("bayesprompt", "bayesprompt.bayes")
              and not m.startswith("bayesprompt.bayes.")]
    assert not others, f"bayesprompt.bayes.{name} loads {others}"
    extra = set(found["third_party"]) - allowed_third_party
    assert not extra, f"bayesprompt.bayes.{name} loads third-party {sorted(extra)} beyond jax/numpy/chex"


@pytest.mark.parametrize("name", ["sandbox"])
def test_clip_does_not_know_the_sandbox_until_it_registers(name):
  """clip/ imports nothing above itself: in a fresh interpreter "sandbox" is unknown to clip alone (with an
  error that says who registers it) and known once bayesprompt.data is imported."""
  code = f"""
import bayesprompt.clip as clip, sys
try:
  clip.get_config({name!r})
  raise SystemExit("registered without the data package")
except ValueError as e:
  assert "import bayesprompt.data" in str(e), e
try:
  clip.load_checkpoint({name!r})
  raise SystemExit("checkpoint registered without the data package")
except FileNotFoundError as e:
  assert "import bayesprompt.data" in str(e), e
assert not any(m.startswith("bayesprompt.data") for m in sys.modules), "clip imported data"
import bayesprompt.data
assert clip.get_config({name!r}).embed_dim > 0
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
