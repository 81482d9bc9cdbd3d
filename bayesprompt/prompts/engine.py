"""The one deep-prompt engine every prompt learner runs on.

A prompt learner only decides *what* the learnable tokens are (shared context, image-conditioned context,
sampled residuals, per-layer deep prompts) and *where* they go (a token-edit schedule, see
`bayesprompt.clip.edits`). This module does the rest, identically for all of them:

  class list  -> `ClassState`   frozen per-class token embeddings "SOS [ctx slots] text. EOT" (no parameters)
  ctx tokens  -> `build_prompts` fills the ctx slots: [..., C, T, W_t] input embeddings
  prompts     -> `text_features` text tower (`clip.text_tower_from_embeddings`) + edits, L2-normalised
  images      -> `image_features` image tower (`clip.image_tower`) + edits, L2-normalised
  features    -> `logits`  exp(logit_scale)·cos (+ logit_bias for SigLIP)

Prompt layout of one class (class-token position "end", the default):

    [SOT] [ctx_1 .. ctx_n] [rest of the init phrase] [fixed text] [class name] [.] [EOT] [pad ...]

The ctx slots hold placeholder embeddings until `build_prompts` overwrites them; "middle" and "front"
(CoOp's ablation) move the class name between / before the ctx slots. Learners without an input context
(VaMP) use a hand-crafted template instead ("a photo of a {}.").

Sequences are trimmed to the longest prompt of the class list when the text tower is causal and pools at
EOT: the causal mask makes the EOT feature independent of the padding behind it, so the trim is exact and
saves most of the text compute (77 -> ~10-20 tokens for typical class names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import bayesprompt.clip as clip

Params = dict[str, Any]
CLASS_POSITIONS = ("end", "middle", "front")


# ------------------------------------------------------------------------------------------ class state


@flax.struct.dataclass
class ClassState:
  """Per-class constants of a prompt learner, computed from the class list with the frozen CLIP.

  Never parameters: call `learner.prepare_classes` again for other class names and reuse the learner params.

  Attributes:
    token_ids: [C, T] int32 token ids; ctx slots hold the pad id (their embedding is overwritten).
    token_embeddings: [C, T, W_t] float32 frozen token embeddings of `token_ids` (no positional embedding).
    ctx_index: [C, T] int32, which ctx token fills each position (0 where `ctx_mask` is False).
    ctx_mask: [C, T] bool, True at the learnable-context positions.
    pool_index: [C] int32 position of EOT (the pooled token).
    zeroshot_text_features: [C, D] float32 normalised frozen-CLIP text features of the hand-crafted
      template(s) (`zeroshot_text_features`: the frozen zero-shot classifier), or None.
    learner_state: the learner's own per-class arrays, {name: array}, filled by its
      `PromptLearner.learner_class_state` and read only by that learner (e.g. VaMP's "class_prototypes"
      [C, D]; APEX's and MMRL's `train_class_state`: "train_text_features" [C_train, D], "is_train_class"
      [C] bool). A new learner keeps its per-class state here, in its own file; the engine never reads it.
  """

  token_ids: jax.Array
  token_embeddings: jax.Array
  ctx_index: jax.Array
  ctx_mask: jax.Array
  pool_index: jax.Array
  zeroshot_text_features: jax.Array | None = None
  learner_state: dict[str, jax.Array] = flax.struct.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return self.token_ids.shape[0]

  @property
  def sequence_length(self) -> int:
    return self.token_ids.shape[1]


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """Static description of a learner's text prompt (see the module docstring).

  Attributes:
    n_ctx: learnable context tokens (0: no input context; `template` gives the whole prompt).
    ctx_init: phrase whose first `n_ctx` tokens initialise the context (None: random init, placeholders).
      Phrase tokens beyond `n_ctx` stay as fixed text after the context (MaPLe: n_ctx=2 of "a photo of a").
    fixed_text: fixed words between the context and the class name (MPL: "a photo of a").
    class_position: "end", "middle" or "front" (CoOp).
    template: hand-crafted prompt with one "{}" for learners without input context (n_ctx == 0).
  """

  n_ctx: int
  ctx_init: str | None = None
  fixed_text: str = ""
  class_position: str = "end"
  template: str = "a photo of a {}."


def _encode(tokenizer, text: str, classname: str) -> list[int]:
  try:
    return list(tokenizer.encode(text))
  except ValueError as e:
    raise ValueError(f"class {classname!r}: cannot tokenize the prompt {text!r}: {e}") from e


def phrase_token_ids(tokenizer, phrase: str) -> list[int]:
  """Token ids of a context-init phrase (no SOT/EOT); raises a clear error for an empty phrase."""
  ids = list(tokenizer.encode(phrase.replace("_", " ")))
  if not ids:
    raise ValueError(f"context init phrase {phrase!r} has no tokens")
  return ids


def _class_sequence(tokenizer, layout: PromptLayout, name: str) -> list[tuple[str, int]]:
  """One class's prompt as a list of ("id", token_id) / ("ctx", k) items, SOT/EOT included."""
  n = layout.n_ctx
  if n == 0:
    if layout.template.count("{}") != 1:
      raise ValueError(f"template {layout.template!r} must contain exactly one '{{}}' for the class name")
    body = [("id", i) for i in _encode(tokenizer, layout.template.format(name), name)]
  elif layout.class_position == "end":
    words = [w for w in (layout.ctx_init, layout.fixed_text, f"{name}.") if w]
    ids = _encode(tokenizer, " ".join(words), name)
    if layout.ctx_init is None:
      body = [("ctx", k) for k in range(n)] + [("id", i) for i in ids]
    else:
      # The phrase's first n tokens become the ctx slots; the rest of it stays fixed text (MaPLe).
      body = [("ctx", k) for k in range(n)] + [("id", i) for i in ids[n:]]
  else:
    # CoOp's middle/front: split "name." into the class tokens and the rest (as the official code does
    # with name_lens), and place the ctx around the class tokens.
    ids = _encode(tokenizer, f"{name}.", name)
    name_len = len(_encode(tokenizer, name, name))
    class_ids, rest = [("id", i) for i in ids[:name_len]], [("id", i) for i in ids[name_len:]]
    ctx = [("ctx", k) for k in range(n)]
    if layout.class_position == "middle":
      half = n // 2
      body = ctx[:half] + class_ids + ctx[half:] + rest
    else:
      body = class_ids + ctx + rest
  return [("id", tokenizer.sot_id), *body, ("id", tokenizer.eot_id)]


def check_layout(layout: PromptLayout, tokenizer) -> None:
  """Validates a layout against a tokenizer (context counts, class positions)."""
  if layout.n_ctx < 0:
    raise ValueError(f"n_ctx must be >= 0, got {layout.n_ctx}")
  if layout.class_position not in CLASS_POSITIONS:
    raise ValueError(f"unknown class_token_position {layout.class_position!r}; "
                     f"expected one of {CLASS_POSITIONS}")
  if layout.ctx_init is not None:
    phrase = phrase_token_ids(tokenizer, layout.ctx_init)
    if layout.n_ctx > len(phrase):
      raise ValueError(f"n_ctx={layout.n_ctx} but the init phrase {layout.ctx_init!r} has only {len(phrase)} "
                       "tokens; use a longer phrase, fewer context tokens, or random init (ctx_init=None)")
    if layout.class_position != "end" and layout.n_ctx != len(phrase):
      raise ValueError(f"class_token_position={layout.class_position!r} needs the whole init phrase as "
                       f"context (n_ctx = {len(phrase)} tokens of {layout.ctx_init!r}), "
                       f"got n_ctx={layout.n_ctx}")
  if layout.class_position != "end" and layout.fixed_text:
    raise ValueError(f"class_token_position={layout.class_position!r} does not support fixed_text")


def prepare_class_state(clip_params: Params, config: clip.CLIPConfig, layout: PromptLayout,
                        classnames: Sequence[str], *, templates: str | Sequence[str] | None = None,
                        full_context: bool = False) -> ClassState:
  """Builds the `ClassState` of a class list (runs outside jit; tokenizes with the model's tokenizer).

  Args:
    clip_params: frozen CLIP params (token embedding table, and the text tower for zero-shot features).
    config: the CLIP config (its tokenizer and text context length).
    layout: the learner's prompt layout.
    classnames: C class names; "_" reads as a space (CoOp convention).
    templates: hand-crafted template(s) with "{}" -> `zeroshot_text_features` [C, D]; None: not computed.
    full_context: pad to the full context length even where trimming is exact.
  The learner-owned `learner_state` is left empty (`PromptLearner.prepare_classes` fills it).
  Raises:
    ValueError: empty class list, a prompt longer than the context (naming the class).
  """
  names = clean_classnames(classnames)
  tokenizer = clip.get_tokenizer(config)
  check_layout(layout, tokenizer)
  context_length = config.text.context_length
  sequences = []
  for name in names:
    sequence = _class_sequence(tokenizer, layout, name)
    if len(sequence) > context_length:
      raise ValueError(
          f"class {name!r}: its prompt needs {len(sequence)} tokens (SOT + {layout.n_ctx} context + text + "
          f"EOT) but the text context length is {context_length}; shorten the class name or use fewer "
          "context tokens")
    sequences.append(sequence)
  trim = config.text.causal and config.text.pool == "eot" and not full_context
  length = max(len(s) for s in sequences) if trim else context_length
  num_classes = len(names)
  ids = np.full((num_classes, length), tokenizer.pad_id, np.int32)
  ctx_index = np.zeros((num_classes, length), np.int32)
  ctx_mask = np.zeros((num_classes, length), bool)
  pool_index = np.zeros((num_classes,), np.int32)
  for c, sequence in enumerate(sequences):
    for t, (kind, value) in enumerate(sequence):
      if kind == "id":
        ids[c, t] = value
      else:
        ctx_index[c, t], ctx_mask[c, t] = value, True
    pool_index[c] = len(sequence) - 1
  token_ids = jnp.asarray(ids)
  state = ClassState(token_ids=token_ids, token_embeddings=clip.embed_tokens(clip_params, token_ids),
                     ctx_index=jnp.asarray(ctx_index), ctx_mask=jnp.asarray(ctx_mask),
                     pool_index=jnp.asarray(pool_index))
  if templates is not None:
    zeroshot = zeroshot_text_features(clip_params, config, names, templates)
    state = state.replace(zeroshot_text_features=zeroshot)
  return state


def train_class_state(clip_params: Params, config: clip.CLIPConfig, classnames: Sequence[str],
                      templates: str | Sequence[str] | None,
                      train_classnames: Sequence[str]) -> dict[str, jax.Array]:
  """Learner state of the learners whose test-time rule depends on the training classes (APEX, MMRL):
  {"train_text_features": [C_train, D] float32 zero-shot features of the training classes (same templates),
  "is_train_class": [C] bool, True where a class of `classnames` is a training class}.

  Raises:
    ValueError: no templates, or an empty / single-str training class list.
  """
  if templates is None:
    raise ValueError("train_classnames needs templates: the training classes' zero-shot text features are "
                     "computed with the same hand-crafted template(s)")
  if isinstance(train_classnames, str) or not train_classnames:
    raise ValueError(f"train_classnames must be a non-empty sequence of class names, "
                     f"got {train_classnames!r}")
  names, train_names = clean_classnames(classnames), clean_classnames(train_classnames)
  return {"train_text_features": zeroshot_text_features(clip_params, config, train_names, templates),
          "is_train_class": jnp.asarray([name in set(train_names) for name in names])}


def clean_classnames(classnames: Sequence[str]) -> list[str]:
  """Class names as every CoOp trainer prompts them: "_" reads as a space, surrounding blanks dropped.

  Raises:
    TypeError: not a sequence (a single str included). ValueError: empty list, or a name that is empty
      once cleaned.
  """
  if isinstance(classnames, str):
    raise TypeError(f"classnames must be a sequence of str, got the single str {classnames!r}")
  if not isinstance(classnames, Sequence | np.ndarray):
    raise TypeError(f"classnames must be a sequence of str, got {type(classnames).__name__}")
  names = [str(n).replace("_", " ").strip() for n in classnames]
  if not names:
    raise ValueError("classnames is empty: expected at least one class name")
  for i, (raw, name) in enumerate(zip(classnames, names, strict=True)):
    if not name:
      raise ValueError(f"class name #{i} {raw!r} is empty; expected a non-blank str")
  return names


def as_templates(templates: str | Sequence[str]) -> list[str]:
  """`templates` as a non-empty list; each must hold exactly one "{}" (the class name) and no other brace."""
  templates = [templates] if isinstance(templates, str) else list(templates)
  if not templates:
    raise ValueError("templates is empty: expected at least one template with '{}'")
  for template in templates:
    if not isinstance(template, str) or template.count("{}") != 1 or (
        "{" in template.replace("{}", "") or "}" in template.replace("{}", "")):
      raise ValueError(f"template {template!r} must be a str with exactly one '{{}}' for the class name "
                       "and no other braces")
  return templates


def render_prompts(classnames: Sequence[str], template: str) -> list[str]:
  """template.format(name) for each class name after CoOp's cleaning (`clean_classnames`): the text of a
  hand-crafted prompt, for the zero-shot classifier and BayesVLM's text features.

  Raises:
    ValueError: a template without exactly one "{}" or with other braces, an empty class list, blank or
      duplicate names (after cleaning). TypeError: a single str instead of a list.
  """
  template = as_templates([template])[0]
  names = clean_classnames(classnames)
  first: dict[str, int] = {}
  for i, name in enumerate(names):
    if name in first:
      raise ValueError(f"duplicate class name {name!r} at positions {first[name]} and {i}")
    first[name] = i
  return [template.format(name) for name in names]


def zeroshot_text_features(clip_params: Params, config: clip.CLIPConfig, classnames: Sequence[str],
                           templates: str | Sequence[str], *, tokenizer: Any = None,
                           batch_size: int = 256) -> jax.Array:
  """CLIP's zero-shot classifier, float32 [C, D]: per class, the normalised text embedding of
  template.format(name); with several templates, the normalised mean of those normalised embeddings.

  The one implementation: the learners' class state, `train.prompt_run` (the OVE-PG / KgCoOp teacher) and
  `eval.zeroshot` all call it.

  Args:
    classnames: C names; "_" reads as a space (`clean_classnames`); duplicates are refused.
    templates: one template or several, each with exactly one "{}".
    tokenizer: callable texts -> int [M, context]; None: the config's (`clip.get_tokenizer(config)`).
    batch_size: prompts per text-tower call.
  Raises:
    ValueError: bad templates or class list, or token ids outside the model's vocabulary (a tokenizer that
      does not belong to the model).
  """
  templates = as_templates(templates)
  tokenizer = clip.get_tokenizer(config) if tokenizer is None else tokenizer
  context = config.text.context_length
  total = None
  for template in templates:
    prompts = render_prompts(classnames, template)
    token_ids = np.asarray(tokenizer(prompts, context_length=context))
    if token_ids.shape != (len(prompts), context):
      raise ValueError(f"tokenizer returned shape {token_ids.shape}; expected {(len(prompts), context)}")
    if token_ids.min() < 0 or token_ids.max() >= config.text.vocab_size:
      raise ValueError(f"tokenizer ids span [{token_ids.min()}, {token_ids.max()}] but the model's "
                       f"vocabulary has {config.text.vocab_size} ids: the tokenizer does not match the "
                       "checkpoint")
    chunks = [clip.encode_text(clip_params, token_ids[i:i + batch_size], config=config)
              for i in range(0, len(token_ids), batch_size)]
    features = clip.normalize(jnp.concatenate(chunks))
    total = features if total is None else total + features
  # One template: its normalised embeddings as they are (normalising them again would only add rounding).
  return total if len(templates) == 1 else clip.normalize(total)


def phrase_context(clip_params: Params, config: clip.CLIPConfig, phrase: str, n_ctx: int) -> jax.Array:
  """Context vectors [n_ctx, W_t]: the frozen word embeddings of the phrase's first n_ctx tokens."""
  ids = phrase_token_ids(clip.get_tokenizer(config), phrase)[:n_ctx]
  return jnp.take(clip_params["text"]["token_embedding"], jnp.asarray(ids, jnp.int32), axis=0)


# ------------------------------------------------------------------------------------------ prompts


def build_prompts(class_state: ClassState, ctx: jax.Array, *, class_specific: bool = False) -> jax.Array:
  """Input embeddings with the ctx slots filled.

  Args:
    class_state: the class list's `ClassState` (C classes, T tokens).
    ctx: [..., n_ctx, W_t] context shared by the classes (leading dims: samples, images, ...), or
      [C, n_ctx, W_t] with `class_specific=True` (CoOp's class-specific context).
  Returns:
    [..., C, T, W_t] float32 (or [C, T, W_t] when class-specific).
  """
  fixed = class_state.token_embeddings
  if class_specific:
    if ctx.ndim != 3 or ctx.shape[0] != class_state.num_classes:
      raise ValueError(f"class-specific context must be [{class_state.num_classes}, n_ctx, width] (one per "
                       f"class), got shape {tuple(ctx.shape)}; it was trained for another number of classes "
                       "and cannot transfer to a new class list")
    gathered = jnp.take_along_axis(ctx, class_state.ctx_index[..., None], axis=1)
  else:
    gathered = jnp.take(ctx, class_state.ctx_index, axis=-2)  # [..., C, T, W]
  return jnp.where(class_state.ctx_mask[..., None], gathered.astype(fixed.dtype), fixed)


# ------------------------------------------------------------------------------------------ towers


def text_features(clip_params: Params, config: clip.CLIPConfig, prompts: jax.Array,
                  pool_index: jax.Array, edits: clip.edits.Schedule | None = None,
                  projection_inputs: bool = False) -> jax.Array | dict:
  """Normalised text features of prompt embeddings, one batched tower call.

  Args:
    prompts: [..., T, W_t] input embeddings (no positional embedding); leading dims are flattened into one
      batch of sequences.
    pool_index: EOT positions, broadcastable to the leading dims (typically [C]).
    edits: token-edit schedule; per-sequence edit tokens must be [prod(leading), n, W_t].
    projection_inputs: return {"embeddings" [..., D] unnormalised, "pre_projection" [..., d_t]} instead.
  Returns:
    [..., D] float32, L2-normalised.
  """
  lead = prompts.shape[:-2]
  flat = prompts.reshape(-1, *prompts.shape[-2:])
  pool = jnp.broadcast_to(pool_index, lead).reshape(-1)
  features, out = clip.text_tower_from_embeddings(clip_params, flat, pool, config=config, edits=edits)
  if projection_inputs:
    return _projection_io(features, out, lead)
  return clip.normalize(features).reshape(*lead, features.shape[-1])


def _projection_io(features: jax.Array, out: dict, lead: tuple[int, ...]) -> dict[str, jax.Array]:
  """{"embeddings": unnormalised [*lead, D], "pre_projection": the projection's input [*lead, d_t]} (float32):
  what BayesVLM's projection Laplace works from."""
  return {"embeddings": features.astype(jnp.float32).reshape(*lead, features.shape[-1]),
          "pre_projection": out["pre_projection"].astype(jnp.float32).reshape(*lead, -1)}


def _text_sub_tower(clip_params: Params, config: clip.CLIPConfig, start: int, stop: int):
  """Params/config of text blocks [start, stop) as a tower of their own (positional embedding zeroed after
  the first block, so `text_tower_from_embeddings` adds it exactly once over the two stages)."""
  text = dict(clip_params["text"])
  text["blocks"] = jax.tree.map(lambda p: p[start:stop], text["blocks"])
  if start > 0:
    text["positional_embedding"] = jnp.zeros_like(text["positional_embedding"])
  sub_config = config.replace(text=dataclasses.replace(config.text, layers=stop - start))
  return {**clip_params, "text": text}, sub_config


def text_hidden_states(clip_params: Params, config: clip.CLIPConfig, prompts: jax.Array,
                       pool_index: jax.Array, num_layers: int) -> jax.Array:
  """Token sequence [M, T, W_t] after the first `num_layers` text blocks (positional embedding included).

  With `text_features_from_hidden` this splits the text tower in two, so a prefix of layers that sees no
  per-image edits runs once per class instead of once per (sample, image, class) (VaMP).
  """
  if num_layers == 0:
    return prompts.astype(jnp.float32) + clip_params["text"]["positional_embedding"][:prompts.shape[1]]
  sub_params, sub_config = _text_sub_tower(clip_params, config, 0, num_layers)
  _, out = clip.text_tower_from_embeddings(sub_params, prompts, pool_index, config=sub_config)
  return out["tokens"]


def text_features_from_hidden(clip_params: Params, config: clip.CLIPConfig, hidden: jax.Array,
                              pool_index: jax.Array, start_layer: int,
                              edits: clip.edits.Schedule | None = None,
                              projection_inputs: bool = False) -> jax.Array | dict:
  """Normalised text features [M, D] from the tokens entering block `start_layer` ([M, T, W_t]).

  `edits` is keyed by absolute layer index (>= start_layer). `projection_inputs`: return the unnormalised
  embeddings and the projection's input instead (`text_features` likewise).
  """
  if start_layer == 0:
    edits = dict(edits or {})
    if -1 in edits:
      raise ValueError("text_features_from_hidden: edits before the first block (-1) are not supported")
  sub_params, sub_config = _text_sub_tower(clip_params, config, start_layer, config.text.layers)
  if start_layer == 0:  # hidden already carries the positional embedding
    sub_params["text"]["positional_embedding"] = jnp.zeros_like(sub_params["text"]["positional_embedding"])
  shifted = {}
  for layer, layer_edits in (edits or {}).items():
    if layer < start_layer:
      raise ValueError(f"edit at text layer {layer} lies before the split at layer {start_layer}")
    shifted[layer - start_layer] = layer_edits
  features, out = clip.text_tower_from_embeddings(sub_params, hidden, pool_index, config=sub_config,
                                                 edits=shifted)
  if projection_inputs:
    return _projection_io(features, out, features.shape[:1])
  return clip.normalize(features)


def image_features(clip_params: Params, config: clip.CLIPConfig, images: jax.Array,
                   edits: clip.edits.Schedule | None = None) -> jax.Array:
  """Normalised image features [B, D] of NHWC float images, with an optional token-edit schedule."""
  features, _ = clip.image_tower(clip_params, images, config=config, edits=edits)
  return clip.normalize(features)


def logits(clip_params: Params, image_feats: jax.Array, text_feats: jax.Array, *,
           per_image: bool) -> jax.Array:
  """exp(logit_scale)·cos (+ logit_bias for SigLIP) from normalised features.

  Args:
    image_feats: [B, D] normalised.
    text_feats: [..., C, D] shared by the images, or [..., B, C, D] per image (`per_image=True`).
  Returns:
    [..., B, C] float32.
  """
  if per_image:
    cosine = jnp.einsum("bd,...bcd->...bc", image_feats, text_feats)
  else:
    cosine = jnp.einsum("bd,...cd->...bc", image_feats, text_feats)
  out = jnp.exp(clip_params["logit_scale"]) * cosine
  if "logit_bias" in clip_params:
    out = out + clip_params["logit_bias"]
  return out.astype(jnp.float32)


# ------------------------------------------------------------------------------------------ small layers


def torch_linear_init(rng: jax.Array, fan_in: int, fan_out: int, stack: tuple[int, ...] = ()) -> Params:
  """PyTorch's default nn.Linear init (kernel and bias ~ U(±1/sqrt(fan_in))), kernel [*stack, in, out].

  The official recipes (CoCoOp meta-net, MaPLe/MPL couplings, BPL) were tuned with this init.
  """
  bound = 1.0 / np.sqrt(fan_in)
  k_kernel, k_bias = jax.random.split(rng)
  return {"kernel": jax.random.uniform(k_kernel, (*stack, fan_in, fan_out), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(k_bias, (*stack, fan_out), jnp.float32, -bound, bound)}


def clone_linear(rng: jax.Array, fan_in: int, fan_out: int, copies: tuple[int, ...]) -> Params:
  """One PyTorch-default Linear init, replicated to [*copies, ...] float32 (the official `_get_clones`: deep
  copies of one initial layer, as MaPLe / MPL couplings and MMRL's projections start)."""
  layer = torch_linear_init(rng, fan_in, fan_out)
  return jax.tree.map(lambda p: jnp.broadcast_to(p, (*copies, *p.shape)).astype(jnp.float32), layer)


def dense(layer: Params, x: jax.Array) -> jax.Array:
  """x @ kernel + bias; x [..., in] with kernel [in, out]."""
  return x @ layer["kernel"] + layer["bias"]


def stacked_dense(layer: Params, x: jax.Array) -> jax.Array:
  """Per-layer dense: kernel [H, in, out], bias [H, out], x [H, ..., in] -> [H, ..., out]."""
  out = jnp.einsum("h...i,hio->h...o", x, layer["kernel"])
  return out + layer["bias"].reshape(layer["bias"].shape[0], *([1] * (x.ndim - 2)), -1)


# ------------------------------------------------------------------------------------------ Gaussians


def gaussian_kl(mean_q: jax.Array, log_var_q: jax.Array, mean_p: jax.Array | float = 0.0,
                log_var_p: jax.Array | float = 0.0) -> jax.Array:
  """Elementwise KL(N(mean_q, exp(log_var_q)) ‖ N(mean_p, exp(log_var_p))), broadcasting."""
  return 0.5 * (log_var_p - log_var_q
                + (jnp.exp(log_var_q) + jnp.square(mean_q - mean_p)) * jnp.exp(-log_var_p) - 1.0)


def mean_softmax(logits_samples: jax.Array) -> jax.Array:
  """Predictive probabilities [B, C] from [S, B, C] logits: mean over samples of softmax, computed as
  exp(log-mean-exp of log-softmax) (BPL's test rule; identical to averaging the predictions)."""
  log_probs = jax.nn.log_softmax(logits_samples.astype(jnp.float32), axis=-1)
  num_samples = logits_samples.shape[0]
  return jnp.exp(jax.nn.logsumexp(log_probs, axis=0) - jnp.log(num_samples))
