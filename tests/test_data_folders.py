"""Real data as CoOp users have it: Dassl folder layouts + split files, CoOp's few-shot draws, eager checks of
the files, no downloads, no TFDS on folder runs, and prompt learning trained from the split files.

Fake datasets are written here in the real folder formats (oxford_pets, caltech-101, ucf101 with
split_zhou_*.json; fgvc_aircraft with variants.txt + images_variant_*.txt) with the registry's full class
lists and, among the images, grayscale and CMYK JPEGs, a PNG and odd sizes. No real data ships.

Oracles: a transliteration of Dassl's `generate_fewshot_dataset` / `split_dataset_by_label` and CoOp's
`read_split` / `subsample_classes`, run in CoOp's order after `set_random_seed` (Python's global `random`);
Dassl's `read_image` (PIL `Image.open(path).convert("RGB")`) for the decoded pixels.
"""

import json
import os
import random
import re
import socket
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from bayesprompt.data import get_dataset, pipeline, preprocess, protocols, resolve_classnames, sources
from bayesprompt.prompts import engine
from tests.conftest import REPO_ROOT, binary_module

FOLDER_DATASETS = ("oxford_pets", "caltech101", "ucf101", "fgvc_aircraft")
PER_SPLIT = {"train": 2, "val": 1, "test": 1}  # images per class
# (mode, size, format): RGB, grayscale and CMYK JPEGs, a PNG behind a .jpg name, odd and tiny sizes.
IMAGE_KINDS = (
  ("RGB", (23, 17), "JPEG"),
  ("L", (9, 31), "JPEG"),
  ("CMYK", (40, 12), "JPEG"),
  ("RGB", (5, 64), "PNG"),
  ("RGB", (33, 33), "JPEG"),
)


def _write_image(path: str, index: int) -> None:
  mode, size, fmt = IMAGE_KINDS[index % len(IMAGE_KINDS)]
  rng = np.random.default_rng(index)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  rgb.convert(mode).save(path, format=fmt)


def _file_name(classname: str) -> str:
  """The class name as CoOp's split files spell it (CoOp's trainers turn "_" into " ")."""
  return classname.replace(" ", "_")


def make_folder_dataset(root, name: str, per_split=PER_SPLIT, touch_only=False) -> dict:
  """Writes `name` in its Dassl folder format under `root`; returns {split: [(relpath, label, classname)]}."""
  spec = get_dataset(name)
  layout = spec.folder
  dataset_dir = os.path.join(root, layout.dataset_dir)
  image_dir = os.path.join(dataset_dir, layout.image_dir)
  classnames = [_file_name(c) for c in resolve_classnames(spec)]
  rows, index = {}, 0
  for split, count in per_split.items():
    rows[split] = []
    for label, classname in enumerate(classnames):
      for j in range(count):
        if name == "fgvc_aircraft":
          rel = f"{1000000 + index}.jpg"
        elif name == "oxford_pets":
          rel = f"{classname}_{split}{j}.jpg"
        else:
          rel = f"{classname}/{split}_{j:04d}.jpg"
        path = os.path.join(image_dir, rel)
        if touch_only:
          os.makedirs(os.path.dirname(path), exist_ok=True)
          open(path, "wb").close()
        else:
          _write_image(path, index)
        rows[split].append((rel, label, classname))
        index += 1
  if layout.reader == "split_json":
    with open(os.path.join(dataset_dir, layout.split_file), "w") as f:
      json.dump(rows, f)
  else:
    with open(os.path.join(dataset_dir, "variants.txt"), "w") as f:
      f.write("\n".join(classnames) + "\n")
    for split, items in rows.items():
      with open(os.path.join(dataset_dir, f"images_variant_{split}.txt"), "w") as f:
        f.write("".join(f"{rel[:-4]} {classname}\n" for rel, _, classname in items))
  return rows


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A Dassl data root holding the four fake datasets."""
  path = tmp_path_factory.mktemp("dassl_root")
  for name in FOLDER_DATASETS:
    make_folder_dataset(str(path), name)
  return str(path)


def _split_json_path(root, name):
  layout = get_dataset(name).folder
  return os.path.join(root, layout.dataset_dir, layout.split_file)


def _copy_dataset(src_root, dst_root, name):
  import shutil

  layout = get_dataset(name).folder
  shutil.copytree(os.path.join(src_root, layout.dataset_dir), os.path.join(dst_root, layout.dataset_dir))
  return _split_json_path(str(dst_root), name)


# --------------------------------------------------------------------------------------------------------
# Reading the folder formats.


@pytest.mark.parametrize("name", FOLDER_DATASETS)
def test_every_folder_format_reads_as_coop_does(root, name):
  spec = get_dataset(name)
  assert spec.folder.num_classes == len(resolve_classnames(spec))
  for split_name in ("train", "val", "test"):
    split = sources.open_split(name, split_name, data_dir=root, source="folder")
    # CoOp's names after its trainers' "_" -> " " are the registry's names.
    assert split.classnames == resolve_classnames(spec)
    per_class = np.bincount(split.labels)
    np.testing.assert_array_equal(per_class, [PER_SPLIT[split_name]] * spec.folder.num_classes)
  test = sources.open_split(name, "test", data_dir=root, source="folder")
  assert pipeline.verify_images(test, progress=False, num_threads=2) == len(test)
  batch = next(
    iter(pipeline.make_pipeline(test, image_size=16, batch_size=len(IMAGE_KINDS), train=False, num_threads=2))
  )
  assert batch["image"].shape == (len(IMAGE_KINDS), 16, 16, 3) and np.isfinite(batch["image"]).all()


def test_grayscale_cmyk_png_odd_sizes_decode_as_dassls_read_image(root):
  test = sources.open_split("oxford_pets", "test", data_dir=root, source="folder")
  table = sources.read_folder_table("oxford_pets", root)
  modes = set()
  for position in range(len(IMAGE_KINDS)):
    record_id = int(test.record_ids[position])
    path = table.paths["test"][record_id]
    with Image.open(path) as raw:
      modes.add(raw.mode)
      dassl = np.asarray(raw.convert("RGB"))  # Dassl's read_image
    ours = preprocess.decode_image(test[position]["image"], where=path)
    np.testing.assert_array_equal(np.asarray(ours), dassl)
    np.testing.assert_allclose(
      preprocess.eval_image(test[position]["image"], 16), preprocess.eval_image(dassl, 16), atol=0
    )
  assert {"L", "CMYK", "RGB"} <= modes


# --------------------------------------------------------------------------------------------------------
# Few-shot draws: Dassl's, transliterated (the oracle), in CoOp's order.


class Datum:  # dassl.data.datasets.Datum, without the file check
  def __init__(self, impath, label, classname):
    self.impath, self.label, self.classname = impath, label, classname


def dassl_split_dataset_by_label(data_source):
  output = defaultdict(list)
  for item in data_source:
    output[item.label].append(item)
  return output


def dassl_generate_fewshot_dataset(*data_sources, num_shots=-1, repeat=False):
  if num_shots < 1:
    return data_sources[0] if len(data_sources) == 1 else data_sources
  output = []
  for data_source in data_sources:
    tracker = dassl_split_dataset_by_label(data_source)
    dataset = []
    for _, items in tracker.items():
      if len(items) >= num_shots:
        sampled_items = random.sample(items, num_shots)
      elif repeat:
        sampled_items = random.choices(items, k=num_shots)
      else:
        sampled_items = items
      dataset.extend(sampled_items)
    output.append(dataset)
  return output[0] if len(output) == 1 else output


def coop_read_split(filepath, path_prefix):
  with open(filepath) as f:
    split = json.load(f)
  return [
    [Datum(os.path.join(path_prefix, p), int(y), c) for p, y, c in split[s]] for s in ("train", "val", "test")
  ]


def coop_subsample_classes(*args, subsample="all"):
  if subsample == "all":
    return args
  labels = sorted({item.label for item in args[0]})
  m = -(-len(labels) // 2)
  selected = labels[:m] if subsample == "base" else labels[m:]
  relabeler = {y: y_new for y_new, y in enumerate(selected)}
  return [
    [Datum(i.impath, relabeler[i.label], i.classname) for i in dataset if i.label in selected]
    for dataset in args
  ]


def coop_datasets(split_path, image_dir, seed, num_shots, subsample):
  """CoOp train.py: set_random_seed(seed), then the dataset class's __init__ (OxfordPets & co.)."""
  state = random.getstate()
  try:
    random.seed(seed)  # dassl.utils.set_random_seed; numpy / torch seeding does not touch `random`
    train, val, test = coop_read_split(split_path, image_dir)
    train = dassl_generate_fewshot_dataset(train, num_shots=num_shots)
    val = dassl_generate_fewshot_dataset(val, num_shots=min(num_shots, 4))
    return coop_subsample_classes(train, val, test, subsample=subsample)
  finally:
    random.setstate(state)


@pytest.fixture(scope="module")
def pets_sized(tmp_path_factory):
  """A split_zhou_OxfordPets.json of the real one's size (37 classes, ~80/20/99 per class, rows in shuffled
  order) with some classes shorter than 16 train / 4 val images; the image files exist but are empty."""
  path = tmp_path_factory.mktemp("pets_sized")
  spec = get_dataset("oxford_pets")
  names = [_file_name(c) for c in resolve_classnames(spec)]
  rng = np.random.default_rng(7)
  rows = {}
  for split, (low, high) in {"train": (60, 100), "val": (15, 25), "test": (90, 110)}.items():
    items = []
    for label, name in enumerate(names):
      count = int(rng.integers(low, high))
      if split == "train" and label in (3, 30):
        count = 11  # fewer than 16: Dassl takes all 11
      if split == "val" and label in (5, 36):
        count = 2  # fewer than min(K, 4) for K >= 4
      items += [(f"{name}_{split}_{j}.jpg", label, name) for j in range(count)]
    rows[split] = [items[i] for i in rng.permutation(len(items))]
  image_dir = path / "oxford_pets" / "images"
  image_dir.mkdir(parents=True)
  for items in rows.values():
    for rel, _, _ in items:
      (image_dir / rel).touch()
  (path / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(rows))
  return str(path)


def _paths(split, table, split_name):
  return sorted(
    (table.paths[split_name][int(r)], int(y)) for r, y in zip(split.record_ids, split.labels, strict=True)
  )


@pytest.mark.parametrize("seed", (1, 2, 3))
@pytest.mark.parametrize("num_shots", protocols.SHOT_CHOICES)
def test_few_shot_draws_are_coops(pets_sized, seed, num_shots):
  table = sources.read_folder_table("oxford_pets", pets_sized)
  image_dir = os.path.join(pets_sized, "oxford_pets", "images")
  split_path = os.path.join(pets_sized, "oxford_pets", "split_zhou_OxfordPets.json")
  runs = {
    "base": protocols.base_to_new(
      "oxford_pets", seed=seed, num_shots=num_shots, data_dir=pets_sized, source="folder"
    ),
    "all": protocols.few_shot(
      "oxford_pets", seed=seed, num_shots=num_shots, data_dir=pets_sized, source="folder"
    ),
  }
  for subsample, run in runs.items():
    train, val, test = coop_datasets(split_path, image_dir, seed, num_shots, subsample)
    assert _paths(run.train, table, "train") == sorted((d.impath, d.label) for d in train)
    assert _paths(run.val, table, "val") == sorted((d.impath, d.label) for d in val)
    # Dassl's get_lab2cname over the few-shot train set, after the trainers' "_" -> " ".
    lab2cname = {d.label: d.classname.replace("_", " ") for d in train}
    assert run.train.classnames == tuple(lab2cname[y] for y in sorted(lab2cname))
  # Base-to-new's new classes: CoOp's subsample_classes of the test split.
  _, _, new_test = coop_datasets(split_path, image_dir, seed, num_shots, "new")
  assert _paths(runs["base"].evals["new"], table, "test") == sorted((d.impath, d.label) for d in new_test)


def test_dassl_draws_are_not_nested_and_the_nested_sampler_is(pets_sized):
  train = {
    k: set(
      protocols.few_shot(
        "oxford_pets", seed=1, num_shots=k, data_dir=pets_sized, source="folder"
      ).train.record_ids.tolist()
    )
    for k in (4, 16)
  }
  assert not train[4] <= train[16]  # Dassl draws each K afresh
  nested = {
    k: set(
      protocols.few_shot(
        "oxford_pets", seed=1, num_shots=k, data_dir=pets_sized, source="folder", sampler="nested"
      ).train.record_ids.tolist()
    )
    for k in (4, 16)
  }
  assert nested[4] <= nested[16]
  with pytest.raises(
    ValueError, match=r"class 'basset hound' \(label 3\) has 11 examples, fewer than the 16 shots"
  ):
    protocols.few_shot(
      "oxford_pets", seed=1, num_shots=16, data_dir=pets_sized, source="folder", on_short="error"
    )


# --------------------------------------------------------------------------------------------------------
# Bad on-disk data: clear errors naming the file and row, before anything is trained.


def _edit_rows(path, edit):
  with open(path) as f:
    rows = json.load(f)
  edit(rows)
  with open(path, "w") as f:
    json.dump(rows, f)


def _open_all(root, name="oxford_pets"):
  return protocols.base_to_new(name, seed=1, num_shots=1, data_dir=root, source="folder")


@pytest.mark.parametrize(
  "column,expected",
  [
    # Class 1's first train row carries class 0's label: it would silently move to class 0 (and base/new).
    (
      1,
      r"split_zhou_OxfordPets\.json: label 0 has more than one class name: 'abyssinian' on 4 rows, "
      r"'american_bulldog' at train row 2",
    ),
    # Class 1's first train row carries class 2's name: CoOp's pick would depend on hash order.
    (
      2,
      r"split_zhou_OxfordPets\.json: label 1 has more than one class name: 'american_bulldog' on 3 rows, "
      r"'american_pit_bull_terrier' at train row 2",
    ),
  ],
)
def test_label_classname_mismatch_names_the_row(root, tmp_path, column, expected):
  path = _copy_dataset(root, tmp_path, "oxford_pets")
  # train rows: class c at rows 2c, 2c + 1. Row 2 (class 1's first) takes row 0's label or row 4's name.
  _edit_rows(
    path, lambda rows: rows["train"][2].__setitem__(column, rows["train"][0 if column == 1 else 4][column])
  )
  with pytest.raises(ValueError, match=expected):
    _open_all(str(tmp_path))


def _drop_label(rows, splits, label):
  for split in splits:
    rows[split] = [r for r in rows[split] if r[1] != label]


def _set_row(rows, split, row, label, name):
  rows[split][row] = [rows[split][row][0], label, name]


@pytest.mark.parametrize(
  "edit,expected",
  [
    # The last class dropped from the file: it would silently shift the base/new split.
    (
      lambda rows: _drop_label(rows, ("train", "val", "test"), 36),
      r"split 'train' has no rows of label\(s\) 36: the file lists labels 0\.\.35 but the dataset has 37 "
      r"classes: the last classes are missing",
    ),
    # A class missing from one split only.
    (
      lambda rows: _drop_label(rows, ("val",), 3),
      r"split 'val' has no rows of label\(s\) 3 \('basset_hound'\): every class must appear in every split",
    ),
    # A label past the dataset's classes; a label that is not an integer.
    (
      lambda rows: _set_row(rows, "test", 5, 37, "extra"),
      r"split_zhou_OxfordPets\.json: test row 5: label 37 is outside 0\.\.36",
    ),
    (
      lambda rows: _set_row(rows, "test", 5, "three", "x"),
      r"split_zhou_OxfordPets\.json: test row 5: expected \[image path, label >= 0, class name\]",
    ),
  ],
)
def test_dropped_last_class_gaps_and_bad_rows_are_errors(root, tmp_path, edit, expected):
  path = _copy_dataset(root, tmp_path, "oxford_pets")
  _edit_rows(path, edit)
  with pytest.raises(ValueError, match=expected):
    _open_all(str(tmp_path))


def test_split_file_that_is_not_json(root, tmp_path):
  path = _copy_dataset(root, tmp_path, "oxford_pets")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text[:-20])
  with pytest.raises(
    ValueError, match=r"split_zhou_OxfordPets\.json: cannot read the split file: JSONDecodeError"
  ):
    _open_all(str(tmp_path))


def test_fgvc_variant_and_list_errors(root, tmp_path):
  _copy_dataset(root, tmp_path, "fgvc_aircraft")
  listing = tmp_path / "fgvc_aircraft" / "images_variant_val.txt"
  lines = listing.read_text().splitlines()
  listing.write_text("\n".join(lines[:3] + [lines[3].split(" ")[0] + " Boeing 9999"] + lines[4:]) + "\n")
  with pytest.raises(
    ValueError, match=r"images_variant_val\.txt:4: variant 'Boeing 9999' is not in variants\.txt"
  ):
    _open_all(str(tmp_path), "fgvc_aircraft")
  variants = tmp_path / "fgvc_aircraft" / "variants.txt"
  variants.write_text("\n".join(variants.read_text().splitlines()[:-1]) + "\n")
  listing.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"not in variants\.txt|last classes are missing"):
    _open_all(str(tmp_path), "fgvc_aircraft")


def test_missing_image_fails_before_training(root, tmp_path):
  from bayesprompt.train import prompt_run

  path = _copy_dataset(root, tmp_path / "data", "ucf101")
  rows = json.loads(open(path).read())
  missing = os.path.join(os.path.dirname(path), "UCF-101-midframes", rows["test"][50][0])
  os.remove(missing)
  with pytest.raises(ValueError, match=re.escape(f"1 listed image(s) do not exist: test row 50: {missing}")):
    sources.open_split("ucf101", "train", data_dir=tmp_path / "data")
  cfg = prompt_run.PromptRunConfig(
    method="coop",
    dataset="ucf101",
    protocol="base2new",
    num_shots=1,
    data_dir=str(tmp_path / "data"),
    source="folder",
    checkpoint="/nonexistent",
  )
  with pytest.raises(ValueError, match="do not exist"):  # before the checkpoint is even loaded
    prompt_run.run(cfg, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()


def test_truncated_jpeg_errors_name_the_file(root, tmp_path):
  _copy_dataset(root, tmp_path, "caltech101")
  test = sources.open_split("caltech101", "test", data_dir=tmp_path, source="folder")
  table = sources.read_folder_table("caltech101", tmp_path)
  target = table.paths["test"][int(test.record_ids[4])]
  with open(target, "rb") as f:
    data = f.read()
  with open(target, "wb") as f:
    f.write(data[: len(data) // 2])  # a truncated JPEG
  with pytest.raises(
    ValueError,
    match=re.escape(f"caltech101/test: 1 of {len(test)} images cannot be decoded: ")
    + ".*"
    + re.escape(target),
  ):
    pipeline.verify_images(test, progress=False, num_threads=2)
  with pytest.raises(ValueError, match=re.escape(f"caltech101/test: {target}: cannot decode image")):
    list(
      pipeline.make_pipeline(
        test.select(np.arange(8)), image_size=16, batch_size=8, train=False, num_threads=2
      )
    )


# --------------------------------------------------------------------------------------------------------
# Never download; folder runs never touch TFDS.


class NetworkUsed(BaseException):  # BaseException: no `except Exception` in the library can swallow it
  pass


@pytest.fixture
def no_network(monkeypatch):
  """Any socket connection, DNS lookup, TFDS download-manager call or download_and_prepare of a builder
  other than the generated sandbox raises NetworkUsed."""
  import tensorflow_datasets as tfds

  def forbidden(*args, **kwargs):
    raise NetworkUsed(f"network / download attempted: {args[:2]!r}")

  monkeypatch.setattr(socket.socket, "connect", forbidden)
  monkeypatch.setattr(socket.socket, "connect_ex", forbidden)
  monkeypatch.setattr(socket, "create_connection", forbidden)
  monkeypatch.setattr(socket, "getaddrinfo", forbidden)
  for method in ("download", "download_and_extract", "download_kaggle_data", "extract", "iter_archive"):
    if hasattr(tfds.download.DownloadManager, method):
      monkeypatch.setattr(tfds.download.DownloadManager, method, forbidden)
  original = tfds.core.DatasetBuilder.download_and_prepare

  def prepare(self, *args, **kwargs):
    if type(self).__name__ != "SandboxWorld":  # the sandbox is generated, not downloaded
      forbidden(type(self).__name__)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)


def test_no_source_path_downloads(no_network, root, tmp_path):
  from bayesprompt.bayesvlm import hessian
  from bayesprompt.data import dataset_names

  empty = tmp_path / "empty"
  empty.mkdir()
  for name in dataset_names():
    spec = get_dataset(name)
    if spec.prepare is not None:  # generated (the sandbox): covered by every sandbox test
      continue
    resolve_classnames(spec)  # class names from the metadata shipped with tfds
    for split in spec.splits:
      if spec.tfds_name is not None:
        with pytest.raises(ValueError) as err:
          sources.open_split(name, split, data_dir=empty, source="tfds")
        message = str(err.value)
        assert "\n" not in message and f"`tfds build {spec.tfds_name} --file_format=array_record" in message
        assert "never downloads" in message
        if spec.folder is not None:
          assert f"--source=folder and --data_dir=<root holding {spec.folder.dataset_dir}/" in message
      if spec.folder is not None:
        with pytest.raises(ValueError, match="not found"):
          sources.open_split(name, split, data_dir=empty, source="folder")
    if spec.folder is not None and name in FOLDER_DATASETS:
      assert len(sources.open_split(name, "test", data_dir=root, source="folder")) > 0
  with pytest.raises(
    ValueError, match=r"prepare it with `tfds build coco_captions --file_format=array_record"
  ):
    hessian.open_caption_pairs("coco_captions", "train", data_dir=str(empty))
  assert [p for p in empty.rglob("*") if p.is_file()] == []  # nothing fetched or left in the data folder


def test_dataset_prepared_in_another_format_says_rebuild(monkeypatch):
  import types

  import tensorflow_datasets as tfds

  class TFRecordBuilder:  # what tfds.builder gives for a dataset prepared by tfds.load (TFRecord files)
    data_dir = "/data/oxford_iiit_pet/4.0.0"
    info = types.SimpleNamespace(file_format=tfds.core.FileFormat.TFRECORD)

    def is_prepared(self):
      return True

  monkeypatch.setattr(tfds, "builder", lambda *args, **kwargs: TFRecordBuilder())
  message = sources.tfds_unavailable_message(
    get_dataset("oxford_pets"), "test", "/data", NotImplementedError()
  )
  assert (
    "TFDS oxford_iiit_pet:4.0.0 is prepared as tfrecord in /data/oxford_iiit_pet/4.0.0, and random access "
    "needs ArrayRecord files: rebuild with `tfds build oxford_iiit_pet:4.0.0 --file_format=array_record "
    "--data_dir=/data`"
  ) in message


def test_folder_runs_import_no_tfds_and_log_no_noise(root):
  script = (
    "import sys, logging\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "from bayesprompt.data import protocols\n"
    f"run = protocols.base_to_new('ucf101', seed=1, num_shots=1, data_dir={root!r}, source='folder')\n"
    f"protocols.few_shot('caltech101', seed=2, num_shots=1, data_dir={root!r}, source='folder')\n"
    f"protocols.zero_shot('fgvc_aircraft', data_dir={root!r})\n"
    "assert len(run.train) == 51, len(run.train)\n"
    "print('tfds imported:', 'tensorflow_datasets' in sys.modules)\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tfds imported: False" in proc.stdout
  for noise in ("Failed to load", "differ from the registry", "WARNING"):
    assert noise not in proc.stderr, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------
# CoOp runs from the split files through the binaries.


@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
  """A tiny random CLIP whose word tokenizer covers the fake datasets' prompts (open_clip layout)."""
  import jax

  from bayesprompt import clip
  from bayesprompt.clip.tokenizer import WordTokenizer

  words = {"x", "a", "photo", "of"}
  for name in FOLDER_DATASETS:
    spec = get_dataset(name)
    for prompt in engine.render_prompts(resolve_classnames(spec), spec.template):
      words.update(re.findall(r"[^\s.,]+", prompt.lower()))
  directory = tmp_path_factory.mktemp("word_clip") / "clip"
  tokenizer = WordTokenizer(sorted(words))
  config = clip.CLIPConfig(
    vision=clip.VisionConfig(image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_dim=64),
    text=clip.TextConfig(
      vocab_size=tokenizer.vocab_size, context_length=32, width=32, layers=1, heads=2, mlp_dim=64
    ),
    embed_dim=32,
    tokenizer="words.json",
  )
  clip.save_checkpoint(directory, config, clip.init_params(config, jax.random.key(0)))
  tokenizer.to_json(directory / "words.json")
  return str(directory)


def _run_binary(module_name, argv):
  from absl import flags

  with binary_module(module_name) as module:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["test", *argv])
    try:
      module.main([])
    finally:
      flags.FLAGS.unparse_flags()


def _check_run(run_dir, root, dataset, splits):
  stored = json.loads((run_dir / "results.json").read_text())
  assert stored["config"]["source"] == "folder" and stored["config"]["dataset"] == dataset
  assert set(stored["results"]) == set(splits)
  for metrics in stored["results"].values():
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["nll"]) and metrics["num_examples"] > 0
  layout = get_dataset(dataset).folder
  assert all(f"from folder {os.path.join(root, layout.dataset_dir)}" in d for d in stored["data"].values())


@pytest.mark.usefixtures("fast_compiles")
@pytest.mark.parametrize(
  "binary,dataset,protocol,variant",
  [
    pytest.param(
      "experiments.prompt_learning",
      "oxford_pets",
      "base2new",
      ["--method=coop", "--verify_images"],
      id="prompt_learning-oxford_pets",
    ),
    pytest.param(
      "experiments.ove_pg",
      "ucf101",
      "few_shot",
      ["--methods=coop", "--with_ce=false", "--ove_modes=corrected"],
      id="ove_pg-ucf101",
    ),
    # Two more compiles for the other two folder formats: the opt-in tier.
    pytest.param(
      "experiments.ove_pg",
      "caltech101",
      "base2new",
      ["--methods=coop", "--with_ce=false", "--ove_modes=faithful"],
      id="ove_pg-caltech101",
      marks=pytest.mark.slow,
    ),
    pytest.param(
      "experiments.prompt_learning",
      "fgvc_aircraft",
      "base2new",
      ["--method=coop"],
      id="prompt_learning-fgvc_aircraft",
      marks=pytest.mark.slow,
    ),
  ],
)
def test_binary_trains_coop_from_the_split_files(
  root, word_checkpoint, tmp_path, monkeypatch, binary, dataset, protocol, variant
):
  """`--runlocal` CoOp through the binary on a fake folder dataset: trains and evaluates from its files
  (into a fresh smoke directory under the working directory's runs/runlocal, whatever --run_dir says)."""
  monkeypatch.chdir(tmp_path)
  run_root = tmp_path / "runs" / "runlocal"
  _run_binary(
    binary,
    [
      "--runlocal",
      *variant,
      "--hparams=n_ctx=4",
      f"--checkpoint={word_checkpoint}",
      f"--dataset={dataset}",
      f"--protocol={protocol}",
      "--source=folder",
      f"--data_dir={root}",
      "--num_shots=1",
      "--batch_size=8",
      "--eval_batch_size=16",
      "--seeds=3",
      "--run_dir=runs/real",
      "--noprogress",
    ],
  )
  (run_dir,) = [p.parent for p in run_root.glob("*/*/*/seed3/results.json")]
  assert not (tmp_path / "runs" / "real").exists()
  _check_run(run_dir, root, dataset, {"base", "new"} if protocol == "base2new" else {"all"})
