"""Sources and grain pipelines: every registry entry under tfds mock data, a real array_record dataset,
Dassl folder layouts, CLIP preprocessing against hand-computed oracles, determinism, and bad input."""

import io
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import bayesprompt.data as data
from bayesprompt.data import datasets, pipeline, preprocess, protocols, sources
from bayesprompt.data.registry import Carve, DatasetSpec, FolderLayout

logging.getLogger("absl").setLevel(logging.ERROR)  # mock_data warns once per dataset about missing metadata

SIZE = 32
TFDS_ENTRIES = [
  n
  for n in sorted(datasets.IMAGENET_CROSS_DATASET_TARGETS + datasets.IMAGENET_SHIFT_TARGETS + ("imagenet",))
  if data.get_dataset(n).tfds_name is not None
]


def _first_batch(split, train, batch_size=6, seed=0):
  it = pipeline.make_pipeline(
    split,
    image_size=SIZE,
    batch_size=batch_size,
    train=train,
    seed=seed,
    num_threads=2,
    prefetch_buffer_size=8,
  )
  return next(iter(it))


def _check_batch(batch, split, n):
  assert batch["image"].shape == (n, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert np.isfinite(batch["image"]).all()
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (n,)
  # Labels come with their records: the record's label through the split's map.
  position = {int(r): i for i, r in enumerate(split.record_ids)}
  np.testing.assert_array_equal(batch["label"], split.labels[[position[int(r)] for r in batch["record_id"]]])


@pytest.mark.parametrize("name", TFDS_ENTRIES)
def test_every_tfds_entry_under_mock(name):
  spec = data.get_dataset(name)
  with tfds.testing.mock_data(num_examples=60):
    for split_name in spec.splits:
      split = sources.open_split(name, split_name)
      assert split.num_classes == len(data.resolve_classnames(spec))
      if len(split) == 0:  # 60 mock examples over 100+ classes: a 20% carve of 0-2 per class can be empty.
        assert isinstance(spec.splits[split_name], Carve)
        continue
      assert split.labels.min() >= 0 and split.labels.max() < split.num_classes
      small = split.select(np.arange(min(len(split), 6)))
      _check_batch(_first_batch(small, train=False), small, len(small))
      if split_name == "train":
        batch = _first_batch(small, train=True, batch_size=len(small))
        _check_batch(batch, small, len(small))


@pytest.mark.parametrize(
  "name,indices", [("imagenet_a", datasets.IMAGENET_A_INDICES), ("imagenet_r", datasets.IMAGENET_R_INDICES)]
)
def test_imagenet_a_r_keep_their_200_classes(name, indices):
  with tfds.testing.mock_data(num_examples=80):  # mock labels span all 1000 ImageNet ids
    raw = np.array(
      [
        int(ex["label"])
        for ex in (tfds.data_source(data.get_dataset(name).tfds_name, split="test")[i] for i in range(80))
      ]
    )
    split = sources.open_split(name, "test")
  kept = np.flatnonzero(np.isin(raw, indices))
  assert 0 < len(kept) < 80
  np.testing.assert_array_equal(split.record_ids, kept)
  np.testing.assert_array_equal(split.labels, [list(indices).index(r) for r in raw[kept]])


def test_missing_split_and_source_errors():
  with pytest.raises(ValueError, match=r"has no split 'train'; its splits are \['test'\]"):
    sources.open_split("imagenet_v2", "train")
  with pytest.raises(ValueError, match="not in TFDS; read it with source='folder'"):
    sources.open_split("ucf101", "test", source="tfds")
  with pytest.raises(ValueError, match="no folder layout"):
    sources.open_split("imagenet_a", "test", source="folder")
  with pytest.raises(ValueError, match="unknown source"):
    sources.open_split("dtd", "test", source="s3")
  with pytest.raises(ValueError, match="unknown dataset 'pets'.*oxford_pets"):
    sources.open_split("pets", "test")


def test_base_to_new_under_mock():
  with tfds.testing.mock_data(num_examples=300):
    run = protocols.base_to_new("eurosat", seed=1, num_shots=4)
  assert run.train.classnames == data.resolve_classnames(data.get_dataset("eurosat"))[:5]
  assert run.evals["new"].classnames == data.resolve_classnames(data.get_dataset("eurosat"))[5:]
  np.testing.assert_array_equal(np.bincount(run.train.labels), [4] * 5)
  np.testing.assert_array_equal(np.bincount(run.val.labels), [4] * 5)  # min(K, 4)
  assert set(run.evals) == {"base", "new"} and run.evals["base"].labels.max() == 4


# --------------------------------------------------------------------------------------------------------
# A real TFDS dataset in array_record (Tensor images: preparing an Image feature needs tensorflow).


class BayespromptTestImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
          "label": tfds.features.ClassLabel(names=["red", "green", "blue", "grey"]),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(60, 0), "test": self._generate_examples(16, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = rng.integers(20, 60, size=2)
      yield i, {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": int(i % 4)}


REAL = DatasetSpec(
  name="bp_test_real",
  tfds_name="bayesprompt_test_images:1.0.0",
  splits={"train": Carve("train", 0.25, 1.0), "val": Carve("train", 0.0, 0.25), "test": "test"},
  classnames=("red", "green", "blue", "grey"),
  notes="test fixture",
)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  BayespromptTestImages(data_dir=str(root), file_format="array_record").download_and_prepare()
  data.register_dataset(REAL)
  return str(root)


def test_real_array_record_splits(real_dir, tmp_path):
  train = sources.open_split(REAL, "train", data_dir=real_dir, label_cache_dir=tmp_path)
  val = sources.open_split(REAL, "val", data_dir=real_dir, label_cache_dir=tmp_path)
  test = sources.open_split(REAL, "test", data_dir=real_dir)
  assert len(test) == 16
  np.testing.assert_array_equal(np.bincount(train.labels), [11] * 4)  # 15 per class: round(15·.25) = 4 val
  np.testing.assert_array_equal(np.bincount(val.labels), [4] * 4)
  assert not set(train.record_ids.tolist()) & set(val.record_ids.tolist())
  assert len(list(tmp_path.glob("*.labels.npy"))) == 1  # train and val share the cached label column
  raw = tfds.data_source("bayesprompt_test_images", split="train", data_dir=real_dir)
  for i in (0, 5, 17):
    example = train[i]
    np.testing.assert_array_equal(example["image"], raw[int(train.record_ids[i])]["image"])
    assert example["label"] == raw[int(train.record_ids[i])]["label"]


def test_real_missing_tfds_split(real_dir):
  bad = DatasetSpec(
    name="bp_test_real_bad",
    tfds_name="bayesprompt_test_images:1.0.0",
    splits={"test": "validation"},
    classnames=("a", "b", "c", "d"),
    notes="",
  )
  with pytest.raises(ValueError, match=r"has no split 'validation'.*\['test', 'train'\]"):
    sources.open_split(bad, "test", data_dir=real_dir)
  nowhere = os.path.join(real_dir, "nowhere")
  with pytest.raises(ValueError) as err:
    sources.open_split(REAL, "test", data_dir=nowhere)
  message = str(err.value)
  assert "\n" not in message and "is not prepared in" in message and "never downloads" in message
  assert f"`tfds build bayesprompt_test_images:1.0.0 --file_format=array_record --data_dir={nowhere}`" in message
  assert not os.path.exists(nowhere) or not os.listdir(nowhere)  # nothing fetched or left behind


def test_pipeline_deterministic_per_seed(real_dir):
  split = sources.open_split(REAL, "train", data_dir=real_dir)

  def epoch(seed):
    it = pipeline.make_pipeline(
      split, image_size=SIZE, batch_size=8, train=True, seed=seed, num_epochs=2, num_threads=4
    )
    return list(it)

  a, b, c = epoch(1), epoch(1), epoch(2)
  assert len(a) == (2 * len(split)) // 8  # batches run across the epoch boundary; drop_remainder at the end
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["record_id"], y["record_id"])
    np.testing.assert_array_equal(x["image"], y["image"])
  assert any((x["record_id"] != z["record_id"]).any() for x, z in zip(a, c, strict=True))
  # Each epoch is a permutation of the split, and the two epochs are ordered differently.
  order = np.concatenate([x["record_id"] for x in a])
  first, second = order[: len(split)], order[len(split) :]
  assert sorted(first.tolist()) == sorted(split.record_ids.tolist()) and not np.array_equal(first, second[:8])


def test_eval_pipeline_matches_preprocess_oracle(real_dir):
  split = sources.open_split(REAL, "test", data_dir=real_dir)
  batches = list(pipeline.make_pipeline(split, image_size=SIZE, batch_size=5, train=False, num_threads=3))
  assert [len(b["label"]) for b in batches] == [5, 5, 5, 1]  # in order, last batch kept
  images = np.concatenate([b["image"] for b in batches])
  for i in range(len(split)):
    np.testing.assert_allclose(images[i], preprocess.eval_image(split[i]["image"], SIZE), atol=0)
  padded, n = pipeline.pad_batch(batches[-1], 5)
  assert n == 1 and padded["image"].shape == (5, SIZE, SIZE, 3) and list(padded["label"][1:]) == [-1] * 4


# --------------------------------------------------------------------------------------------------------
# Dassl folder layouts.


# The folder formats, their checks and CoOp's draws on them: tests/test_data_folders.py.


def test_folder_needs_data_dir_and_split_file(tmp_path):
  with pytest.raises(ValueError, match="needs data_dir"):
    sources.open_split("ucf101", "test")
  with pytest.raises(ValueError, match="split_zhou_OxfordPets.json not found"):
    sources.open_split("oxford_pets", "test", data_dir=tmp_path, source="folder")


# --------------------------------------------------------------------------------------------------------
# Preprocessing oracles.


def _normalized(array):
  return (array.astype(np.float32) / 255.0 - preprocess.CLIP_MEAN) / preprocess.CLIP_STD


def test_eval_crop_and_normalisation_oracle():
  image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE + 16, 3), dtype=np.uint8)
  # Short side already SIZE: no resize; the centre crop takes columns 8 .. 8+SIZE.
  np.testing.assert_allclose(
    preprocess.eval_image(image, SIZE), _normalized(image[:, 8 : 8 + SIZE]), atol=1e-6
  )
  tall = np.random.default_rng(1).integers(0, 256, (SIZE + 5, SIZE, 3), dtype=np.uint8)
  # torchvision: top = int(round(5 / 2)) = 2 (Python rounds half to even).
  np.testing.assert_allclose(preprocess.eval_image(tall, SIZE), _normalized(tall[2 : 2 + SIZE]), atol=1e-6)


@pytest.mark.parametrize("shape", [(100, 250), (250, 100), (17, 19), (500, 500)])
def test_eval_resize_short_side(shape):
  pil = Image.new("RGB", shape[::-1], (10, 200, 30))
  resized = preprocess.resize_short_side(pil, SIZE)
  short, long = min(shape), max(shape)
  assert min(resized.size) == SIZE and max(resized.size) == int(SIZE * long / short)
  out = preprocess.eval_image(pil, SIZE)
  np.testing.assert_allclose(out, np.broadcast_to(_normalized(np.array([10, 200, 30])), out.shape), atol=1e-5)


def test_random_resized_crop_box_properties():
  rng = np.random.default_rng(0)
  for _ in range(300):
    w, h = (int(v) for v in rng.integers(20, 400, size=2))
    left, top, cw, ch = preprocess.random_resized_crop_box(w, h, rng)
    assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
  # Fallback (no try fits): a 1 x 100 strip gives the central crop with the aspect ratio clamped to 3/4.
  assert preprocess.random_resized_crop_box(1, 100, rng) == (0, 49, 1, 1)
  areas, ratios = [], []
  for _ in range(400):
    _, _, cw, ch = preprocess.random_resized_crop_box(1000, 1000, rng)
    areas.append(cw * ch / 1e6)
    ratios.append(cw / ch)
  # Areas cover the scale range (rejection of overflowing tries thins out the large ones).
  assert 0.075 <= min(areas) < 0.15 and 0.85 < max(areas) <= 1.0
  assert 0.74 <= min(ratios) and max(ratios) <= 1.34


def test_train_image_flip_oracle_and_determinism():
  image = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  outputs = []
  for seed in range(16):
    # scale (1, 1) on a square image: every try with aspect != 1 overflows, the fallback is the full image.
    out = preprocess.train_image(image, SIZE, np.random.default_rng(seed), scale=(1.0, 1.0))
    np.testing.assert_array_equal(
      out, preprocess.train_image(image, SIZE, np.random.default_rng(seed), scale=(1.0, 1.0))
    )
    flipped = np.allclose(out, _normalized(image[:, ::-1]), atol=1e-6)
    assert flipped or np.allclose(out, _normalized(image), atol=1e-6)
    outputs.append(flipped)
  assert 0 < sum(outputs) < 16  # both happen


def test_decode_formats_and_errors():
  buffer = io.BytesIO()
  Image.new("L", (9, 7), 128).save(buffer, format="PNG")
  assert preprocess.decode_image(buffer.getvalue()).mode == "RGB"
  assert preprocess.decode_image(np.zeros((5, 6, 1), np.uint8)).size == (6, 5)
  assert preprocess.decode_image(np.zeros((5, 6, 4), np.uint8)).mode == "RGB"
  with pytest.raises(ValueError, match="where: cannot decode image \\(4 bytes\\)"):
    preprocess.decode_image(b"\x00\x01\x02\x03", where="where")
  with pytest.raises(ValueError, match="expected encoded bytes or a uint8"):
    preprocess.decode_image(np.zeros((5, 6, 3), np.float32))
  with pytest.raises(ValueError, match="empty image"):
    preprocess.decode_image(np.zeros((0, 6, 3), np.uint8))


def test_pipeline_argument_errors(real_dir):
  split = sources.open_split(REAL, "test", data_dir=real_dir)
  with pytest.raises(ValueError, match="image_size must be a positive int"):
    pipeline.make_pipeline(split, image_size=0, batch_size=2, train=False)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    pipeline.make_pipeline(split, image_size=SIZE, batch_size=-1, train=False)
  with pytest.raises(ValueError, match="empty split"):
    pipeline.make_pipeline(split.select([]), image_size=SIZE, batch_size=2, train=False)
  with pytest.raises(ValueError, match="more than batch_size"):
    pipeline.pad_batch({"label": np.zeros(3, np.int32)}, 2)


def test_folder_layout_is_documented_for_split_json_entries():
  for name in data.dataset_names():
    spec = data.get_dataset(name)
    if spec.folder is not None and spec.folder.reader == "split_json":
      assert spec.folder.split_file.startswith("split_zhou_") and isinstance(spec.folder, FolderLayout)


def test_prepare_hook_supplies_the_data_dir(real_dir):
  calls = []

  def prepare(data_dir):
    calls.append(data_dir)
    return real_dir  # a generated dataset (the sandbox) makes its data here and says where

  spec = DatasetSpec(
    name="bp_test_prepared",
    tfds_name=REAL.tfds_name,
    splits=REAL.splits,
    classnames=REAL.classnames,
    notes="test fixture",
    prepare=prepare,
  )
  assert len(sources.open_split(spec, "test")) == 16 and calls == [None]
