"""The sandbox world (DESIGN §7): a generated image-caption world and the small CLIP pretrained on it.

Importing this package (which does not import TFDS: the builder module is loaded on first use)
  * makes the TFDS builder `sandbox_world` available (configs captions / colour_shape / texture_shape /
    size_shape / catalogue; registered with TFDS when `builder` is imported, which reading a sandbox dataset
    does);
  * registers the classification datasets in the data registry:
      sandbox_shapes          colour x shape, 64 classes (labels 0-31 base, 32-63 new), train/val/test
      sandbox_shapes_v2       its test set with re-sampled, shifted nuisances     (plays ImageNet-V2)
      sandbox_shapes_sketch   outlines only                                        (plays ImageNet-Sketch)
      sandbox_shapes_a        heavy noise, low contrast, clutter                   (plays ImageNet-A)
      sandbox_shapes_r        cartoons on unusual saturated backgrounds            (plays ImageNet-R)
      sandbox_textures        texture x shape, 32 classes (cross-dataset target)
      sandbox_sizes           size x shape, 24 classes (cross-dataset target)
      sandbox_catalogue       colour x shape catalogue, 20 base (told apart by colour) + 20 new (by shape),
                              mixed light: the field's regime (strong zero-shot, CoOp up on base, down on new)
  * registers the CLIP config "sandbox" and the shipped checkpoint "sandbox"
    (`clip.load_checkpoint("sandbox")`, bayesprompt/assets/sandbox_clip/).

The data are generated on first use into $BAYESPROMPT_DATA_DIR or ~/.cache/bayesprompt/tensorflow_datasets
(about 10 s for a classification config, about a minute for the caption corpus).
"""

import functools
import importlib

from bayesprompt.data.registry import DatasetSpec, register_dataset
from bayesprompt.data.sandbox import model, tasks, world

NAME = "sandbox_world"  # The TFDS builder's name: SandboxWorld, snake-cased by TFDS.
_BUILDER_EXPORTS = ("SandboxConfig", "SandboxWorld", "data_source", "default_data_dir", "prepare")


def __getattr__(name: str):
  # The builder subclasses a TFDS class: import it (and TFDS) only when someone needs it, so that runs on
  # other data (a Dassl folder) never import TFDS.
  if name in _BUILDER_EXPORTS or name == "builder":
    builder = importlib.import_module("bayesprompt.data.sandbox.builder")
    return builder if name == "builder" else getattr(builder, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _generated_data_dir(task: str, data_dir: str | None) -> str:
  """The registry's `prepare` hook: generates the task's config if needed (never downloads); its data root."""
  from bayesprompt.data.sandbox import builder

  return str(builder.prepare(task, data_dir).data_dir_root)


_NOTES = ("Generated sandbox world (DESIGN §7): classes are attribute compositions; labels are ordered so "
          "that base = the first half and new = the second half share every attribute but no composition.")

_NOTES_BY_TASK = {"catalogue": (
    "Generated sandbox world (DESIGN §7), catalogue task: base classes differ mainly by colour, new ones by "
    "shape; photos half lamplit (see bayesprompt/data/sandbox/tasks.py).")}

_CLASSIFICATION = {
    "sandbox_shapes": "colour_shape",
    "sandbox_textures": "texture_shape",
    "sandbox_sizes": "size_shape",
    "sandbox_catalogue": "catalogue",
}
_SHIFTED = {"sandbox_shapes_v2": "test_v2", "sandbox_shapes_sketch": "test_sketch",
            "sandbox_shapes_a": "test_a", "sandbox_shapes_r": "test_r"}

DATASETS: dict[str, DatasetSpec] = {}
for _name, _task in _CLASSIFICATION.items():
  _spec = tasks.TASKS[_task]
  DATASETS[_name] = register_dataset(DatasetSpec(
      name=_name, tfds_name=f"{NAME}/{_task}", splits={"train": "train", "val": "validation", "test": "test"},
      classnames=tuple(_spec.classnames), template=_spec.template, notes=_NOTES_BY_TASK.get(_task, _NOTES),
      prepare=functools.partial(_generated_data_dir, _task), few_shot_sampler="nested",
      # Flip only: a random-resized crop of a 32-px composition often cuts the object out of view (measured:
      # CoOp on sandbox_shapes base 52.3% with (1, 1) vs 49.8% with (0.5, 1) and 45.6% with the field's
      # (0.08, 1)).
      train_crop_scale=(1.0, 1.0)))
for _name, _split in _SHIFTED.items():
  _spec = tasks.TASKS["colour_shape"]
  DATASETS[_name] = register_dataset(DatasetSpec(
      name=_name, tfds_name=f"{NAME}/colour_shape", splits={"test": _split},
      classnames=tuple(_spec.classnames), template=_spec.template,
      prepare=functools.partial(_generated_data_dir, "colour_shape"), few_shot_sampler="nested",
      notes=f"Shifted test split {_split!r} of sandbox_shapes. " + _NOTES))

# The sandbox's two base-to-new regimes (the README's main job runs both; tasks.py states the mechanisms).
REGIMES = {"sandbox_shapes": "misleading prior: weak zero-shot, lamplit photos",
           "sandbox_catalogue": "the papers' regime: strong zero-shot, base differs by colour, new by shape"}

# The sandbox's stand-ins for the field's transfer protocols (prompt_run uses them when no targets are given).
CROSS_DATASET_TARGETS = ("sandbox_textures", "sandbox_sizes")
SHIFT_TARGETS = tuple(_SHIFTED)

model.register()

__all__ = ["CROSS_DATASET_TARGETS", "DATASETS", "REGIMES", "SHIFT_TARGETS", "NAME", "SandboxConfig",
           "SandboxWorld", "data_source", "default_data_dir", "model", "prepare", "tasks", "world"]
