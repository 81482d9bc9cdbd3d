"""The sandbox world: procedurally generated images of attribute compositions, with captions.

Everything here is plain NumPy and deterministic given a `numpy.random.Generator`: the same seed gives the
same attributes, the same captions and the same bytes. Rendering is vectorised over a batch of images (no
per-pixel Python loops): each image is drawn on a 2x supersampled canvas and box-filtered down, which
anti-aliases edges.

An image shows one object with four attributes: shape (8), colour (8), texture (4) and size (3), placed at
a random position and rotation on a background, in one of four rendering styles. The classification tasks
are compositions of two attributes (colour x shape, texture x shape, size x shape); the other attributes
are nuisances. Captions mention only some attributes, with synonyms, so a contrastively pretrained model
has to learn each attribute word on its own and compose them — and stays imperfect.

Light: a photo is lit by daylight or by a warm indoor lamp, which tints the whole scene orange (red kept,
green dimmed, blue strongly dimmed): a yellow object looks orange, a pink one salmon, a cyan one green. The
pretraining corpus is mostly daylight. Its captions follow how people describe what they see: daylight is
never named; a caption of a lamplit photo names the light half of the time, and then the object's true colour
("a warm photo of a pink heart": the writer noticed the lamp and corrected for it), otherwise the colour the
object appears to have ("a photo of a red heart" for a pink heart under the lamp). The downstream benchmark
was shot indoors: all its photos are lamplit, and its labels are the objects' true colours. So the field's
hand-crafted prompt "a photo of a {}." matches a lamplit image to its apparent colour, while a prompt that
names the light ("a lamplit photo of a {}.") matches its true colour: a systematic caption-task mismatch that
a learned prompt context can correct (CoOp's gains on real datasets have the same origin), while zero-shot
stays well above chance.

Domains (the distribution an image is drawn from):
  "pretrain": photos (90%; 30% of them lamplit), sketches (5%) and cartoons (5%) on ordinary
              backgrounds; the caption corpus.
  "photo":    the downstream classification images (train / validation / test), all lamplit.
  "mixed":    photos like "photo", but half of them lamplit and half daylight (a second benchmark, shot in
              rooms with and without the lamp: the `catalogue` task of tasks.py).
  "v2":       re-sampled nuisances, slightly shifted: more noise, stronger lighting, wider rotations
              (plays ImageNet-V2); lamplit like the benchmark.
  "sketch":   outline only, in the object's colour, on paper (plays ImageNet-Sketch).
  "hard":     heavy noise, low contrast and 3-5 small distractor objects, lamplit (plays ImageNet-A).
  "rendition": cartoons with a black outline on saturated, patterned backgrounds never seen in
              pretraining (plays ImageNet-R).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 32
_SUPERSAMPLE = 2

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "medium", "large")
BACKGROUNDS = ("dark", "light", "gradient", "noisy", "paper", "colourful")
STYLES = ("photo", "sketch", "cartoon", "cluttered")
LIGHTS = ("daylight", "lamplight")
DOMAINS = ("pretrain", "photo", "mixed", "v2", "sketch", "hard", "rendition")

ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES, "size": SIZES,
              "background": BACKGROUNDS, "style": STYLES, "light": LIGHTS}

# Colour prototypes (hue in degrees, saturation, value); each image jitters them.
_COLOUR_HSV = np.array([
    (0.0, 0.85, 0.90),    # red
    (28.0, 0.90, 0.95),   # orange
    (55.0, 0.85, 0.95),   # yellow
    (120.0, 0.75, 0.75),  # green
    (185.0, 0.80, 0.90),  # cyan
    (225.0, 0.85, 0.90),  # blue
    (280.0, 0.70, 0.75),  # purple
    (325.0, 0.45, 0.95),  # pink
], dtype=np.float64)
_HUE_JITTER, _SV_JITTER = 8.0, 0.08
# Half-extent of the object in output pixels, per size: (low, high).
_SIZE_RADIUS = np.array([(4.5, 6.0), (7.5, 9.0), (10.5, 12.5)])
_TEXTURE_PERIOD = 4.0  # output pixels
_TEXTURE_DARK = 0.35   # value factor of the "off" phase of a texture
# Lamplight multiplies RGB by 1 - strength * _LAMP_CAST (a warm white balance), strength ~ U(_LAMP_STRENGTH).
_LAMP_CAST = np.array([0.0, 0.25, 0.6], np.float32)
_LAMP_STRENGTH = (0.8, 1.0)
# The colour an object appears to have under the lamp (by hue, see the tests): yellow looks orange, cyan
# green, purple pink and pink red; red, orange, green and blue keep their names.
APPARENT_UNDER_LAMP = ("red", "orange", "orange", "green", "green", "blue", "pink", "red")

# Caption words: the first entry is the class name; the others are synonyms used in captions only.
SHAPE_WORDS = (("circle", "disc"), ("square", "box"), ("triangle",), ("star",), ("cross", "plus"),
               ("ring", "donut"), ("heart",), ("crescent", "moon"))
COLOUR_WORDS = (("red", "scarlet"), ("orange",), ("yellow",), ("green",), ("cyan", "turquoise"), ("blue",),
                ("purple", "violet"), ("pink",))
TEXTURE_WORDS = (("solid", "plain"), ("striped",), ("dotted", "spotted"), ("checkered", "checked"))
SIZE_WORDS = (("small", "tiny"), ("medium",), ("large", "big"))
BACKGROUND_WORDS = (("dark", "black"), ("light", "pale"), ("gradient", "shaded"), ("noisy", "grainy"),
                    ("white", "paper"), ("colourful",))
GENERIC_NOUNS = ("shape", "object", "thing")
_SYNONYM_PROB = 0.2


# ----------------------------------------------------------------------------------------------------------
# Attribute sampling.


@dataclasses.dataclass(frozen=True)
class DomainSpec:
  """Nuisance distribution of one domain (see the module docstring)."""

  style_probs: tuple[float, float, float, float]  # over STYLES
  background_probs: tuple[float, ...]  # over BACKGROUNDS, for photo/cartoon/cluttered styles
  max_rotation_deg: float = 25.0
  noise_std: tuple[float, float] = (0.01, 0.04)
  lighting: float = 0.2
  contrast: tuple[float, float] = (1.0, 1.0)
  distractors: tuple[int, int] = (0, 0)
  min_size: int = 0
  lamplight_prob: float = 0.0  # of photo-like (photo, cluttered) images; sketches and cartoons are daylight


_ORDINARY_BG = (0.3, 0.25, 0.25, 0.2, 0.0, 0.0)
DOMAIN_SPECS = {
    "pretrain": DomainSpec(style_probs=(0.9, 0.05, 0.05, 0.0), background_probs=_ORDINARY_BG,
                           lamplight_prob=0.3),
    "photo": DomainSpec(style_probs=(1.0, 0.0, 0.0, 0.0), background_probs=_ORDINARY_BG, lamplight_prob=1.0),
    "mixed": DomainSpec(style_probs=(1.0, 0.0, 0.0, 0.0), background_probs=_ORDINARY_BG, lamplight_prob=0.5),
    "v2": DomainSpec(style_probs=(1.0, 0.0, 0.0, 0.0), background_probs=(0.2, 0.2, 0.3, 0.3, 0.0, 0.0),
                     max_rotation_deg=40.0, noise_std=(0.04, 0.09), lighting=0.35, contrast=(0.75, 1.0),
                     lamplight_prob=1.0),
    "sketch": DomainSpec(style_probs=(0.0, 1.0, 0.0, 0.0), background_probs=_ORDINARY_BG),
    "hard": DomainSpec(style_probs=(0.0, 0.0, 0.0, 1.0), background_probs=(0.2, 0.2, 0.2, 0.4, 0.0, 0.0),
                       noise_std=(0.10, 0.16), contrast=(0.5, 0.8), distractors=(3, 5), min_size=1,
                       lamplight_prob=1.0),
    "rendition": DomainSpec(style_probs=(0.0, 0.0, 1.0, 0.0), background_probs=(0, 0, 0, 0, 0, 1.0)),
}


def sample_nuisances(rng: np.random.Generator, domain: str, shape: np.ndarray, colour: np.ndarray,
                     texture: np.ndarray, size: np.ndarray) -> dict[str, np.ndarray]:
  """Draws everything about N images that is not one of the four attributes.

  Args:
    rng: the generator all randomness comes from.
    domain: one of DOMAINS.
    shape, colour, texture, size: int arrays [N] of attribute ids.

  Returns:
    A dict of arrays with leading dim N: the attributes (int32), `background`, `style` and `light` (int32),
    and the continuous render parameters (`radius`, `centre` [N, 2], `rotation` (radians), `hsv` [N, 3], ...).
  """
  if domain not in DOMAIN_SPECS:
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
  spec = DOMAIN_SPECS[domain]
  n = len(shape)
  size = np.asarray(size, np.int32)
  if spec.min_size:
    size = np.maximum(size, spec.min_size).astype(np.int32)
  style = rng.choice(len(STYLES), size=n, p=spec.style_probs).astype(np.int32)
  background = rng.choice(len(BACKGROUNDS), size=n, p=spec.background_probs).astype(np.int32)
  background = np.where(style == STYLES.index("sketch"), BACKGROUNDS.index("paper"), background).astype(np.int32)
  photo_like = (style == STYLES.index("photo")) | (style == STYLES.index("cluttered"))
  light = (photo_like & (rng.random(n) < spec.lamplight_prob)).astype(np.int32)
  lamp_strength = np.where(light == 1, rng.uniform(*_LAMP_STRENGTH, n), 0.0)
  lo, hi = _SIZE_RADIUS[size, 0], _SIZE_RADIUS[size, 1]
  radius = lo + (hi - lo) * rng.random(n)
  # Keep the object (radius r around its centre) inside the frame with a half-pixel margin.
  centre = radius[:, None] + 0.5 + (IMAGE_SIZE - 1.0 - 2 * radius[:, None]) * rng.random((n, 2))
  rotation = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg, n))
  hsv = _COLOUR_HSV[colour].copy()
  hsv[:, 0] = (hsv[:, 0] + rng.uniform(-_HUE_JITTER, _HUE_JITTER, n)) % 360.0
  hsv[:, 1:] = np.clip(hsv[:, 1:] + rng.uniform(-_SV_JITTER, _SV_JITTER, (n, 2)), 0.0, 1.0)
  return {
      "shape": np.asarray(shape, np.int32), "colour": np.asarray(colour, np.int32),
      "texture": np.asarray(texture, np.int32), "size": size, "style": style, "background": background,
      "light": light, "lamp_strength": lamp_strength,
      "radius": radius, "centre": centre, "rotation": rotation, "hsv": hsv,
      "texture_angle": rng.uniform(0, np.pi, n), "texture_phase": rng.uniform(0, _TEXTURE_PERIOD, (n, 2)),
      "light_angle": rng.uniform(0, 2 * np.pi, n), "lighting": np.full(n, spec.lighting),
      "noise_std": rng.uniform(*spec.noise_std, n), "contrast": rng.uniform(*spec.contrast, n),
      "num_distractors": rng.integers(spec.distractors[0], spec.distractors[1] + 1, n),
      # Seeds of the per-image random fields (background noise, distractors, pixel noise).
      "seed": rng.integers(0, 2**31 - 1, n),
  }


# ----------------------------------------------------------------------------------------------------------
# Rendering.


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """HSV (hue in degrees, s and v in [0, 1]) -> RGB in [0, 1]; any leading shape, last axis 3."""
  h, s, v = hsv[..., 0] / 60.0, hsv[..., 1], hsv[..., 2]
  k = np.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], axis=-1)
  return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _grid(n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
  """Sample-point coordinates in output-pixel units: y, x each [S, S] with S = n_pixels * supersample."""
  c = ((np.arange(n_pixels * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE).astype(np.float32)
  return np.meshgrid(c, c, indexing="ij")


def shape_masks(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-tests of the shapes in object coordinates (u right, v up, object within the unit disc).

  Args:
    shape: int [N] shape ids.
    u, v: float [N, S, S] object coordinates of every sample point.

  Returns:
    bool [N, S, S].
  """
  mask = np.zeros(u.shape, bool)
  rho = np.hypot(u, v)
  for k, name in enumerate(SHAPES):
    idx = np.flatnonzero(shape == k)
    if idx.size == 0:
      continue
    uu, vv, rr = u[idx], v[idx], rho[idx]
    if name == "circle":
      m = rr < 0.95
    elif name == "square":
      m = np.maximum(np.abs(uu), np.abs(vv)) < 0.78
    elif name == "triangle":  # Equilateral, pointing up, circumradius 1 around (0, -0.1).
      w = vv + 0.1
      m = (w > -0.5) & (0.866 * uu + 0.5 * w < 0.5) & (-0.866 * uu + 0.5 * w < 0.5)
    elif name == "star":  # Five points.
      theta = np.arctan2(vv, uu) - np.pi / 2
      m = rr < 0.42 + 0.58 * (0.5 + 0.5 * np.cos(5 * theta)) ** 2
    elif name == "cross":
      m = ((np.abs(uu) < 0.3) & (np.abs(vv) < 0.95)) | ((np.abs(vv) < 0.3) & (np.abs(uu) < 0.95))
    elif name == "ring":
      m = (rr < 0.95) & (rr > 0.52)
    elif name == "heart":
      x, y = uu * 1.15, vv * 1.15 + 0.12
      m = (x**2 + y**2 - 1) ** 3 - x**2 * y**3 < 0
    elif name == "crescent":
      m = (rr < 0.95) & (np.hypot(uu - 0.42, vv) > 0.72)
    else:  # pragma: no cover - SHAPES and this table are edited together.
      raise AssertionError(name)
    mask[idx] = m
  return mask


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
  """Binary erosion of bool [N, S, S] by a disc of `radius` samples (out-of-frame counts as outside)."""
  out = mask.copy()
  padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
  s = mask.shape[1]
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      if dy * dy + dx * dx <= radius * radius and (dy or dx):
        out &= padded[:, radius + dy:radius + dy + s, radius + dx:radius + dx + s]
  return out


def _smooth_noise(rng: np.random.Generator, n: int, grid: int, channels: int, size: int) -> np.ndarray:
  """Low-frequency noise [n, size, size, channels] in [-1, 1]: a random grid, bilinearly upsampled."""
  coarse = rng.uniform(-1, 1, (n, grid, grid, channels)).astype(np.float32)
  pos = (np.arange(size) + 0.5) / size * (grid - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
  frac = pos - lo
  interp = np.zeros((size, grid), np.float32)
  interp[np.arange(size), lo] = 1 - frac
  interp[np.arange(size), lo + 1] = frac
  rows = np.matmul(interp, coarse.transpose(0, 3, 1, 2))  # [n, c, size, grid]
  return np.matmul(rows, interp.T).transpose(0, 2, 3, 1)


def _backgrounds(rng: np.random.Generator, background: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Background images float32 [N, S, S, 3] in [0, 1]."""
  n, s = len(background), yy.shape[0]
  hue = rng.uniform(0, 360, (n, 2))
  sat = rng.uniform(0.0, 0.3, (n, 2))
  val = rng.uniform(0.1, 0.9, (n, 2))
  ranges = {"dark": ((0.0, 0.3), (0.05, 0.3)), "light": ((0.0, 0.3), (0.7, 0.95)),
            "paper": ((0.0, 0.05), (0.88, 1.0)), "colourful": ((0.6, 1.0), (0.6, 1.0))}
  for name, (sat_range, val_range) in ranges.items():
    sel = background == BACKGROUNDS.index(name)
    sat[sel] = rng.uniform(*sat_range, (sel.sum(), 2))
    val[sel] = rng.uniform(*val_range, (sel.sum(), 2))
  rgb = hsv_to_rgb(np.stack([hue, sat, val], axis=-1)).astype(np.float32)  # [N, 2, 3]
  angle = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
  period = rng.uniform(3.0, 8.0, n).astype(np.float32)
  use_checks = rng.random(n) < 0.5
  img = np.broadcast_to(rgb[:, None, None, 0], (n, s, s, 3)).copy()
  # Second colour: gradients ramp into it, colourful backgrounds alternate with it in bands or checks.
  sel = np.flatnonzero((background == BACKGROUNDS.index("gradient")) | (background == BACKGROUNDS.index("colourful")))
  if sel.size:
    a = angle[sel, None, None]
    ramp = (np.cos(a) * (xx - IMAGE_SIZE / 2) + np.sin(a) * (yy - IMAGE_SIZE / 2)) / IMAGE_SIZE + 0.5
    p = period[sel, None, None]
    bands = np.floor(ramp * IMAGE_SIZE / p) % 2
    checks = (np.floor(xx / p) + np.floor(yy / p)) % 2
    colourful = (background[sel] == BACKGROUNDS.index("colourful"))[:, None, None]
    weight = np.where(colourful, np.where(use_checks[sel, None, None], checks, bands), np.clip(ramp, 0, 1))
    weight = weight[..., None]
    img[sel] = rgb[sel, None, None, 0] * (1 - weight) + rgb[sel, None, None, 1] * weight
  sel = np.flatnonzero(background == BACKGROUNDS.index("noisy"))
  if sel.size:
    img[sel] += 0.25 * _smooth_noise(rng, sel.size, 5, 3, s)
    img[sel] += 0.08 * rng.standard_normal((sel.size, s, s, 3), dtype=np.float32)
  return np.clip(img, 0, 1)


def _object_layer(shape: np.ndarray, texture: np.ndarray, params: dict[str, np.ndarray], yy: np.ndarray,
                  xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mask bool [N, S, S] and fill colour float32 [N, S, S, 3] of N objects."""
  f32 = lambda x: np.asarray(x, np.float32)
  cy, cx = f32(params["centre"][:, 0, None, None]), f32(params["centre"][:, 1, None, None])
  radius = f32(params["radius"][:, None, None])
  rotation = params["rotation"][:, None, None]
  cos, sin = f32(np.cos(rotation)), f32(np.sin(rotation))
  dx, dy = xx - cx, yy - cy
  u_pix, v_pix = cos * dx + sin * dy, sin * dx - cos * dy  # v points up
  mask = shape_masks(shape, u_pix / radius, v_pix / radius)
  # Texture in object pixel units (it turns with the object): "on" phase keeps the colour, "off" darkens it.
  brightness = np.ones(mask.shape, np.float32)
  for k in range(1, len(TEXTURES)):
    sel = np.flatnonzero(texture == k)
    if not sel.size:
      continue
    ta, ph = params["texture_angle"][sel, None, None], params["texture_phase"][sel]
    uu, vv = u_pix[sel], v_pix[sel]
    a = (f32(np.cos(ta)) * uu + f32(np.sin(ta)) * vv + f32(ph[:, 0, None, None])) / _TEXTURE_PERIOD
    if TEXTURES[k] == "striped":
      on = (a % 1.0) < 0.5
    else:
      b = (f32(-np.sin(ta)) * uu + f32(np.cos(ta)) * vv + f32(ph[:, 1, None, None])) / _TEXTURE_PERIOD
      if TEXTURES[k] == "dotted":
        on = np.hypot((a % 1.0) - 0.5, (b % 1.0) - 0.5) < 0.3
      else:  # checkered, cells of half a period
        on = ((np.floor(a * 2) + np.floor(b * 2)) % 2) == 0
    brightness[sel] = np.where(on, 1.0, _TEXTURE_DARK)
  light = params["light_angle"][:, None, None]
  brightness *= 1 + f32(params["lighting"][:, None, None]) * (
      f32(np.cos(light)) * u_pix + f32(np.sin(light)) * v_pix) / radius
  rgb = hsv_to_rgb(params["hsv"]).astype(np.float32)[:, None, None, :]
  return mask, np.clip(rgb * brightness[..., None], 0, 1)


def render(params: dict[str, np.ndarray]) -> np.ndarray:
  """Draws the images described by `params` (from `sample_nuisances`).

  Returns:
    uint8 [N, IMAGE_SIZE, IMAGE_SIZE, 3].
  """
  n = len(params["shape"])
  yy, xx = _grid(IMAGE_SIZE)
  # One generator per batch, seeded from the per-image seeds, so a batch renders the same however it is
  # produced; callers always render the same batches.
  rng = np.random.default_rng(params["seed"].astype(np.uint64))
  img = _backgrounds(rng, params["background"], yy, xx)
  style = params["style"]

  # Clutter: small distractor objects of random shape/colour/texture, drawn behind the main object.
  max_distractors = int(params["num_distractors"].max(initial=0))
  for j in range(max_distractors):
    active = params["num_distractors"] > j
    d_shape = rng.integers(0, len(SHAPES), n)
    d_texture = rng.integers(0, len(TEXTURES), n)
    d_hsv = _COLOUR_HSV[rng.integers(0, len(COLOURS), n)]
    d_radius = rng.uniform(2.5, 4.5, n)
    d_params = {
        "centre": d_radius[:, None] + 0.5 + (IMAGE_SIZE - 1 - 2 * d_radius[:, None]) * rng.random((n, 2)),
        "radius": d_radius, "rotation": rng.uniform(-np.pi, np.pi, n), "hsv": d_hsv,
        "texture_angle": rng.uniform(0, np.pi, n), "texture_phase": rng.uniform(0, _TEXTURE_PERIOD, (n, 2)),
        "light_angle": rng.uniform(0, 2 * np.pi, n), "lighting": params["lighting"],
    }
    d_mask, d_fill = _object_layer(d_shape, d_texture, d_params, yy, xx)
    d_mask &= active[:, None, None]
    img = np.where(d_mask[..., None], d_fill, img)

  mask, fill = _object_layer(params["shape"], params["texture"], params, yy, xx)
  sketch = style == STYLES.index("sketch")
  cartoon = style == STYLES.index("cartoon")
  if sketch.any() or cartoon.any():
    outline = mask & ~_erode(mask, 2)  # About one output pixel wide.
    flat = hsv_to_rgb(params["hsv"]).astype(np.float32)[:, None, None, :] * np.ones_like(fill)
    # Sketch: only the outline, in the object's colour. Cartoon: flat fill with a black outline.
    fill = np.where(sketch[:, None, None, None], flat, fill)
    fill = np.where(cartoon[:, None, None, None], np.where(outline[..., None], 0.0, flat), fill)
    mask = np.where(sketch[:, None, None], outline, mask)
  img = np.where(mask[..., None], fill, img)

  # Box-filter down to the output resolution, then the light's white balance, global contrast and pixel noise.
  img = img.reshape(n, IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(2, 4))
  img = img * (1 - params["lamp_strength"][:, None, None, None].astype(np.float32) * _LAMP_CAST)
  contrast = params["contrast"][:, None, None, None].astype(np.float32)
  img = 0.5 + contrast * (img - 0.5)
  img = img + params["noise_std"][:, None, None, None].astype(np.float32) * rng.standard_normal(img.shape, dtype=np.float32)
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Captions.


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
  if len(words) > 1 and rng.random() < _SYNONYM_PROB:
    return words[1 + rng.integers(len(words) - 1)]
  return words[0]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _position_phrase(centre: np.ndarray) -> str | None:
  y, x = centre
  third = IMAGE_SIZE / 3
  if x < third:
    return "on the left"
  if x > 2 * third:
    return "on the right"
  if y < third:
    return "at the top"
  if y > 2 * third:
    return "at the bottom"
  return "in the middle"


_STYLE_PREFIXES = {
    "photo": ("a photo of", "a picture of", "an image of", "a close up of", "there is", "this is", ""),
    "sketch": ("a sketch of", "a drawing of", "an outline of"),
    "cartoon": ("a cartoon of", "a painting of", "a drawing of"),
    "cluttered": ("a photo of", "a cluttered photo of"),
}

# A lamplit photo's caption names the light with this probability: by a prefix (replacing the style prefix)
# or a suffix, half and half, and then names the true colour; otherwise it names the apparent colour.
# Daylight is the default and is never named.
LAMP_MENTION_PROB = 0.5
_LAMP_PREFIXES = ("a warm photo of", "a lamplit photo of", "an indoor photo of")
_LAMP_SUFFIXES = ("in warm lamplight", "under a warm lamp", "indoors")

# Probability that a caption mentions each attribute.
MENTION_PROBS = {"shape": 0.8, "colour": 0.45, "texture": 0.3, "size": 0.3, "background": 0.25,
                 "position": 0.15}


def caption(rng: np.random.Generator, example: dict[str, np.ndarray | int]) -> str:
  """One caption of one image: a style prefix, some of its attributes (with synonyms), maybe the background
  and position, and for a lamplit photo maybe the light (the colour named is the apparent one when the light
  is not). At least one of colour and shape is always mentioned.

  Args:
    rng: the generator.
    example: ints `shape`, `colour`, `texture`, `size`, `background`, `style`, `light` and float [2]
      `centre`.
  """
  mention = {k: rng.random() < p for k, p in MENTION_PROBS.items()}
  lamp = None
  if example["light"] == LIGHTS.index("lamplight") and rng.random() < LAMP_MENTION_PROB:
    lamp = ("prefix", "suffix")[rng.integers(2)]
  if not (mention["shape"] or mention["colour"]):
    mention[("shape", "colour")[rng.integers(2)]] = True
  adjectives = []
  if mention["size"]:
    adjectives.append(_pick(rng, SIZE_WORDS[example["size"]]))
  if mention["colour"]:
    colour = example["colour"]
    if example["light"] == LIGHTS.index("lamplight") and lamp is None:
      colour = COLOURS.index(APPARENT_UNDER_LAMP[colour])
    adjectives.append(_pick(rng, COLOUR_WORDS[colour]))
  if mention["texture"]:
    adjectives.append(_pick(rng, TEXTURE_WORDS[example["texture"]]))
  noun = _pick(rng, SHAPE_WORDS[example["shape"]]) if mention["shape"] else GENERIC_NOUNS[rng.integers(3)]
  words = [*adjectives, noun]
  desc = f"{_article(words[0])} {' '.join(words)}"
  prefixes = _STYLE_PREFIXES[STYLES[example["style"]]]
  prefix = prefixes[rng.integers(len(prefixes))]
  if lamp == "prefix":
    prefix = _LAMP_PREFIXES[rng.integers(len(_LAMP_PREFIXES))]
  text = f"{prefix} {desc}" if prefix else desc
  if mention["background"]:
    bg = _pick(rng, BACKGROUND_WORDS[example["background"]])
    text += f" on {_article(bg)} {bg} background"
  if mention["position"]:
    text += " " + _position_phrase(np.asarray(example["centre"]))
  if lamp == "suffix":
    text += " " + _LAMP_SUFFIXES[rng.integers(len(_LAMP_SUFFIXES))]
  return text + "."


def vocabulary() -> list[str]:
  """Every word a caption, class name or the default templates can use, sorted."""
  words = set()
  for table in (SHAPE_WORDS, COLOUR_WORDS, TEXTURE_WORDS, SIZE_WORDS, BACKGROUND_WORDS):
    for synonyms in table:
      words.update(synonyms)
  words.update(GENERIC_NOUNS)
  for phrases in (*_STYLE_PREFIXES.values(), _LAMP_PREFIXES, _LAMP_SUFFIXES):
    for p in phrases:
      words.update(p.split())
  words.update("a an on the background left right top bottom middle in at of photo".split())
  # Template words the data layer may use ("a photo of a {}.", "a {} texture.", ...), and common prompt words.
  words.update("itself type kind shape texture size colour color object pattern with".split())
  return sorted(words)


def captions(rng: np.random.Generator, params: dict[str, np.ndarray]) -> list[str]:
  """One caption per image of `params` (from `sample_nuisances`)."""
  keys = ("shape", "colour", "texture", "size", "background", "style", "light", "centre")
  return [caption(rng, {k: params[k][i] for k in keys}) for i in range(len(params["shape"]))]
