"""The mixed active-learning pool (bayesprompt.data.pool): parsing, composition, label translation, make-up.

Oracles: brute-force recounts of every pool image from its own split (class name, source), the sandbox's
base/new design rule `tasks.TASKS["colour_shape"].is_base` (independent of the name translation), and the
domains the sandbox registry gives each source split.
"""

import pathlib

import numpy as np
import pytest

from bayesprompt.data import pool as pool_lib
from bayesprompt.data import protocols, registry, sources
from bayesprompt.data import sandbox as _sandbox  # noqa: F401  (registers the sandbox datasets)
from bayesprompt.data.sandbox import tasks, world

FLAGFILE = pathlib.Path(__file__).resolve().parents[1] / "experiments/flags/active_learning_offtarget_sandbox.flags"
SHAPES = tasks.TASKS["colour_shape"]


def _split(dataset, classnames, labels, split="test"):
  """An in-memory LabeledSplit whose image is the record id."""
  labels = np.asarray(labels)
  return sources.LabeledSplit(
    dataset=dataset, split=split, classnames=classnames, template="a photo of a {}.",
    read_record=lambda i: (np.full((4, 4, 3), i % 256, np.uint8), int(labels[i])), raw_labels=lambda: labels,
    record_ids=np.arange(len(labels)), label_map=np.arange(len(classnames)), description=dataset)


def _sandbox_like_pool(seed=0, order=(0, 1, 2)):
  """Three sources over the 64 colour x shape classes; the target is the 32 base classes."""
  rng = np.random.default_rng(7)
  names = SHAPES.classnames
  splits = [_split("photos", names, rng.integers(0, 64, 300), "train"), _split("sketches", names,
            rng.integers(0, 64, 200)), _split("cartoons", names, rng.integers(0, 64, 200))]
  srcs = [pool_lib.PoolSource("photos", "train", 120, on_target=True), pool_lib.PoolSource("sketches", "test", 90),
          pool_lib.PoolSource("cartoons", "test", 90)]
  target = protocols.subsample_classes(_split("target", names, np.arange(64)), "base").classnames
  return pool_lib.compose_pool([splits[i] for i in order], [srcs[i] for i in order], target, seed=seed), target


def test_parse_pool_sources_and_bad_input():
  got = pool_lib.parse_pool_sources(["sandbox_shapes:train:640:on_target", " sandbox_shapes_r:test:5"])
  assert got == [pool_lib.PoolSource("sandbox_shapes", "train", 640, True),
                 pool_lib.PoolSource("sandbox_shapes_r", "test", 5, False)]
  for bad, match in (("sandbox_shapes:train", "expected 'dataset:split:count'"),
                     ("a:b:3:on", "expected 'dataset:split:count'"), ("a::3", "expected"),
                     ("a:b:x", "'x' is not a positive integer"), ("a:b:0", "'0' is not a positive integer")):
    with pytest.raises(ValueError, match=match):
      pool_lib.parse_pool_sources([bad])
  with pytest.raises(ValueError, match="repeat a dataset/split"):
    pool_lib.parse_pool_sources(["a:b:3", "a:b:4:on_target"])
  scaled = pool_lib.scale_counts(pool_lib.parse_pool_sources(["a:t:640", "b:t:256", "c:t:3"]), 64)
  assert [s.count for s in scaled] == [45, 18, 1]  # 640·64 // 899, 256·64 // 899, at least 1


def test_compose_pool_counts_labels_and_on_target_against_brute_force():
  composed, target = _sandbox_like_pool()
  assert len(composed) == 300 and [len(s) for s in composed.splits] == [120, 90, 90]
  np.testing.assert_array_equal(composed.source_ids, np.repeat([0, 1, 2], [120, 90, 90]))
  position = 0
  for i, part in enumerate(composed.splits):
    assert len(np.unique(part.record_ids)) == len(part)  # drawn without replacement
    for own in part.labels:
      name = SHAPES.classnames[own]
      colour, shape = SHAPES.compositions[own]
      # Oracle 1: the design rule says which compositions the base-class target has.
      assert (composed.labels[position] != pool_lib.OFF_LABEL_SET) == SHAPES.is_base(colour, shape)
      # Oracle 2: a kept label names the same class in the target's label set.
      if composed.labels[position] >= 0:
        assert target[composed.labels[position]] == name
      assert composed.own_classnames[position] == name
      assert composed.on_target[position] == (i == 0 and composed.labels[position] >= 0)
      position += 1
  rows = pool_lib.composition_rows(composed)
  for i, row in enumerate(rows[:-1]):
    mine = composed.source_ids == i
    assert row["images"] == mine.sum() and row["in_label_set"] == np.sum(composed.labels[mine] >= 0)
  assert rows[-1] == {"source": "total", "role": "", "images": 300,
                      "in_label_set": int(np.sum(composed.labels >= 0)), "on_target": int(composed.on_target.sum())}
  assert rows[1]["on_target"] == rows[2]["on_target"] == 0
  assert 0.6 <= 1 - composed.on_target.mean() <= 0.9  # mostly off target: sketches, cartoons, new classes
  assert "| total |  | 300 |" in pool_lib.composition_markdown(composed)


def test_compose_pool_is_deterministic_and_seeded_per_source():
  a, _ = _sandbox_like_pool(seed=0)
  b, _ = _sandbox_like_pool(seed=0)
  c, _ = _sandbox_like_pool(seed=1)
  swapped, _ = _sandbox_like_pool(seed=0, order=(2, 0, 1))
  for x, y in zip(a.splits, b.splits, strict=True):
    np.testing.assert_array_equal(x.record_ids, y.record_ids)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.splits[0].record_ids, c.splits[0].record_ids)
  # Reordering the sources keeps each source's images (the subset is seeded by the source's name).
  np.testing.assert_array_equal(swapped.splits[1].record_ids, a.splits[0].record_ids)
  np.testing.assert_array_equal(swapped.splits[0].record_ids, a.splits[2].record_ids)


def test_compose_pool_rejects_bad_input():
  names = ["red circle", "blue square"]
  split = _split("d", names, [0, 1, 0, 1])
  with pytest.raises(ValueError, match="asks for 5 images; the split has 4"):
    pool_lib.compose_pool([split], [pool_lib.PoolSource("d", "test", 5)], names)
  with pytest.raises(ValueError, match="no pool image is of a target class"):
    pool_lib.compose_pool([split], [pool_lib.PoolSource("d", "test", 4)], ["green star"])
  with pytest.raises(ValueError, match="one split per pool source"):
    pool_lib.compose_pool([split, split], [pool_lib.PoolSource("d", "test", 4)], names)


def test_selection_make_up_is_the_share_of_each_kind():
  composed, _ = _sandbox_like_pool()
  idx = np.array([0, 1, 2, 130, 131, 250, 299, 5])
  got = pool_lib.selection_make_up(composed, idx)
  assert got["on_target"] == pytest.approx(np.mean([composed.on_target[i] for i in idx]))
  assert got["labelled"] == pytest.approx(np.mean([composed.labels[i] >= 0 for i in idx]))
  assert (got["from photos/train"], got["from sketches/test"], got["from cartoons/test"]) == (0.5, 0.25, 0.25)
  with pytest.raises(ValueError, match="empty selection"):
    pool_lib.selection_make_up(composed, np.array([], int))


def _flag_values(name):
  return [line.split("=", 1)[1].strip() for line in FLAGFILE.read_text().splitlines()
          if line.startswith(f"--{name}=")]


def test_offtarget_flagfile_pool_is_mostly_off_target_by_construction():
  """The shipped set-up: off-target sources are other domains than the target's, and ≥ 60% of the pool is
  off target even if every image of the on-target source were of a target class."""
  (spec,), (target,), (target_classes,) = (_flag_values(n) for n in ("pool_sources", "target_dataset",
                                                                     "target_classes"))
  srcs = pool_lib.parse_pool_sources(spec.split(","))
  on = [s for s in srcs if s.on_target]
  assert len(on) == 1 and target_classes == "base"
  total = sum(s.count for s in srcs)
  assert 1 - on[0].count / total >= 0.6

  def domain(dataset, split):  # the sandbox split's rendering domain, from the registry and the task specs
    spec = registry.get_dataset(dataset)
    return SHAPES.splits[spec.splits[split]].domain

  target_domain = domain(target, "test")
  assert world.DOMAIN_SPECS[target_domain].lamplight_prob == 1.0
  assert domain(on[0].dataset, on[0].split) == "photo"  # the same lamplit photos as the target's v2 domain
  for s in srcs:
    if not s.on_target:
      assert domain(s.dataset, s.split) not in ("photo", target_domain)
    assert registry.get_dataset(s.dataset).classnames == tuple(SHAPES.classnames)
