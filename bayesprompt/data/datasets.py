"""The field's 15 benchmark datasets (CoOp/Dassl semantics) as registry entries.

Class names are derived offline: from TFDS metadata (`tfds.builder(name).info.features["label"].names`,
shipped inside the tensorflow-datasets package, no download) cleaned by the rules CoOp's dataset readers
apply, or from the lists in `bayesprompt/data/assets/` where TFDS has no data or other names. Each entry's
`notes` says which partition it follows; bayesprompt/data/README.md has the table.

CoOp's cleaning rules, per reader (CoOp `datasets/*.py`), and `name.replace("_", " ")` in every trainer:
  - Caltech101: drop BACKGROUND_Google and Faces_easy; airplanes/Faces/Leopards/Motorbikes -> singular;
    labels in case-sensitive sorted folder order (Faces, Leopards, Motorbikes, accordion, ...).
  - OxfordPets: breed from the file name, lower-cased.  StanfordCars: year moved to the front.
  - Flowers102: `cat_to_name.json` (TFDS has the same list, with a stray "?" on "pink-yellow dahlia").
  - SUN397: "/a/apartment_building/outdoor" -> "outdoor apartment building" (sub-parts reversed).
  - EuroSAT: NEW_CNAMES ("AnnualCrop" -> "Annual Crop Land", ...).  UCF101: CamelCase split at capitals.
  - ImageNet and its variants: CLIP's cleaned names (assets/imagenet_classnames.txt).
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Sequence

from bayesprompt.data.registry import Carve, DatasetSpec, FolderLayout, register_dataset

# --------------------------------------------------------------------------------------------------------
# Class-name sources.


def _asset_lines(filename: str) -> list[str]:
  text = (
    importlib.resources.files("bayesprompt.data").joinpath("assets", filename).read_text(encoding="utf-8")
  )
  return [line.rstrip("\n") for line in text.splitlines() if line.strip() and not line.startswith("#")]


@functools.cache
def tfds_label_names(tfds_name: str) -> tuple[str, ...]:
  """The TFDS `ClassLabel` names of a builder, from the metadata shipped with tensorflow-datasets."""
  import tensorflow_datasets as tfds  # Imported lazily: it takes seconds and most users never need it.

  return tuple(tfds.builder(tfds_name).info.features["label"].names)


def clean_classname(name: str) -> str:
  """What every CoOp trainer does to a class name before prompting: underscores become spaces."""
  return name.replace("_", " ").strip()


@functools.cache
def imagenet_wnids_and_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
  pairs = [line.split(" ", 1) for line in _asset_lines("imagenet_classnames.txt")]
  return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def imagenet_classnames() -> tuple[str, ...]:
  return imagenet_wnids_and_names()[1]


# ImageNet ids (0..999, sorted-wnid order) of the 200 ImageNet-A classes: hendrycks/natural-adv-examples
# `indices_in_1k` (the keys of `thousand_k_to_200` with a value != -1), ascending, so label i of the
# 200-way problem is the i-th of these -- CoOp's sorted-folder order of the imagenet-a directories.
IMAGENET_A_INDICES: tuple[int, ...] = tuple(int(i) for i in _asset_lines("imagenet_a_indices.txt"))

# ImageNet ids of the 200 ImageNet-R classes: hendrycks/imagenet-r `imagenet_r_wnids` in ImageNet order.
IMAGENET_R_INDICES: tuple[int, ...] = tuple(int(i) for i in _asset_lines("imagenet_r_indices.txt"))


def _subset_names(indices: Sequence[int]) -> tuple[str, ...]:
  names = imagenet_classnames()
  return tuple(names[i] for i in indices)


# --------------------------------------------------------------------------------------------------------
# Per-dataset cleaning (CoOp's readers).

_CALTECH_TFDS = "caltech101:3.0.2"
_CALTECH_IGNORED = ("background_google", "faces_easy")
# TFDS lower-cases Caltech's folder names; these were capitalised on disk, which puts them first in
# Dassl's case-sensitive sort.
_CALTECH_CAPITALISED = ("faces", "leopards", "motorbikes")
_CALTECH_RENAMED = {
  "airplanes": "airplane",
  "faces": "face",
  "leopards": "leopard",
  "motorbikes": "motorbike",
}


@functools.cache
def _caltech_order() -> tuple[int, ...]:
  names = tfds_label_names(_CALTECH_TFDS)
  kept = [i for i, n in enumerate(names) if n not in _CALTECH_IGNORED]
  return tuple(sorted(kept, key=lambda i: (names[i] not in _CALTECH_CAPITALISED, names[i])))


def _caltech_classnames() -> tuple[str, ...]:
  names = tfds_label_names(_CALTECH_TFDS)
  return tuple(clean_classname(_CALTECH_RENAMED.get(names[i], names[i])) for i in _caltech_order())


def _pets_classnames() -> tuple[str, ...]:
  return tuple(clean_classname(n.lower()) for n in tfds_label_names("oxford_iiit_pet:4.0.0"))


def _cars_classnames() -> tuple[str, ...]:
  def year_first(name: str) -> str:
    *model, year = name.split(" ")
    return " ".join([year, *model])

  return tuple(year_first(n) for n in tfds_label_names("cars196:2.1.0"))


def _flowers_classnames() -> tuple[str, ...]:
  return tuple(n.rstrip("?") for n in tfds_label_names("oxford_flowers102:2.1.1"))


def _food_classnames() -> tuple[str, ...]:
  return tuple(clean_classname(n) for n in tfds_label_names("food101:2.0.0"))


def sun397_classname(path: str) -> str:
  """CoOp's SUN397 name rule: "/a/apartment_building/outdoor" -> "outdoor apartment building"."""
  parts = path.strip("/").split("/")[1:]  # Drop the leading letter directory.
  return clean_classname(" ".join(reversed(parts)))


def _sun397_classnames() -> tuple[str, ...]:
  return tuple(sun397_classname(n) for n in tfds_label_names("sun397/standard-part1-120k:4.0.0"))


def _dtd_classnames() -> tuple[str, ...]:
  return tuple(clean_classname(n) for n in tfds_label_names("dtd:3.0.1"))


EUROSAT_NEW_CNAMES = {
  "AnnualCrop": "Annual Crop Land",
  "Forest": "Forest",
  "HerbaceousVegetation": "Herbaceous Vegetation Land",
  "Highway": "Highway or Road",
  "Industrial": "Industrial Buildings",
  "Pasture": "Pasture Land",
  "PermanentCrop": "Permanent Crop Land",
  "Residential": "Residential Buildings",
  "River": "River",
  "SeaLake": "Sea or Lake",
}


def _eurosat_classnames() -> tuple[str, ...]:
  return tuple(EUROSAT_NEW_CNAMES[n] for n in tfds_label_names("eurosat/rgb:2.0.0"))


def _fgvc_classnames() -> tuple[str, ...]:
  return tuple(_asset_lines("fgvc_aircraft_variants.txt"))


def ucf101_classname(action: str) -> str:
  """CoOp's UCF101 rule, split at capitals: "ApplyEyeMakeup" -> "Apply_Eye_Makeup" -> "Apply Eye Makeup"."""
  return clean_classname("_".join(re.findall("[A-Z][^A-Z]*", action)))


def _ucf101_classnames() -> tuple[str, ...]:
  return tuple(ucf101_classname(a) for a in _asset_lines("ucf101_classind.txt"))


# --------------------------------------------------------------------------------------------------------
# The registry entries.

_TRAIN_80 = Carve("train", 0.2, 1.0)  # Dassl's split_trainval(p_val=0.2): val first, train the rest.
_VAL_20 = Carve("train", 0.0, 0.2)

IMAGENET_CROSS_DATASET_TARGETS = (
  "caltech101",
  "oxford_pets",
  "stanford_cars",
  "oxford_flowers",
  "food101",
  "fgvc_aircraft",
  "sun397",
  "dtd",
  "eurosat",
  "ucf101",
)
IMAGENET_SHIFT_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")

SPECS = (
  DatasetSpec(
    name="imagenet",
    tfds_name="imagenet2012:5.1.0",
    splits={"train": "train", "val": "validation", "test": "validation"},
    classnames=imagenet_classnames,
    notes="Same partition as CoOp: train = ILSVRC train, test = val = the 50k validation images "
    "(CoOp validates on the test set and evaluates the final model). Needs the manual ILSVRC "
    "download (TFDS manual_dir).",
  ),
  DatasetSpec(
    name="caltech101",
    tfds_name=_CALTECH_TFDS,
    splits={"train": _TRAIN_80, "val": _VAL_20, "test": "test"},
    classnames=_caltech_classnames,
    label_subset=_caltech_order,
    folder=FolderLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", num_classes=100),
    notes="TFDS: 30 images per class for train (80/20 train/val carve), the rest is test; CoOp's "
    "split_zhou_Caltech101.json is a random 50/20/30 split (use --source=folder for it). Both drop "
    "BACKGROUND_Google and Faces_easy (100 classes) and use CoOp's label order.",
  ),
  DatasetSpec(
    name="oxford_pets",
    tfds_name="oxford_iiit_pet:4.0.0",
    splits={"train": _TRAIN_80, "val": _VAL_20, "test": "test"},
    classnames=_pets_classnames,
    template="a photo of a {}, a type of pet.",
    folder=FolderLayout("oxford_pets", "images", "split_zhou_OxfordPets.json", num_classes=37),
    notes="Official trainval/test as CoOp; TFDS train (= trainval) is carved 80/20 into train/val per class "
    "as Dassl does (different random draw from split_zhou_OxfordPets.json). Test identical.",
  ),
  DatasetSpec(
    name="stanford_cars",
    tfds_name="cars196:2.1.0",
    splits={"train": _TRAIN_80, "val": _VAL_20, "test": "test"},
    classnames=_cars_classnames,
    folder=FolderLayout("stanford_cars", "", "split_zhou_StanfordCars.json", num_classes=196),
    notes="Official train/test as CoOp; TFDS train carved 80/20 into train/val per class as Dassl does. "
    "Test identical.",
  ),
  DatasetSpec(
    name="oxford_flowers",
    tfds_name="oxford_flowers102:2.1.1",
    splits={
      "train": Carve("train+validation", 0.2, 1.0),
      "val": Carve("train+validation", 0.0, 0.2),
      "test": "test",
    },
    classnames=_flowers_classnames,
    template="a photo of a {}, a type of flower.",
    folder=FolderLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", num_classes=102),
    notes="TFDS: the official split (10 train + 10 val per class, 6149 test); train+val (20 per class) is "
    "carved 16/4 into train/val so that 16 shots exist. CoOp's split_zhou_OxfordFlowers.json is a "
    "random 50/20/30 split (use --source=folder for it).",
  ),
  DatasetSpec(
    name="food101",
    tfds_name="food101:2.0.0",
    splits={"train": _TRAIN_80, "val": _VAL_20, "test": "validation"},
    classnames=_food_classnames,
    template="a photo of {}, a type of food.",
    folder=FolderLayout("food-101", "images", "split_zhou_Food101.json", num_classes=101),
    notes="TFDS: the official split; TFDS 'validation' is Food-101's official test set (25,250 images, as "
    "BayesVLM and torchvision use); train carved 80/20. CoOp's split_zhou_Food101.json is a random "
    "50/20/30 split (use --source=folder for it).",
  ),
  DatasetSpec(
    name="fgvc_aircraft",
    tfds_name=None,
    splits={"train": "train", "val": "val", "test": "test"},
    classnames=_fgvc_classnames,
    template="a photo of a {}, a type of aircraft.",
    source="folder",
    folder=FolderLayout("fgvc_aircraft", "images", "", reader="fgvc_variants", num_classes=100),
    notes="Not in TFDS 4.9. Read from the official fgvc-aircraft-2013b data/ directory (variants.txt, "
    "images_variant_{train,val,test}.txt) as CoOp does: the identical partition.",
  ),
  DatasetSpec(
    name="sun397",
    tfds_name="sun397/standard-part1-120k:4.0.0",
    splits={"train": _TRAIN_80, "val": _VAL_20, "test": "test"},
    classnames=_sun397_classnames,
    folder=FolderLayout("sun397", "SUN397", "split_zhou_SUN397.json", num_classes=397),
    notes="TFDS config standard-part1-120k = the official partition 1 (Training_01/Testing_01) that CoOp "
    "uses, with images downscaled to <= 120k pixels; train carved 80/20 as Dassl does. Test has "
    "the same images. split_zhou_SUN397.json (--source=folder) reproduces CoOp's val exactly.",
  ),
  DatasetSpec(
    name="dtd",
    tfds_name="dtd:3.0.1",
    splits={"train": "train", "val": "validation", "test": "test"},
    classnames=_dtd_classnames,
    template="{} texture.",
    folder=FolderLayout("dtd", "images", "split_zhou_DescribableTextures.json", num_classes=47),
    notes="TFDS: the official split 1 (40/40/40 per class). CoOp's split_zhou_DescribableTextures.json is "
    "a random 50/20/30 split (use --source=folder for it).",
  ),
  DatasetSpec(
    name="eurosat",
    tfds_name="eurosat/rgb:2.0.0",
    splits={
      "train": Carve("train", 0.0, 0.5),
      "val": Carve("train", 0.5, 0.7),
      "test": Carve("train", 0.7, 1.0),
    },
    classnames=_eurosat_classnames,
    template="a centered satellite photo of {}.",
    folder=FolderLayout("eurosat", "2750", "split_zhou_EuroSAT.json", num_classes=10),
    notes="TFDS has one split of 27,000 images; it is carved 50/20/30 per class, the proportions of CoOp's "
    "split_zhou_EuroSAT.json but another draw (use --source=folder for CoOp's).",
  ),
  DatasetSpec(
    name="ucf101",
    tfds_name=None,
    splits={"train": "train", "val": "val", "test": "test"},
    classnames=_ucf101_classnames,
    template="a photo of a person doing {}.",
    source="folder",
    folder=FolderLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", num_classes=101),
    notes="TFDS's ucf101 is video (needs tensorflow) and has no mid-frames; CoOp's UCF-101-midframes + "
    "split_zhou_UCF101.json (trainlist01/testlist01, train carved 80/20) is read as is.",
  ),
  DatasetSpec(
    name="imagenet_v2",
    tfds_name="imagenet_v2/matched-frequency:3.0.0",
    splits={"test": "test"},
    classnames=imagenet_classnames,
    notes="matched-frequency, 10,000 images, as CoOp.",
  ),
  DatasetSpec(
    name="imagenet_sketch",
    tfds_name="imagenet_sketch:1.0.0",
    splits={"test": "test"},
    classnames=imagenet_classnames,
    notes="50,889 sketches of the 1000 classes, as CoOp.",
  ),
  DatasetSpec(
    name="imagenet_a",
    tfds_name="imagenet_a:0.1.0",
    splits={"test": "test"},
    classnames=lambda: _subset_names(IMAGENET_A_INDICES),
    label_subset=IMAGENET_A_INDICES,
    notes="200-class subset (TFDS labels are ImageNet-1k ids): a 200-way problem, as CoOp.",
  ),
  DatasetSpec(
    name="imagenet_r",
    tfds_name="imagenet_r:0.2.0",
    splits={"test": "test"},
    classnames=lambda: _subset_names(IMAGENET_R_INDICES),
    label_subset=IMAGENET_R_INDICES,
    notes="200-class subset (TFDS labels are ImageNet-1k ids): a 200-way problem, as CoOp.",
  ),
)

for _spec in SPECS:
  register_dataset(_spec)
