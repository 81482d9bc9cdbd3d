"""The sandbox world: generator determinism, base/new design, captions vs attributes, rendering, TFDS reads."""

import colorsys
import hashlib
import math
import pathlib

import numpy as np
import pytest

from bayesprompt.clip.tokenizer import WordTokenizer
from bayesprompt.data import registry
from bayesprompt.data.sandbox import builder, tasks, world

TINY = 2  # images per class in tiny builder configs


def _generate(task, split, seed=0, count=2):
  chunks = list(tasks.generate(task, split, seed=seed, count=count, chunk=64))
  return {k: (np.concatenate([c[k] for c in chunks]) if isinstance(chunks[0][k], np.ndarray)
              else sum((c[k] for c in chunks), [])) for k in chunks[0]}


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("task,split", [("colour_shape", "test_a"), ("captions", "train"),
                                        ("size_shape", "train"), ("catalogue", "test")])
def test_generation_is_deterministic_in_the_seed(task, split):
  a, b = _generate(task, split, seed=3), _generate(task, split, seed=3)
  assert a["image"].tobytes() == b["image"].tobytes()
  assert a["caption"] == b["caption"] and a["captions"] == b["captions"]
  for key in world.ATTRIBUTES:
    np.testing.assert_array_equal(a[key], b[key])
  c = _generate(task, split, seed=4)
  assert a["image"].tobytes() != c["image"].tobytes()


# sha256 of (images, labels, captions) of small generated splits, recorded with world 1.2.0 (commit 174fb1f,
# numpy 2.4.6) before the catalogue task and the "mixed" domain were added: a new task must not move a byte of
# the existing ones (their shipped results and the pretrained CLIP's corpus depend on them).
_WORLD_1_2_DIGESTS = {
    ("colour_shape", "test"): "37b9f7aaf7fdcd26e4f1dd89aed0330e3d296cd1e8d109fa632bc737b092f8c6",
    ("colour_shape", "test_sketch"): "dfda919fdf71f87c1d205e1303955d134c0f769b24e32828bbce3159e8c48c37",
    ("texture_shape", "train"): "e6e508fe80fde80f2d050814a51587acb21821527fd51fa09ec8a9002db899dc",
    ("size_shape", "validation"): "d2dea8f6b652690b1928342eb8472c424501f705f9474e33b62d05559a9106a3",
    ("captions", "train"): "3bd4d514e9829d7052f54b1e9e4226e97aa378e5b0b5473a552dcd86ce1dbb8b",
}


@pytest.mark.parametrize("task,split", sorted(_WORLD_1_2_DIGESTS))
def test_existing_tasks_bytes_are_unchanged(task, split):
  digest = hashlib.sha256()
  for chunk in tasks.generate(task, split, seed=0, count=64 if task == "captions" else 2, chunk=64):
    digest.update(chunk["image"].tobytes())
    digest.update(chunk["label"].tobytes())
    digest.update("\n".join(chunk["caption"]).encode())
  assert digest.hexdigest() == _WORLD_1_2_DIGESTS[(task, split)]


def test_splits_do_not_share_streams():
  train, test = _generate("colour_shape", "train"), _generate("colour_shape", "test")
  assert train["image"].tobytes() != test["image"].tobytes()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  """The tiny colour_shape config prepared twice, in two directories."""
  config = builder.SandboxConfig(name="colour_shape_tiny", task="colour_shape", count=TINY)
  dirs = [tmp_path_factory.mktemp(f"data{i}") for i in range(2)]
  builders = [builder.prepare(config, data_dir=str(d)) for d in dirs]
  return config, dirs, builders


def test_builder_same_seed_gives_identical_bytes(tiny_dirs):
  _, dirs, _ = tiny_dirs

  def digests(root: pathlib.Path):
    files = sorted(p for p in root.rglob("*.array_record*"))
    assert files, f"no array_record files under {root}"
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

  first, second = digests(dirs[0]), digests(dirs[1])
  assert len(first) == 7  # train, validation, test and the four shifted test splits
  assert first == second


def test_data_source_reads_every_split(tiny_dirs):
  config, dirs, builders = tiny_dirs
  spec = tasks.TASKS["colour_shape"]
  info = builders[0].info
  assert list(info.features["label"].names) == spec.classnames
  assert set(info.splits.keys()) == set(spec.splits)
  for split, split_spec in spec.splits.items():
    source = builder.data_source(config, split, data_dir=str(dirs[0]))
    assert len(source) == TINY * 64
    labels = np.array([source[i]["label"] for i in range(len(source))])
    np.testing.assert_array_equal(np.bincount(labels, minlength=64), np.full(64, TINY))
    example = source[0]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (32, 32, 3)
    colour, shape = spec.compositions[example["label"]]
    assert (example["colour"], example["shape"]) == (colour, shape)
    expected_style = {"photo": "photo", "v2": "photo", "sketch": "sketch", "hard": "cluttered",
                      "rendition": "cartoon"}[split_spec.domain]
    assert world.STYLES[example["style"]] == expected_style


def test_tfds_data_source_by_name(tiny_dirs):
  import tensorflow_datasets as tfds

  _, dirs, _ = tiny_dirs
  source = tfds.data_source("sandbox_world", split="test_r", data_dir=str(dirs[0]),
                            builder_kwargs={"config": builder.SandboxConfig(name="colour_shape_tiny",
                                                                            task="colour_shape", count=TINY)})
  assert len(source) == TINY * 64


def test_prepare_waits_for_another_process_preparing_the_same_directory(tmp_path):
  """Concurrent preparers (pytest-xdist workers, two runs) take turns on `<data_dir>/.sandbox_prepare.lock`:
  while another holder has it, `prepare` neither writes nor returns; once it is released, it generates."""
  import fcntl
  import threading

  config = builder.SandboxConfig(name="colour_shape_locked", task="colour_shape", count=1)
  finished = []
  with open(tmp_path / ".sandbox_prepare.lock", "a") as held:  # another open file: flock conflicts with it
    fcntl.flock(held, fcntl.LOCK_EX)
    waiter = threading.Thread(target=lambda: finished.append(builder.prepare(config, data_dir=str(tmp_path))))
    waiter.start()
    waiter.join(timeout=2.0)
    assert waiter.is_alive() and not finished
    assert not list(tmp_path.rglob("*.array_record*")), "generated while another preparer held the lock"
  waiter.join(timeout=300)
  assert not waiter.is_alive() and len(finished) == 1
  assert len(builder.data_source(config, "test_r", data_dir=str(tmp_path))) == 64


# ------------------------------------------------------------------------------------------ base / new


@pytest.mark.parametrize("task", sorted(name for name, spec in tasks.TASKS.items() if spec.is_class is None))
def test_base_new_split_shares_attributes_not_compositions(task):
  spec = tasks.TASKS[task]
  pairs = spec.compositions
  n_first, n_second = len(world.ATTRIBUTES[spec.first]), len(world.ATTRIBUTES[spec.second])
  # Every composition is a class, exactly once.
  assert sorted(pairs) == [(a, b) for a in range(n_first) for b in range(n_second)]
  # The field's rule: base = the first ceil(C/2) labels.
  num_base = math.ceil(len(pairs) / 2)
  assert spec.num_base == num_base
  base, new = set(pairs[:num_base]), set(pairs[num_base:])
  assert not base & new
  for side in (base, new):
    assert {a for a, _ in side} == set(range(n_first)), f"{task}: a {spec.first} value is missing on one side"
    assert {b for _, b in side} == set(range(n_second)), f"{task}: a {spec.second} value is missing on one side"
  assert all(spec.is_base(*p) for p in base) and not any(spec.is_base(*p) for p in new)
  names = spec.classnames
  assert len(set(names)) == len(names)
  assert names[0] == f"{world.ATTRIBUTES[spec.first][pairs[0][0]]} {world.ATTRIBUTES[spec.second][pairs[0][1]]}"


def test_catalogue_halves_differ_along_different_attributes():
  """The catalogue's mechanism is in its class list: base classes differ mainly by colour (every colour, three
  shapes), new ones by shape (five shapes, only the colours the lamp keeps); the one shape on both sides (the
  square) comes in lamp-shifted colours in base and lamp-stable ones in new."""
  spec = tasks.TASKS["catalogue"]
  pairs = spec.compositions
  assert len(pairs) == 40 and spec.num_base == math.ceil(len(pairs) / 2) == 20  # chance 5% per half
  assert len(set(pairs)) == len(pairs) and len(set(spec.classnames)) == len(pairs)
  base, new = pairs[:20], pairs[20:]
  assert all(spec.is_base(*p) for p in base) and not any(spec.is_base(*p) for p in new)
  base_colours, base_shapes = {c for c, _ in base}, {s for _, s in base}
  new_colours, new_shapes = {c for c, _ in new}, {s for _, s in new}
  assert base_colours == set(range(len(world.COLOURS))) and len(base_shapes) == 3
  assert len(new_colours) == 4 and len(new_shapes) == 5
  assert base_shapes & new_shapes == {world.SHAPES.index("square")}
  # New colours: exactly those the lamp leaves with their name (test_apparent_colours_are_the_nearest_hues_...
  # checks APPARENT_UNDER_LAMP against the rendered hues), i.e. nothing for a light correction to fix there.
  stable = {c for c, name in enumerate(world.COLOURS) if world.APPARENT_UNDER_LAMP[c] == name}
  assert new_colours == stable == {world.COLOURS.index(n) for n in ("red", "orange", "green", "blue")}
  # Every lamp-shifted colour is a base colour of every base shape, and none is a new colour.
  for shape in base_shapes:
    colours = {c for c, s in base if s == shape}
    assert colours >= set(range(len(world.COLOURS))) - stable
  assert {c for c, s in base if s == world.SHAPES.index("square")}.isdisjoint(new_colours)
  # Inside each half, lexicographic (colour, shape) order, as the grid tasks.
  assert base == sorted(base) and new == sorted(new)


def test_catalogue_splits_sizes_and_mixed_light():
  spec = tasks.TASKS["catalogue"]
  assert {k: (v.domain, v.count) for k, v in spec.splits.items()} == {
      "train": ("mixed", 40), "validation": ("mixed", 10), "test": ("mixed", 50)}
  data = _generate("catalogue", "validation", count=None)
  assert len(data["label"]) == 40 * 10
  np.testing.assert_array_equal(np.bincount(data["label"], minlength=40), np.full(40, 10))
  pairs = np.asarray(spec.compositions)
  np.testing.assert_array_equal(data["colour"], pairs[data["label"], 0])
  np.testing.assert_array_equal(data["shape"], pairs[data["label"], 1])
  assert (data["style"] == world.STYLES.index("photo")).all()
  # Half the photos lamplit (binomial, 4 sigma), in both halves.
  lamplit = data["light"] == world.LIGHTS.index("lamplight")
  for half in (data["label"] < 20, data["label"] >= 20):
    assert lamplit[half].mean() == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / half.sum()))


def test_registered_datasets_match_the_builder():
  import bayesprompt.data.sandbox  # noqa: F401  (registers)

  for name, (task, split) in {"sandbox_shapes": ("colour_shape", "test"), "sandbox_textures": ("texture_shape", "test"),
                              "sandbox_sizes": ("size_shape", "test"),
                              "sandbox_catalogue": ("catalogue", "test"),
                              "sandbox_shapes_a": ("colour_shape", "test_a")}.items():
    spec = registry.get_dataset(name)
    assert spec.tfds_name == f"sandbox_world/{task}"
    assert spec.splits["test"] == split
    assert list(spec.classnames) == tasks.TASKS[task].classnames
    assert "{}" in spec.template


# ------------------------------------------------------------------------------------------ captions

_WORD_TO_VALUE = {}
for _attr, _table in (("shape", world.SHAPE_WORDS), ("colour", world.COLOUR_WORDS), ("texture", world.TEXTURE_WORDS),
                      ("size", world.SIZE_WORDS)):
  for _value, _words in enumerate(_table):
    for _word in _words:
      _WORD_TO_VALUE[_word] = (_attr, _value)


_LIGHT_PHRASES = tuple(world._LAMP_PREFIXES) + tuple(world._LAMP_SUFFIXES)


def test_captions_agree_with_attributes():
  data = _generate("captions", "train", count=600)
  tokenizer = WordTokenizer(world.vocabulary(), unknown="error")
  mentioned = {"shape": 0, "colour": 0}
  for i, text in enumerate(data["caption"] + [c for group in data["captions"] for c in group]):
    j = i if i < len(data["caption"]) else (i - len(data["caption"])) // tasks.CAPTIONS_PER_IMAGE
    tokenizer.encode(text)  # every caption word is in the vocabulary
    words = text.rstrip(".").split()
    # A lamplit photo whose caption does not name the light is described by its apparent colour.
    apparent = (data["light"][j] == world.LIGHTS.index("lamplight")
                and not any(phrase in text for phrase in _LIGHT_PHRASES))
    seen = set()
    for word in words:
      if word in _WORD_TO_VALUE:
        attr, value = _WORD_TO_VALUE[word]
        expected = data[attr][j]
        if attr == "colour" and apparent:
          expected = world.COLOURS.index(world.APPARENT_UNDER_LAMP[expected])
        assert expected == value, f"caption {text!r} says {attr}={word!r} but the image has {data[attr][j]}"
        seen.add(attr)
    assert seen & {"shape", "colour"}, f"caption {text!r} names neither shape nor colour"
    for attr in mentioned:
      mentioned[attr] += attr in seen
  # Captions mention attributes only partly (the point of the corpus): each with its probability, plus the
  # rule that a caption naming neither shape nor colour names one of them (a fair coin).
  total = len(data["caption"]) * (1 + tasks.CAPTIONS_PER_IMAGE)
  p_shape, p_colour = world.MENTION_PROBS["shape"], world.MENTION_PROBS["colour"]
  neither = (1 - p_shape) * (1 - p_colour)
  for attr, p in (("shape", p_shape + neither / 2), ("colour", p_colour + neither / 2)):
    tolerance = 4 * math.sqrt(p * (1 - p) / len(data["caption"]))  # 4 sigma of the per-image rate
    assert mentioned[attr] / total == pytest.approx(p, abs=tolerance), attr


def test_captions_name_the_light_only_of_lamplit_photos():
  data = _generate("captions", "train", count=1200)
  lamplit = data["light"] == world.LIGHTS.index("lamplight")
  named = np.array([any(phrase in text for phrase in _LIGHT_PHRASES) for text in data["caption"]])
  # Reporting bias: daylight is never named; lamplight with its probability.
  assert not named[~lamplit].any()
  p = world.LAMP_MENTION_PROB
  tolerance = 4 * math.sqrt(p * (1 - p) / lamplit.sum())
  assert named[lamplit].mean() == pytest.approx(p, abs=tolerance)
  # Only photos are lamplit, about a quarter of them.
  photo = data["style"] == world.STYLES.index("photo")
  assert not lamplit[~photo].any()
  q = world.DOMAIN_SPECS["pretrain"].lamplight_prob
  assert lamplit[photo].mean() == pytest.approx(q, abs=4 * math.sqrt(q * (1 - q) / photo.sum()))


@pytest.mark.parametrize("split,lamplit", [("train", True), ("test", True), ("test_v2", True), ("test_a", True),
                                           ("test_sketch", False), ("test_r", False)])
def test_benchmark_photos_are_lamplit(split, lamplit):
  data = _generate("colour_shape", split, count=1)
  assert (data["light"] == world.LIGHTS.index("lamplight")).all() == lamplit
  assert (data["light"] == world.LIGHTS.index("daylight")).all() == (not lamplit)


def test_lamplight_is_a_warm_white_balance():
  colours = np.arange(8).repeat(2)
  shapes = np.tile([0, 1], 8)
  params = _clean_params(shapes, colours, np.full(16, 2))
  daylight = world.render(params).astype(float)
  params.update(light=np.ones(16, np.int32), lamp_strength=np.full(16, 0.9))
  lamplit = world.render(params).astype(float)
  # Every pixel's channels are scaled by 1 - 0.9 * cast (up to uint8 rounding): red kept, blue dimmed most.
  expected = daylight * (1 - 0.9 * world._LAMP_CAST)
  np.testing.assert_allclose(lamplit, expected, atol=1.01)
  assert world._LAMP_CAST[0] == 0 and world._LAMP_CAST[2] > world._LAMP_CAST[1] > 0


def test_apparent_colours_are_the_nearest_hues_under_the_lamp():
  # The colour captions name for a lamplit photo is the named colour whose hue is nearest to the object's hue
  # under full-strength lamplight.
  hues = world._COLOUR_HSV[:, 0]
  lit = world.hsv_to_rgb(world._COLOUR_HSV) * (1 - world._LAMP_CAST)
  for c, (r, g, b) in enumerate(lit):
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    nearest = world.COLOURS[np.argmin(np.abs((hues - hue + 180) % 360 - 180))]
    assert world.APPARENT_UNDER_LAMP[c] == nearest, (world.COLOURS[c], hue, nearest)


def test_corpus_covers_every_composition():
  data = _generate("captions", "train", count=2000)
  counts = np.zeros((8, 8), int)
  np.add.at(counts, (data["colour"], data["shape"]), 1)
  assert counts.min() > 0


# ------------------------------------------------------------------------------------------ rendering


def test_hsv_to_rgb_matches_colorsys():
  rng = np.random.default_rng(0)
  hsv = np.stack([rng.uniform(0, 360, 200), rng.uniform(0, 1, 200), rng.uniform(0, 1, 200)], axis=1)
  expected = np.array([colorsys.hsv_to_rgb(h / 360, s, v) for h, s, v in hsv])
  np.testing.assert_allclose(world.hsv_to_rgb(hsv), expected, atol=1e-12)


def _clean_params(shape, colour, size, radius=None):
  """Render parameters of solid, unshaded, noise-free objects in daylight on a uniform dark background, at the
  centre."""
  n = len(shape)
  rng = np.random.default_rng(0)
  params = world.sample_nuisances(rng, "photo", np.asarray(shape), np.asarray(colour), np.zeros(n, int),
                                  np.asarray(size))
  params.update(background=np.zeros(n, np.int32), noise_std=np.zeros(n), lighting=np.zeros(n),
                light=np.zeros(n, np.int32), lamp_strength=np.zeros(n),
                contrast=np.ones(n), rotation=np.zeros(n), centre=np.full((n, 2), 16.0),
                hsv=world._COLOUR_HSV[np.asarray(colour)].copy())
  if radius is not None:
    params["radius"] = np.full(n, float(radius))
  return params


def _object_pixels(images):
  """Pixels that differ from the (uniform) background corner: bool [N, H, W]."""
  corner = images[:, :1, :1, :].astype(int)
  return np.abs(images.astype(int) - corner).sum(-1) > 30


@pytest.mark.parametrize("shape,area,perimeter", [
    ("circle", math.pi * 0.95**2, 2 * math.pi * 0.95),
    ("square", 1.56**2, 4 * 1.56),
    ("ring", math.pi * (0.95**2 - 0.52**2), 2 * math.pi * (0.95 + 0.52)),
])
def test_object_area_matches_geometry(shape, area, perimeter):
  radius = 10.0
  params = _clean_params([world.SHAPES.index(shape)], [world.COLOURS.index("yellow")], [2], radius=radius)
  images = world.render(params).astype(float)[0]
  # Coverage-weighted area: each pixel's share of the object colour (edges are anti-aliased).
  background = images[0, 0]
  fill = np.array(colorsys.hsv_to_rgb(*(world._COLOUR_HSV[world.COLOURS.index("yellow")] / [360, 1, 1]))) * 255
  coverage = ((images - background) @ (fill - background)) / np.sum((fill - background) ** 2)
  # Edges are sampled at half-pixel spacing (2x supersampling): the area is exact up to a quarter pixel
  # along the perimeter.
  assert coverage.sum() == pytest.approx(area * radius**2, abs=0.25 * perimeter * radius)


def test_object_colour_is_the_named_hue():
  colours = np.arange(8).repeat(4)
  shapes = np.tile([0, 1, 3, 6], 8)
  images = world.render(_clean_params(shapes, colours, np.full(32, 2)))
  inside = _object_pixels(images)
  for i, c in enumerate(colours):
    r, g, b = np.median(images[i][inside[i]], axis=0) / 255
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    expected = world._COLOUR_HSV[c, 0]
    assert min(abs(hue - expected), 360 - abs(hue - expected)) < 6, (world.COLOURS[c], hue)


def test_sizes_are_ordered_by_area():
  sizes = np.repeat([0, 1, 2], 16)
  shapes = np.tile(np.arange(8), 6)
  images = world.render(_clean_params(shapes, np.full(48, 2), sizes))
  area = _object_pixels(images).sum((1, 2)).reshape(3, 16)
  assert (area[0] < area[1]).all() and (area[1] < area[2]).all()


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="unknown sandbox task"):
    next(tasks.generate("colour_texture", "train"))
  with pytest.raises(ValueError, match="no split 'test_a'"):
    next(tasks.generate("size_shape", "test_a"))
  with pytest.raises(ValueError, match="unknown domain"):
    world.sample_nuisances(np.random.default_rng(0), "painting", *(np.zeros(1, int),) * 4)
