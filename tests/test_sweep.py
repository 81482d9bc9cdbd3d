"""bayesprompt.eval.sweep and experiments.plot_sweep: a sweep read back from written tables equals the
per-seed values that went in (mean, sample std, HM of the means), sorted by value; bad points fail by name."""

import json

import numpy as np
import pytest

from bayesprompt.errors import UserError
from bayesprompt.eval import sweep
from bayesprompt.eval.results import ResultsWriter


def _table(run_dir, rows: dict[str, dict[int, tuple[float, float]]]):
  """Writes a results table: rows[variant][seed] = (base accuracy, new accuracy)."""
  writer = ResultsWriter(run_dir, title="t", row_label="variant", average=False, write=True)
  for variant, seeds in rows.items():
    for seed, (base, new) in seeds.items():
      writer.add(variant, seed, {"accuracy": base}, split="base")
      writer.add(variant, seed, {"accuracy": new}, split="new")
  writer.write()


def test_sweep_reads_back_the_tables_it_plots(tmp_path):
  rng = np.random.default_rng(0)
  truth = {}
  for x in (0.4, 0.0, 0.2):  # out of order: the sweep sorts by value
    seeds = {s: (float(rng.uniform(0.4, 0.8)), float(rng.uniform(0.4, 0.8))) for s in (1, 2, 3)}
    _table(tmp_path / f"p{x}", {"coop+ce": {1: (0.1, 0.1)}, f"coop+ove_pg,mode=corrected,w={x}": seeds})
    truth[x] = seeds
  points = [f"{x}:{tmp_path / f'p{x}'}" for x in truth]
  got = sweep.read_sweep(points, variant_contains="ove_pg")
  assert [x for x, _, _ in got["base"]] == [0.0, 0.2, 0.4]
  for i, x in enumerate(sorted(truth)):
    base = np.array([b for b, _ in truth[x].values()])
    new = np.array([n for _, n in truth[x].values()])
    np.testing.assert_allclose(got["base"][i][1:], (base.mean(), base.std(ddof=1)), rtol=1e-12)
    np.testing.assert_allclose(got["new"][i][1:], (new.mean(), new.std(ddof=1)), rtol=1e-12)
    hm = 2 * base.mean() * new.mean() / (base.mean() + new.mean())
    np.testing.assert_allclose(got["hm"][i][1], hm, rtol=1e-12)
  table = sweep.sweep_markdown(got, xlabel="λ₁")
  assert table.splitlines()[0] == "| λ₁ | base | new | HM |" and len(table.splitlines()) == 5
  assert f"{100 * got['new'][1][1]:.2f} ± {100 * got['new'][1][2]:.2f}" in table.splitlines()[3]

  zs = tmp_path / "zs"
  writer = ResultsWriter(zs, title="zs", write=True)
  writer.add("sandbox_catalogue", 0, {"accuracy": 0.5}, split="base")
  writer.add("sandbox_catalogue", 0, {"accuracy": 0.6}, split="new")
  writer.write()
  out = tmp_path / "fig" / "sweep.png"
  assert sweep.plot_sweep(points, out, variant_contains="ove_pg", zero_shot_run=zs, xlabel="λ₁") == table
  assert out.stat().st_size > 1000


def test_sweep_bad_points_fail_by_name(tmp_path):
  _table(tmp_path / "two", {"a+ce": {1: (0.5, 0.5)}, "b+ce": {1: (0.5, 0.5)}})
  for points, match in (([], "empty"), (["x:runs/a"], "expected value:run_dir"), (["0.1"], "value:run_dir"),
                        ([f"0.1:{tmp_path}", f"0.1:{tmp_path}"], "repeats a value"),
                        ([f"0.1:{tmp_path / 'none'}"], "no results.json"),
                        ([f"0.1:{tmp_path / 'two'}"], "holds 2 rows")):
    with pytest.raises(UserError, match=match):
      sweep.read_sweep(points)
  with pytest.raises(UserError, match="0 rows contain 'ove'"):
    sweep.read_sweep([f"0.1:{tmp_path / 'two'}"], variant_contains="ove")


def test_plot_sweep_binary(tmp_path, capsys):
  from absl import flags

  from tests.conftest import binary_module

  _table(tmp_path / "a", {"coop+ce": {1: (0.5, 0.7), 2: (0.6, 0.8)}})
  _table(tmp_path / "b", {"coop+ce": {1: (0.55, 0.65), 2: (0.65, 0.75)}})
  out = tmp_path / "s.png"
  with binary_module("experiments.plot_sweep") as module:
    flags.FLAGS(["plot_sweep", f"--points=1:{tmp_path / 'a'},2:{tmp_path / 'b'}", f"--out={out}"])
    try:
      module.main([])
    finally:
      flags.FLAGS.unparse_flags()
  printed = capsys.readouterr().out
  assert "| 1 | 55.00 ± 7.07 | 75.00 ± 7.07 |" in printed and out.stat().st_size > 1000
  assert json.loads((tmp_path / "a" / "results.json").read_text())["summary"]  # inputs untouched
