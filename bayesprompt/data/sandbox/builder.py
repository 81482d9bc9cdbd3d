"""TFDS builder of the sandbox world: `tfds.builder("sandbox_world/colour_shape")`.

Generated, not downloaded: `download_and_prepare` renders every split from the world seed (no network, no
tensorflow; `tfds.features.Tensor`/`Text`/`ClassLabel` fields serialise without it) into ArrayRecord
files, so `tfds.data_source` reads them with random access. Preparing happens on first use: the registry
entries' `prepare` hook and `data_source()` here call `prepare()` (bayesprompt opens TFDS with
download=False, so nothing else would).

Configs: "captions" (the pretraining corpus: train 60k / validation 2k image-caption pairs over all
compositions) and one per classification task in `tasks.TASKS` ("colour_shape" with the shifted test
splits test_v2 / test_sketch / test_a / test_r, "texture_shape", "size_shape", "catalogue").

Data directory: `data_dir` if given, else $BAYESPROMPT_DATA_DIR, else ~/.cache/bayesprompt/tensorflow_datasets
(not TFDS's ~/tensorflow_datasets: this data is a cache that can be regenerated at any time).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from bayesprompt.data.sandbox import tasks, world

DATA_DIR_ENV = "BAYESPROMPT_DATA_DIR"


def default_data_dir() -> str:
  """$BAYESPROMPT_DATA_DIR, else ~/.cache/bayesprompt/tensorflow_datasets."""
  return os.environ.get(DATA_DIR_ENV) or str(pathlib.Path.home() / ".cache" / "bayesprompt" / "tensorflow_datasets")


@dataclasses.dataclass
class SandboxConfig(tfds.core.BuilderConfig):
  """A sandbox dataset: `task` is "captions" or a key of `tasks.TASKS`; `seed` the world seed;
  `count` overrides every split's size (per class for tasks, in total for captions) — for tests."""

  task: str = "colour_shape"
  seed: int = 0
  count: int | None = None


def _configs() -> list[SandboxConfig]:
  configs = [SandboxConfig(name="captions", task="captions",
                           description="Pretraining corpus: image-caption pairs over all compositions.")]
  for name, spec in tasks.TASKS.items():
    configs.append(SandboxConfig(
        name=name, task=name,
        description=f"{spec.first} x {spec.second} classification; labels 0..{spec.num_base - 1} are base."))
  return configs


class SandboxWorld(tfds.core.GeneratorBasedBuilder):
  """The sandbox world (see the module docstring)."""

  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Captions name the colour less often (0.45, was 0.75): fewer colour-shape compositions.",
                   "1.2.0": "Lamplight: the benchmark's photos are lamplit (a warm cast), 30% of the corpus's photos "
                            "are; their captions name the light half of the time (and then the true colour), "
                            "otherwise the apparent colour; new `light` field.",
                   "1.3.0": "New config `catalogue` (the field's base-to-new regime: base classes told "
                            "apart by colour, new ones by shape, photos in mixed light, domain `mixed`); the "
                            "other configs' bytes are unchanged."}
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = "colour_shape"

  def __init__(self, *, data_dir: str | None = None, file_format: str | None = None, **kwargs):
    super().__init__(data_dir=data_dir or default_data_dir(), file_format=file_format or "array_record",
                     **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    features = {
        "image": tfds.features.Tensor(shape=(world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8),
        "caption": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text(), length=tasks.CAPTIONS_PER_IMAGE),
        **{name: tfds.features.ClassLabel(names=list(values)) for name, values in world.ATTRIBUTES.items()},
    }
    supervised_keys = None
    if config.task != "captions":
      features["label"] = tfds.features.ClassLabel(names=tasks.TASKS[config.task].classnames)
      supervised_keys = ("image", "label")
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised_keys, homepage="https://github.com/bayesprompt (generated, DESIGN.md §7)")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    config = self.builder_config
    splits = tasks.CAPTION_SPLITS if config.task == "captions" else tasks.TASKS[config.task].splits
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split: str):
    config = self.builder_config
    index = 0
    for chunk in tasks.generate(config.task, split, seed=config.seed, count=config.count):
      for i in range(len(chunk["image"])):
        example = {
            "image": chunk["image"][i], "caption": chunk["caption"][i], "captions": chunk["captions"][i],
            **{name: int(chunk[name][i]) for name in world.ATTRIBUTES},
        }
        if config.task != "captions":
          example["label"] = int(chunk["label"][i])
        yield index, example
        index += 1

  def download_and_prepare(self, *, download_dir=None, download_config=None, file_format=None):
    # Never look for a prepared copy on GCS: there is none, and the lookup needs the network.
    download_config = dataclasses.replace(download_config or tfds.download.DownloadConfig(),
                                          try_download_gcs=False)
    return super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                        file_format=file_format)


def get_builder(config: str | SandboxConfig = "colour_shape", data_dir: str | None = None) -> SandboxWorld:
  """The builder of one config (a name of `SandboxWorld.BUILDER_CONFIGS` or a `SandboxConfig`)."""
  return SandboxWorld(config=config, data_dir=data_dir)


def prepare(config: str | SandboxConfig = "colour_shape", data_dir: str | None = None) -> SandboxWorld:
  """Generates the config's files if they are not there yet, and returns its builder.

  Several processes may prepare into one data directory at once (pytest-xdist workers, two runs started
  together): an exclusive lock on `<data_dir>/.sandbox_prepare.lock` makes one generate while the others wait,
  and the builder is made under the lock so that a waiter reads the finished dataset's info."""
  directory = pathlib.Path(data_dir or default_data_dir()).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".sandbox_prepare.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    builder = get_builder(config, data_dir)
    builder.download_and_prepare()
  return builder


def data_source(config: str | SandboxConfig, split: str, data_dir: str | None = None):
  """Random-access reader of one split (`tfds.data_source` semantics), preparing the config on first use."""
  return prepare(config, data_dir).as_data_source(split=split)
