"""Registry entries: class counts, CoOp's cleaned names, templates, subsets -- all offline metadata."""

import pytest

import bayesprompt.data as data
from bayesprompt.data import datasets

# Class counts as the field reports them (CoOp Table / DATASETS.md).
EXPECTED_CLASSES = {
  "imagenet": 1000,
  "caltech101": 100,
  "oxford_pets": 37,
  "stanford_cars": 196,
  "oxford_flowers": 102,
  "food101": 101,
  "fgvc_aircraft": 100,
  "sun397": 397,
  "dtd": 47,
  "eurosat": 10,
  "ucf101": 101,
  "imagenet_v2": 1000,
  "imagenet_sketch": 1000,
  "imagenet_a": 200,
  "imagenet_r": 200,
}

# DESIGN §6 / CoOp's readers: the hand-crafted template per dataset.
EXPECTED_TEMPLATES = {
  "oxford_pets": "a photo of a {}, a type of pet.",
  "oxford_flowers": "a photo of a {}, a type of flower.",
  "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
  "dtd": "{} texture.",
  "eurosat": "a centered satellite photo of {}.",
  "food101": "a photo of {}, a type of food.",
  "ucf101": "a photo of a person doing {}.",
}


def test_all_fifteen_registered():
  assert set(EXPECTED_CLASSES) <= set(data.dataset_names())


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_entry_classnames_and_template(name):
  spec = data.get_dataset(name)
  names = data.resolve_classnames(spec)  # also checks: non-empty, distinct, non-blank
  assert len(names) == EXPECTED_CLASSES[name]
  assert all("_" not in n for n in names)
  assert spec.template == EXPECTED_TEMPLATES.get(name, "a photo of a {}.")
  assert set(spec.splits) in ({"train", "val", "test"}, {"test"})
  assert spec.notes, "every entry documents its partition"
  if spec.tfds_name is None:
    assert spec.source == "folder" and spec.folder is not None
  if spec.folder is not None:  # the class count a split file must list (checked without importing TFDS)
    assert spec.folder.num_classes == EXPECTED_CLASSES[name]
  assert spec.few_shot_sampler == "dassl"  # CoOp's draw for the field's datasets
  subset = data.resolve_label_subset(spec)
  if subset is not None:
    assert len(subset) == len(names) and len(set(subset)) == len(subset)


# Hand-checked against CoOp's readers (CoOp datasets/*.py, Dassl read_and_split_data / split files).
@pytest.mark.parametrize(
  "name,index,expected",
  [
    ("caltech101", 0, "face"),
    ("caltech101", 1, "leopard"),
    ("caltech101", 2, "motorbike"),
    ("caltech101", 3, "accordion"),
    ("caltech101", 4, "airplane"),
    ("caltech101", 99, "yin yang"),
    ("oxford_pets", 0, "abyssinian"),
    ("oxford_pets", 1, "american bulldog"),
    ("stanford_cars", 0, "2000 AM General Hummer SUV"),
    ("stanford_cars", 195, "2012 smart fortwo Convertible"),
    ("oxford_flowers", 0, "pink primrose"),
    ("oxford_flowers", 59, "pink-yellow dahlia"),
    ("food101", 0, "apple pie"),
    ("dtd", 0, "banded"),
    ("eurosat", 0, "Annual Crop Land"),
    ("eurosat", 9, "Sea or Lake"),
    ("sun397", 0, "abbey"),
    ("fgvc_aircraft", 0, "707-320"),
    ("fgvc_aircraft", 99, "Yak-42"),
    ("ucf101", 0, "Apply Eye Makeup"),
    ("ucf101", 100, "Yo Yo"),
    ("imagenet", 0, "tench"),
    ("imagenet", 999, "toilet paper"),
    ("imagenet_a", 0, "stingray"),
    ("imagenet_r", 0, "goldfish"),
  ],
)
def test_cleaned_names(name, index, expected):
  assert data.resolve_classnames(data.get_dataset(name))[index] == expected


def test_sun397_and_ucf_rules():
  assert datasets.sun397_classname("/a/apartment_building/outdoor") == "outdoor apartment building"
  assert datasets.sun397_classname("/b/bakery/shop") == "shop bakery"
  assert datasets.ucf101_classname("HandstandPushups") == "Handstand Pushups"
  assert "outdoor apartment building" in data.resolve_classnames(data.get_dataset("sun397"))


def test_caltech_drops_background_and_faces_easy():
  names = data.resolve_classnames(data.get_dataset("caltech101"))
  assert not {"background google", "faces easy", "faces", "background"} & set(names)
  tfds_names = datasets.tfds_label_names("caltech101:3.0.2")
  order = data.resolve_label_subset(data.get_dataset("caltech101"))
  assert [tfds_names[i] for i in order[:5]] == ["faces", "leopards", "motorbikes", "accordion", "airplanes"]


def test_imagenet_subsets_are_the_200_class_lists():
  wnids, names = datasets.imagenet_wnids_and_names()
  assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
  a = data.resolve_label_subset(data.get_dataset("imagenet_a"))
  r = data.resolve_label_subset(data.get_dataset("imagenet_r"))
  assert list(a) == sorted(a) and list(r) == sorted(r)  # label i = i-th class in ImageNet order (CoOp)
  # Spot checks against hendrycks' lists: ImageNet-A starts stingray, goldfinch, junco; R starts goldfish.
  assert [wnids[i] for i in a[:3]] == ["n01498041", "n01531178", "n01534433"]
  assert [wnids[i] for i in r[:3]] == ["n01443537", "n01484850", "n01494475"]
  assert wnids[a[-1]] == "n12267677" and wnids[r[-1]] == "n12267677"
  assert data.resolve_classnames(data.get_dataset("imagenet_a")) == tuple(names[i] for i in a)


def test_unknown_dataset_lists_known_ones():
  with pytest.raises(ValueError, match="unknown dataset 'imagenet21k'.*caltech101.*oxford_pets"):
    data.get_dataset("imagenet21k")


def test_register_conflict_and_bad_class_lists():
  spec = data.get_dataset("dtd")
  data.register_dataset(spec)  # same spec again: fine
  import dataclasses

  with pytest.raises(ValueError, match="already registered"):
    data.register_dataset(dataclasses.replace(spec, template="{}."))
  with pytest.raises(ValueError, match="empty"):
    data.resolve_classnames(dataclasses.replace(spec, name="empty_toy", classnames=()))
  with pytest.raises(ValueError, match="duplicate class name 'dog' at positions 0 and 2"):
    data.check_classnames(["dog", "cat", "dog"])


def test_splits_are_named_from_the_one_benchmark_split_list():
  """`DatasetSpec.splits` keys and the Dassl split-file lists share `registry.BENCHMARK_SPLITS`; another key
  (a TFDS split name used as a benchmark split by mistake) is refused at construction."""
  from bayesprompt.data import registry, sources

  assert registry.BENCHMARK_SPLITS == ("train", "val", "test")
  assert sources.BENCHMARK_SPLITS is registry.BENCHMARK_SPLITS
  for name in data.dataset_names():
    assert set(data.get_dataset(name).splits) <= set(registry.BENCHMARK_SPLITS), name
  message = "'oops': splits must map some of .* got keys \\['test', 'validation'\\]"
  with pytest.raises(ValueError, match=message):
    registry.DatasetSpec(name="oops", tfds_name="x", splits={"validation": "validation", "test": "test"},
                         classnames=["a", "b"])
