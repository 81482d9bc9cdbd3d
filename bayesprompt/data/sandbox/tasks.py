"""What the sandbox datasets contain: the caption corpus and the composition classification tasks.

Each classification task's classes are the compositions of two attributes (e.g. colour x shape = 64). Class
ids are ordered so that the field's base-to-new rule (base = the first ceil(C/2) labels, new = the rest)
splits them into two halves in which every value of both attributes appears, and no composition appears
on both sides: for colour x shape, (colour c, shape s) is base iff (s - c) mod 8 < 4 — a cyclic Latin
design in which every colour meets four shapes on each side and every shape meets four colours on each
side. Inside each half, classes are in lexicographic order of (first attribute, second attribute).

The `catalogue` task (world 1.3.0) is the field's regime, next to colour_shape's "misleading prior" one: a
strong zero-shot prior that prompt learning beats on the base classes and loses on the new ones. Its classes
are not a full grid but a shop's catalogue: the base products differ from each other mainly by colour (the
circle and the star in all eight paints, the square in the four lamp-shifted ones: yellow, cyan, purple,
pink), the new products mainly by shape (square, triangle, cross, ring and crescent, each in the four
lamp-stable paints: red, orange, green, blue); 20 + 20 classes (chance 5%), no composition on both sides. Its photos were
taken in mixed light (half of them lamplit, domain "mixed"). The hand-crafted prompt reads the base classes
well on daylight photos and by their apparent colour under the lamp; a context learned on base corrects the
light and is trained only to tell colours apart. On the new classes there is nothing for the light correction
to fix (their paints keep their names under the lamp), shape decides, and the context tuned on colour
differences loses part of what the hand-crafted prompt knew about shape. The two parts separate: with daylight
photos only ("mixed" with lamplight_prob 0), zero-shot is 74.0 / 62.8 and CoOp 75.8 / 56.5 (probe, seed 1):
the lamp makes the room on base, the attribute split makes the loss on new.
Measured with the shipped CLIP, 16 shots, seeds 1-3, on the prepared test split:
  zero-shot ("a photo of a {}.") 55.40 base / 61.60 new;
  CoOp (experiments/flags/coop_sandbox_catalogue.flags, the sandbox recipe) 67.53 ± 1.26 / 53.77 ± 0.65;
  probe on cached features (`python -m experiments.sandbox_regime --task=catalogue`): CoOp 70.2 / 52.1,
  67.4 / 53.4, 68.9 / 54.4; nearest class mean of the 16 shots 57.4-60.5 / 49.4-52.5.

Generation is deterministic: every chunk of every split draws from its own generator, seeded by
(world seed, task, split, chunk), so the bytes do not depend on the order in which splits are built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from bayesprompt.data.sandbox import world

CHUNK = 1024  # images rendered per vectorised call


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """One split: its domain and its size (per class for tasks, in total for the caption corpus)."""

  domain: str
  count: int


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A classification task over compositions of two attributes.

  Attributes:
    name: builder config name.
    first / second: attribute names (keys of `world.ATTRIBUTES`); the class name is "<first> <second>"
      in caption words ("red circle").
    is_base: (first id, second id) -> the composition is a base class.
    template: the dataset's hand-crafted prompt.
    splits: split name -> SplitSpec (count = images per class).
    is_class: (first id, second id) -> the composition is a class of the task; None: every composition is
      (a full grid).
  """

  name: str
  first: str
  second: str
  is_base: Callable[[int, int], bool]
  template: str
  splits: dict[str, SplitSpec]
  is_class: Callable[[int, int], bool] | None = None

  @property
  def compositions(self) -> list[tuple[int, int]]:
    """(first id, second id) of every class, in label order: base classes, then new."""
    pairs = [(a, b) for a in range(len(world.ATTRIBUTES[self.first]))
             for b in range(len(world.ATTRIBUTES[self.second]))
             if self.is_class is None or self.is_class(a, b)]
    return [p for p in pairs if self.is_base(*p)] + [p for p in pairs if not self.is_base(*p)]

  @property
  def classnames(self) -> list[str]:
    names_a, names_b = world.ATTRIBUTES[self.first], world.ATTRIBUTES[self.second]
    return [f"{names_a[a]} {names_b[b]}" for a, b in self.compositions]

  @property
  def num_base(self) -> int:
    return sum(self.is_base(a, b) for a, b in self.compositions)


_STANDARD_SPLITS = {"train": SplitSpec("photo", 40), "validation": SplitSpec("photo", 10),
                    "test": SplitSpec("photo", 50)}
_SHIFTED_SPLITS = {"test_v2": SplitSpec("v2", 25), "test_sketch": SplitSpec("sketch", 25),
                   "test_a": SplitSpec("hard", 25), "test_r": SplitSpec("rendition", 25)}

TASKS: dict[str, TaskSpec] = {
    "colour_shape": TaskSpec("colour_shape", "colour", "shape", lambda c, s: (s - c) % 8 < 4,
                             "a photo of a {}.", {**_STANDARD_SPLITS, **_SHIFTED_SPLITS}),
    # 4 x 8 and 3 x 8 grids: a parity (checkerboard) design keeps every value of both attributes on both
    # sides (a cyclic design would leave some shapes with only new textures/sizes).
    "texture_shape": TaskSpec("texture_shape", "texture", "shape", lambda t, s: (s + t) % 2 == 0,
                              "a photo of a {}.", dict(_STANDARD_SPLITS)),
    "size_shape": TaskSpec("size_shape", "size", "shape", lambda z, s: (s + z) % 2 == 0,
                           "a photo of a {}.", dict(_STANDARD_SPLITS)),
}

# The catalogue (see the module docstring): colours whose name the lamp changes (world.APPARENT_UNDER_LAMP)
# and those it keeps; base shapes and the new ones.
LAMP_SHIFTED_COLOURS = tuple(c for c, name in enumerate(world.COLOURS)
                             if world.APPARENT_UNDER_LAMP[c] != name)
LAMP_STABLE_COLOURS = tuple(c for c, name in enumerate(world.COLOURS) if world.APPARENT_UNDER_LAMP[c] == name)
CATALOGUE_BASE_SHAPES = tuple(world.SHAPES.index(s) for s in ("circle", "star"))  # in every colour
CATALOGUE_SHIFTED_SHAPE = world.SHAPES.index("square")  # in the lamp-shifted colours only
# In the lamp-stable colours only (so the square is a base class in some colours and a new one in others).
CATALOGUE_NEW_SHAPES = tuple(world.SHAPES.index(s)
                             for s in ("square", "triangle", "cross", "ring", "crescent"))


def _catalogue_is_base(colour: int, shape: int) -> bool:
  # A new class's shape may be a base shape (the square): its colour then tells the halves apart.
  return shape in CATALOGUE_BASE_SHAPES or (shape == CATALOGUE_SHIFTED_SHAPE
                                            and colour in LAMP_SHIFTED_COLOURS)


def _catalogue_is_class(colour: int, shape: int) -> bool:
  is_new = shape in CATALOGUE_NEW_SHAPES and colour in LAMP_STABLE_COLOURS
  return _catalogue_is_base(colour, shape) or is_new


TASKS["catalogue"] = TaskSpec(
    "catalogue", "colour", "shape", _catalogue_is_base, "a photo of a {}.",
    {"train": SplitSpec("mixed", 40), "validation": SplitSpec("mixed", 10), "test": SplitSpec("mixed", 50)},
    is_class=_catalogue_is_class)

CAPTION_SPLITS = {"train": SplitSpec("pretrain", 60_000), "validation": SplitSpec("pretrain", 2_000)}
CAPTIONS_PER_IMAGE = 4  # extra phrasings stored with each pretraining image (`captions` field)

_TASK_IDS = {"captions": 0, "colour_shape": 1, "texture_shape": 2, "size_shape": 3, "catalogue": 4}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "test_v2": 3, "test_sketch": 4, "test_a": 5, "test_r": 6}


_LABEL_STREAM = 1 << 30  # the stream of the label order, apart from the chunk streams 0, 1, ...


def _chunk_rng(seed: int, task: str, split: str, chunk: int) -> np.random.Generator:
  return np.random.default_rng([seed, _TASK_IDS[task], _SPLIT_IDS[split], chunk])


def generate(task: str, split: str, *, seed: int = 0, count: int | None = None,
             chunk: int = CHUNK) -> Iterator[dict[str, np.ndarray | list[str]]]:
  """Generates a split chunk by chunk.

  Args:
    task: "captions" or a key of TASKS.
    split: a split of that task.
    seed: the world seed.
    count: overrides the split size (images in total for captions, per class for tasks) — for tests.
    chunk: images per chunk (part of what the bytes depend on; keep the default).

  Yields:
    Dicts with `image` uint8 [n, 32, 32, 3], int32 [n] attribute ids (`shape`, `colour`, `texture`,
    `size`, `background`, `style`, `light`), `label` int32 [n] (tasks only; -1 for captions), `caption` (list of n
    str) and `captions` (list of n lists of CAPTIONS_PER_IMAGE str).
  """
  if task == "captions":
    splits = CAPTION_SPLITS
  elif task in TASKS:
    splits = TASKS[task].splits
  else:
    raise ValueError(f"unknown sandbox task {task!r}; expected 'captions' or one of {sorted(TASKS)}")
  if split not in splits:
    raise ValueError(f"task {task!r} has no split {split!r}; splits: {sorted(splits)}")
  if chunk <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  spec = splits[split]
  count = spec.count if count is None else count
  if count <= 0:
    raise ValueError(f"count must be positive, got {count}")

  if task == "captions":
    total, labels = count, None
  else:
    task_spec = TASKS[task]
    num_classes = len(task_spec.compositions)
    total = count * num_classes
    # Class-balanced labels in a seeded random order (the order of examples within the split).
    labels = _chunk_rng(seed, task, split, _LABEL_STREAM).permutation(np.repeat(np.arange(num_classes), count))
    pairs = np.asarray(task_spec.compositions)

  sizes = {name: len(values) for name, values in world.ATTRIBUTES.items()}
  for index, start in enumerate(range(0, total, chunk)):
    n = min(chunk, total - start)
    rng = _chunk_rng(seed, task, split, index)
    attrs = {name: rng.integers(0, sizes[name], n) for name in ("shape", "colour", "texture", "size")}
    if labels is not None:
      label = labels[start:start + n].astype(np.int32)
      attrs[task_spec.first] = pairs[label, 0]
      attrs[task_spec.second] = pairs[label, 1]
    else:
      label = np.full(n, -1, np.int32)
    params = world.sample_nuisances(rng, spec.domain, **attrs)
    images = world.render(params)
    captions = [world.captions(rng, params) for _ in range(1 + CAPTIONS_PER_IMAGE)]
    yield {
        "image": images, "label": label,
        **{name: params[name].astype(np.int32) for name in world.ATTRIBUTES},
        "caption": captions[0], "captions": [list(c) for c in zip(*captions[1:], strict=True)],
    }
