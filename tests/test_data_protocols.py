"""Protocols: base/new split arithmetic, few-shot sampling, carving, template rendering (labels only)."""

import math
import warnings

import numpy as np
import pytest

from bayesprompt.data import protocols, sources
from bayesprompt.data.registry import Carve
from bayesprompt.prompts import engine


@pytest.mark.parametrize("num_classes", [2, 3, 10, 37, 47, 101, 397, 1000])
def test_base_new_split_arithmetic(num_classes):
  base, new = protocols.base_new_classes(num_classes)
  assert len(base) == math.ceil(num_classes / 2)  # CoOp: m = ceil(n / 2), base = labels[:m]
  assert base + new == list(range(num_classes))
  assert len(new) == num_classes - len(base) and len(new) >= 1


def test_base_new_needs_two_classes():
  with pytest.raises(ValueError, match="at least 2 classes"):
    protocols.base_new_classes(1)


def _labels(counts, seed=0):
  """A shuffled label vector with counts[c] examples of class c."""
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
  return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("sampler", protocols.SAMPLERS)
@pytest.mark.parametrize("k", protocols.SHOT_CHOICES)
def test_few_shot_exact_counts(k, sampler):
  labels = _labels([20, 16, 33, 17, 40])
  positions = protocols.sample_few_shot(labels, k, seed=1, sampler=sampler)
  assert len(set(positions.tolist())) == len(positions)  # no repeats
  np.testing.assert_array_equal(np.bincount(labels[positions], minlength=5), np.full(5, k))


@pytest.mark.parametrize("sampler", protocols.SAMPLERS)
def test_few_shot_deterministic_per_seed_and_seeds_differ(sampler):
  labels = _labels([30] * 8)
  a = protocols.sample_few_shot(labels, 4, seed=1, sampler=sampler)
  np.testing.assert_array_equal(a, protocols.sample_few_shot(labels, 4, seed=1, sampler=sampler))
  draws = {tuple(protocols.sample_few_shot(labels, 4, seed=s, sampler=sampler)) for s in (1, 2, 3)}
  assert len(draws) == 3


def test_nested_sampler_is_the_draw_of_the_recorded_sandbox_tables():
  """The sandbox's default: per class c the first K of default_rng([seed, c]).permutation(its positions)."""
  from bayesprompt.data import get_dataset

  assert get_dataset("sandbox_shapes").few_shot_sampler == "nested"
  labels = _labels([9, 30, 17], seed=5)
  expected = np.sort(
    np.concatenate(
      [np.random.default_rng([4, c]).permutation(np.flatnonzero(labels == c))[:8] for c in range(3)]
    )
  )
  np.testing.assert_array_equal(protocols.sample_few_shot(labels, 8, seed=4, sampler="nested"), expected)


def test_nested_sampler_is_nested_and_independent_of_other_classes():
  labels = _labels([25] * 6)
  sets = [
    set(protocols.sample_few_shot(labels, k, seed=2, sampler="nested").tolist())
    for k in protocols.SHOT_CHOICES
  ]
  assert all(a <= b for a, b in zip(sets, sets[1:], strict=False))  # 1-shot ⊂ 2-shot ⊂ ... ⊂ 16-shot
  # Dropping class 5 does not change the draw of classes 0..4.
  kept = np.flatnonzero(labels < 5)
  sub = kept[protocols.sample_few_shot(labels[kept], 4, seed=2, num_classes=5, sampler="nested")]
  full = protocols.sample_few_shot(labels, 4, seed=2, sampler="nested")
  np.testing.assert_array_equal(sub, full[labels[full] < 5])


@pytest.mark.parametrize("sampler", protocols.SAMPLERS)
def test_few_shot_short_class_takes_what_there_is_or_names_class_and_count(sampler, caplog):
  labels = _labels([20, 3, 20])
  with pytest.raises(ValueError, match=r"class 'cat' \(label 1\) has 3 examples, fewer than the 4 shots"):
    protocols.sample_few_shot(
      labels, 4, seed=1, classnames=["dog", "cat", "cow"], on_short="error", sampler=sampler
    )
  # The default is Dassl's repeat=False: all 3 of the short class, said in a warning.
  positions = protocols.sample_few_shot(labels, 4, seed=1, classnames=["dog", "cat", "cow"], sampler=sampler)
  np.testing.assert_array_equal(np.bincount(labels[positions]), [4, 3, 4])
  np.testing.assert_array_equal(np.sort(positions[labels[positions] == 1]), np.flatnonzero(labels == 1))
  assert "'cat' (label 1): 3" in caplog.text


def test_few_shot_missing_class_and_bad_arguments():
  with pytest.raises(ValueError, match="label 2 has 0 examples"):
    protocols.sample_few_shot(np.array([0, 0, 1, 1]), 1, seed=1, num_classes=3)
  with pytest.raises(ValueError, match="positive int"):
    protocols.sample_few_shot(np.array([0, 1]), 0, seed=1)
  with pytest.raises(ValueError, match="empty"):
    protocols.sample_few_shot(np.zeros(0, int), 1, seed=1)
  with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
    protocols.sample_few_shot(np.array([0, 1, 5]), 1, seed=1, num_classes=2)
  with pytest.raises(ValueError, match="sampler must be one of"):
    protocols.sample_few_shot(np.array([0, 1]), 1, seed=1, sampler="coop")
  with pytest.raises(ValueError, match="on_short must be one of"):
    protocols.sample_few_shot(np.array([0, 1]), 1, seed=1, on_short="repeat")


@pytest.mark.parametrize("counts", [[10, 11, 7, 25], [5] * 10, [1, 2, 3]])
def test_carve_matches_dassl_trainval_split(counts):
  labels = _labels(counts, seed=3)
  val = sources.carve_indices(labels, 0.0, 0.2)
  train = sources.carve_indices(labels, 0.2, 1.0)
  assert not set(val.tolist()) & set(train.tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([val, train])), np.arange(len(labels)))
  # Dassl: n_val = round(n * 0.2) per class (Python rounding).
  np.testing.assert_array_equal(
    np.bincount(labels[val], minlength=len(counts)), [round(n * 0.2) for n in counts]
  )
  np.testing.assert_array_equal(val, sources.carve_indices(labels, 0.0, 0.2))  # fixed partition


def test_carve_three_way_partition():
  labels = _labels([100, 60, 41])
  parts = [sources.carve_indices(labels, a, b) for a, b in [(0, 0.5), (0.5, 0.7), (0.7, 1.0)]]
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
  np.testing.assert_array_equal(np.bincount(labels[parts[0]]), [50, 30, round(41 * 0.5)])


def test_carve_rejects_bad_fractions():
  with pytest.raises(ValueError, match="0 <= start < stop <= 1"):
    Carve("train", 0.5, 0.5)
  with pytest.raises(ValueError, match="0 <= start < stop <= 1"):
    Carve("train", -0.1, 0.5)


def _toy_split(labels, classnames):
  """A LabeledSplit over an in-memory store whose 'image' is the record id."""
  labels = np.asarray(labels)
  return sources.LabeledSplit(
    dataset="toy",
    split="train",
    classnames=classnames,
    template="a photo of a {}.",
    read_record=lambda i: (np.full((4, 4, 3), i, np.uint8), int(labels[i])),
    raw_labels=lambda: labels,
    record_ids=np.arange(len(labels)),
    label_map=np.arange(len(classnames)),
    description="toy",
  )


def test_labeled_split_relabel_and_select():
  labels = _labels([3, 4, 5, 6, 7], seed=4)
  split = _toy_split(labels, ["a", "b", "c", "d", "e"])
  base, new = protocols.subsample_classes(split, "base"), protocols.subsample_classes(split, "new")
  assert base.classnames == ("a", "b", "c") and new.classnames == ("d", "e")
  assert len(base) == 12 and len(new) == 13
  for sub, offset in ((base, 0), (new, 3)):
    for i in range(len(sub)):
      example = sub[i]
      assert example["label"] == labels[example["record_id"]] - offset  # relabelled from 0
      assert example["image"][0, 0, 0] == example["record_id"]
  np.testing.assert_array_equal(new.labels, labels[new.record_ids] - 3)
  picked = protocols.few_shot_split(new, 2, seed=1)
  np.testing.assert_array_equal(np.bincount(picked.labels), [2, 2])
  with pytest.raises(ValueError, match="positions must lie"):
    split.select([len(split)])
  with pytest.raises(ValueError, match="distinct labels"):
    split.relabel([0, 0])
  with pytest.raises(ValueError, match="subsample must be"):
    protocols.subsample_classes(split, "old")


def test_render_prompts_templates():
  assert engine.render_prompts(
    ["american_pit_bull_terrier", "pug"], "a photo of a {}, a type of pet."
  ) == ["a photo of a american pit bull terrier, a type of pet.", "a photo of a pug, a type of pet."]
  assert engine.render_prompts(["banded"], "{} texture.") == ["banded texture."]


@pytest.mark.parametrize(
  "template", ["a photo of a dog.", "a {} of a {}.", "a {0}.", "a {name}.", "{} {{x}}"]
)
def test_render_prompts_rejects_bad_templates(template):
  with pytest.raises(ValueError, match="exactly one"):
    engine.render_prompts(["dog"], template)


def test_render_prompts_rejects_bad_class_lists():
  with pytest.raises(ValueError, match="empty"):
    engine.render_prompts([], "a photo of a {}.")
  with pytest.raises(ValueError, match="duplicate class name 'sea lion'"):
    engine.render_prompts(["sea lion", "dog", "sea_lion"], "a photo of a {}.")  # equal after cleaning
  with pytest.raises(ValueError, match="non-blank"):
    engine.render_prompts(["dog", "  "], "a photo of a {}.")
  with pytest.raises(TypeError, match="single str"):
    engine.render_prompts("dog", "a photo of a {}.")


def test_shots_must_be_the_fields_choices():
  with warnings.catch_warnings():
    with pytest.raises(ValueError, match=r"one of \(1, 2, 4, 8, 16\)"):
      protocols.base_to_new("oxford_pets", num_shots=3)
