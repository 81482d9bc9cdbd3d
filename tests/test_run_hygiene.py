"""Runs a user can trust (issue 16): run directories, user errors, flags, logs, tables and the README."""

import logging as std_logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from bayesprompt.errors import UserError
from bayesprompt.eval import results as results_lib
from bayesprompt.train import run_dir as run_dir_lib
from tests.conftest import REPO_ROOT

BINARIES = ("ove_pg", "prompt_learning", "zeroshot", "pretrain_sandbox", "estimate_hessian", "bayesvlm",
            "active_learning")
WITH_RESUME = ("ove_pg", "prompt_learning", "pretrain_sandbox")


def _binary(name: str, *args: str, cwd: pathlib.Path = REPO_ROOT, timeout: float = 900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _binary_in_process(name: str, *args: str, monkeypatch, capsys) -> tuple[int, str, str]:
  """`python -m experiments.<name> *args` without an interpreter start-up (about 4 CPU-s each): the module's
  main through `common.run_binary`, as its `__main__` block calls it (tests/test_architecture.py checks every
  binary's block), with its flags removed afterwards. Returns (exit status, stdout, stderr)."""
  from absl import app, flags

  from experiments import common
  from tests.conftest import binary_module

  app.define_help_flags()  # once per process (absl): before binary_module, which removes the flags it sees appear
  with binary_module(f"experiments.{name}") as module:
    monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", *args])
    try:
      with pytest.raises(SystemExit) as exit_info:
        common.run_binary(module.main)
    finally:
      flags.FLAGS.unparse_flags()
  captured = capsys.readouterr()
  code = exit_info.value.code
  return 0 if code is None else int(code), captured.out, captured.err


# ------------------------------------------------------------------------------------------------------------
# Run directories (items 1-3)


def test_smoke_dirs_are_fresh_and_never_the_run_dir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  first = run_dir_lib.resolve_run_dir("runs/real", runlocal=True, name="ove_pg", default="runs/default")
  second = run_dir_lib.resolve_run_dir("runs/real", runlocal=True, name="ove_pg", default="runs/default")
  assert first != second
  for smoke in (first, second):
    assert smoke.is_dir() and not any(smoke.iterdir())
    assert smoke.parent == pathlib.Path(run_dir_lib.SMOKE_ROOT) / "ove_pg"
  assert not pathlib.Path("runs/real").exists()
  assert run_dir_lib.resolve_run_dir("runs/real", runlocal=False, name="x", default="d") == pathlib.Path("runs/real")
  assert run_dir_lib.resolve_run_dir(None, runlocal=False, name="x", default="d") == pathlib.Path("d")


def test_default_run_dir_is_a_function_of_the_configuration():
  config = [{"method": "coop", "seed": 1, "epochs": 10}]
  assert run_dir_lib.default_run_dir("base2new_x", config) == run_dir_lib.default_run_dir("base2new_x", config)
  other = [{"method": "coop", "seed": 1, "epochs": 1}]
  assert run_dir_lib.default_run_dir("base2new_x", config) != run_dir_lib.default_run_dir("base2new_x", other)
  assert run_dir_lib.default_run_dir("base2new_x", config).parent == pathlib.Path("runs")


def test_check_fresh_refuses_resumes_and_overwrites_only_run_files(tmp_path):
  run = tmp_path / "run"
  run_dir_lib.check_fresh(run, resume=False, overwrite=False)  # nothing there: fine
  with run_dir_lib.RunDir(run, {"a": 1}, tensorboard=False) as rd:
    rd.write_scalars(0, {"loss": 1.0})
  (run / "checkpoints").mkdir()
  (run / "notes.txt").write_text("the user's own file")
  with pytest.raises(UserError) as error:
    run_dir_lib.check_fresh([tmp_path / "empty", run], resume=False, overwrite=False)
  message = str(error.value)
  assert "--resume" in message and "--overwrite" in message and str(run) in message and "\n" not in message
  run_dir_lib.check_fresh(run, resume=True, overwrite=False)  # resume: continue what is there
  assert (run / "metrics.jsonl").exists()
  with pytest.raises(UserError, match="contradict"):
    run_dir_lib.check_fresh(run, resume=True, overwrite=True)
  run_dir_lib.check_fresh(run, resume=False, overwrite=True)
  assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_atomic_write_leaves_no_temporary_file(tmp_path):
  path = run_dir_lib.atomic_write_text(tmp_path / "results.json", "{}\n")
  run_dir_lib.atomic_write_text(path, '{"a": 1}\n')
  assert path.read_text() == '{"a": 1}\n'
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_zeroshot_runlocal_never_touches_run_dir_nor_another_smoke_run(tmp_path, monkeypatch, capsys):
  """Item 1 end to end: two smoke runs with the flagfile's --run_dir write two fresh directories."""
  monkeypatch.chdir(tmp_path)
  for _ in range(2):
    code, _, err = _binary_in_process("zeroshot", "--checkpoint=sandbox", "--dataset=sandbox_shapes", "--runlocal",
                                      "--noprogress", "--run_dir=runs/real", monkeypatch=monkeypatch,
                                      capsys=capsys)
    assert code == 0, err[-3000:]
  assert not (tmp_path / "runs" / "real").exists()
  smoke = sorted((tmp_path / run_dir_lib.SMOKE_ROOT / "zeroshot").iterdir())
  assert len(smoke) == 2 and all((d / "results.md").exists() for d in smoke)


# ------------------------------------------------------------------------------------------------------------
# User errors (item 5)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  from experiments import common

  def bad_input(argv):
    raise UserError("unknown dataset 'nope';\n known datasets: a, b")

  with pytest.raises(SystemExit) as exit_info:
    common.user_errors(bad_input)([])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: unknown dataset 'nope'; known datasets: a, b\n"

  def bug(argv):
    raise ValueError("operands could not be broadcast together")  # numpy's: not the user's fault

  with pytest.raises(ValueError, match="broadcast"):
    common.user_errors(bug)([])

  def key_bug(argv):
    return {}["missing"]

  with pytest.raises(KeyError):
    common.user_errors(key_bug)([])


@pytest.mark.parametrize("name,args,expected", [
  ("zeroshot", ["--checkpoint=/nonexistent/ckpt", "--dataset=sandbox_shapes"], "does not exist"),
  ("estimate_hessian", ["--checkpoint=/nonexistent/ckpt", "--runlocal"], "does not exist"),
  ("bayesvlm", ["--checkpoint=/nonexistent/ckpt", "--runlocal"], "does not exist"),
  ("active_learning", ["--acquisitions=nope", "--runlocal"], "unknown 'nope'"),
  ("prompt_learning", ["--eval_only", "--run_dir=/nonexistent/run"], "seed<N>"),
  ("ove_pg", ["--seeds=one", "--runlocal"], "--seeds=one"),
  ("pretrain_sandbox", ["--resume", "--overwrite"], "contradict"),
  ("ove_pg", ["--protocol=nope"], "--protocol"),  # absl flag parsing
])
def test_binaries_report_user_errors_in_one_line(tmp_path, monkeypatch, capsys, name, args, expected):
  monkeypatch.chdir(tmp_path)
  code, out, err = _binary_in_process(name, *args, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 2, out[-2000:] + err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], err[-3000:]


def test_a_user_error_from_the_real_entry_point(tmp_path):
  """One real `python -m` process: the `__main__` block, the exit status and stderr as a shell sees them."""
  out = _binary("ove_pg", "--protocol=nope", cwd=tmp_path)
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "--protocol" in errors[0], out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------
# Flags (item 8)


@pytest.mark.parametrize("name", BINARIES)
def test_helpshort_lists_the_binarys_own_flags(name, monkeypatch, capsys):
  _, stdout, _ = _binary_in_process(name, "--helpshort", monkeypatch=monkeypatch, capsys=capsys)
  listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", stdout, flags=re.M))
  assert "runlocal" in listed, stdout
  if name in WITH_RESUME:
    assert "resume" in listed and "overwrite" in listed, stdout
  own = {"ove_pg": {"methods", "seeds", "run_dir", "epochs"}, "prompt_learning": {"eval_only", "method", "run_dir"},
         "zeroshot": {"checkpoint", "template"}, "pretrain_sandbox": {"workdir", "num_steps"},
         "estimate_hessian": {"checkpoint", "output_dir"}, "bayesvlm": {"factors_dir", "checkpoint", "run_dir"},
         "active_learning": {"acquisitions", "factors_dir", "checkpoint"}}[name]
  assert own <= listed, (own - listed, stdout)


def test_run_dir_and_eval_only_help_state_what_they_need(monkeypatch, capsys):
  from experiments import common

  with pytest.raises(UserError, match=r"<run_dir>/<variant>/seed<N>"):
    common.evaluate_run_dir(None, dataset="sandbox_shapes", protocol="few_shot", data_dir=None,
                            max_eval_examples=None)
  _, stdout, _ = _binary_in_process("prompt_learning", "--helpshort", monkeypatch=monkeypatch, capsys=capsys)
  assert "seed<N>" in stdout and "digest of the" in stdout, stdout


# ------------------------------------------------------------------------------------------------------------
# Output (item 7)


def test_progress_bars_only_on_a_terminal(monkeypatch):
  from experiments import common

  class Stream:
    def __init__(self, tty):
      self.tty = tty

    def isatty(self):
      return self.tty

  monkeypatch.setattr(sys, "stderr", Stream(False))
  assert not common.show_progress(True)
  monkeypatch.setattr(sys, "stderr", Stream(True))
  assert common.show_progress(True) and not common.show_progress(False)


def test_quiet_logs_drops_tpu_and_tfds_noise_and_info():
  from absl import logging

  from experiments import common

  previous = logging.get_verbosity()
  try:
    common.quiet_logs()
    assert std_logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() >= std_logging.WARNING
    absl_logger = std_logging.getLogger("absl")
    noise = absl_logger.makeRecord("absl", std_logging.WARNING, "file_utils.py", 1, "Variant folder %s has no %s",
                                   ("/x/1.0.0", "dataset_info.json"), None)
    useful = absl_logger.makeRecord("absl", std_logging.WARNING, "x.py", 1, "checkpoint %s is broken", ("3",), None)
    assert not absl_logger.filter(noise) and absl_logger.filter(useful)
    assert logging.get_verbosity() == logging.WARNING  # orbax's INFO lines (estimate_hessian) are off
  finally:
    logging.set_verbosity(previous)


def _variant_writer(tmp_path, seeds=(1, 2, 3)):
  writer = results_lib.ResultsWriter(tmp_path, title="CE vs OVE-PG", row_label="variant", average=False)
  rng = np.random.default_rng(0)
  for variant in ("coop+ce", "coop+ove_pg,mode=corrected"):
    for seed in seeds:
      for split in ("base", "new", "sandbox_shapes_v2/base", "sandbox_shapes_a/new"):
        writer.add(variant, seed, {"accuracy": rng.uniform(0.2, 0.9), "nll": rng.uniform(0.5, 2)}, split=split)
  return writer


def test_variant_table_has_no_average_and_console_matches_markdown(tmp_path):
  from experiments import common

  writer = _variant_writer(tmp_path)
  markdown = writer.markdown()
  header = next(line for line in markdown.splitlines() if line.startswith("| "))
  assert header.startswith("| variant |")
  assert "average" not in markdown
  console = common.accuracy_table(writer.summary(), "CE vs OVE-PG", [1, 2, 3])
  console_splits = next(line for line in console.splitlines() if line.startswith("| ")).split(" | ")[1:]
  console_splits = [c.strip(" |") for c in console_splits]
  md_accuracy = [c.removesuffix(" accuracy (%)") for c in header.strip("| ").split(" | ")[1:] if "accuracy" in c]
  assert console_splits == md_accuracy == ["base", "new", "hm", "sandbox_shapes_a/new", "sandbox_shapes_v2/base"]
  for text in (console, markdown):
    assert "HM = harmonic mean" in text and "sample std (ddof=1) over 3 seeds" in text
  # The console cells are the markdown's accuracy cells.
  md_row = next(line for line in markdown.splitlines() if line.startswith("| coop+ce"))
  console_row = next(line for line in console.splitlines() if line.startswith("| coop+ce"))
  assert md_row.strip("| ").split(" | ")[1:6] == console_row.strip("| ").split(" | ")[1:6]


def test_footnote_mentions_only_what_the_table_has(tmp_path):
  # bayesvlm's table: one seed, splits map / bayesvlm, several datasets (an average row over datasets).
  writer = results_lib.ResultsWriter(tmp_path, title="BayesVLM")
  for dataset in ("sandbox_shapes", "sandbox_shapes_v2"):
    for method in ("map", "bayesvlm"):
      writer.add(dataset, 0, {"accuracy": 0.5, "nlpd": 1.0}, split=method)
  markdown = writer.markdown()
  assert "seed" not in markdown and "HM" not in markdown and "average row" in markdown
  single = _variant_writer(tmp_path, seeds=(1,)).markdown()
  assert "±" not in single and "seeds" not in single and "HM = harmonic mean" in single


# ------------------------------------------------------------------------------------------------------------
# README (item 6)


def _readme_python_blocks() -> list[str]:
  text = (REPO_ROOT / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run_as_printed(tmp_path):
  blocks = _readme_python_blocks()
  assert blocks, "README.md has no python block"
  for block in blocks:
    script = tmp_path / "block.py"
    script.write_text(block + "\nimport numpy as _np\nassert _np.all(_np.isfinite(_np.asarray(logits)))\n"
                      if "logits" in block else block)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT)))
    assert out.returncode == 0, block + "\n" + out.stderr[-3000:]


def test_too_long_tokens_name_the_models_tokenizer():
  import bayesprompt.clip as clip

  config, params = clip.load_checkpoint("sandbox")
  clip_bpe = clip.tokenize(["a photo of a dog."])  # 77 CLIP-BPE tokens; the sandbox model takes 32
  assert clip_bpe.shape[1] > config.text.context_length
  with pytest.raises(ValueError, match=re.escape("clip.get_tokenizer(config)")):
    clip.encode_text(params, clip_bpe, config=config)
