"""The prompt-learner interface, its output, and the method registry (`make_learner`).

A learner is a frozen dataclass holding only static hyper-parameters and the CLIPConfig (hashable, so it
can be closed over or passed as a static argument under jit). Everything else is a pure function:

  class_state = learner.prepare_classes(clip_params, classnames, templates=None, class_prototypes=None)
  params      = learner.init(rng, clip_params, class_state)
  output      = learner.apply(params, clip_params, class_state, images, rng, train, labels=None)
  probs       = learner.predict_probs(output)          # [B, C]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.struct
import jax
import numpy as np

import bayesprompt.clip as clip
from bayesprompt import options
from bayesprompt.errors import UserError, UserTypeError
from bayesprompt.prompts import engine

Params = dict[str, Any]


@flax.struct.dataclass
class LearnerOutput:
  """What `learner.apply` returns.

  Attributes:
    logits: [S, B, C] float32, exp(logit_scale)·cos(image, text) per Monte Carlo sample (S = 1 for
      deterministic learners).
    kl: [] float32 raw KL term of the method (0 for deterministic learners); the objective multiplies it
      by `learner.kl_weight`.
    image_features: [B, D] normalised image features the logits used.
    frozen_image_features: [B, D] normalised frozen-CLIP image features when the learner computed them
      (it leaves the image tower untouched, or it needs them as a condition, as VaMP); None otherwise.
    aux_logits: [S, B, C] float32 logits of a second head trained beside `logits` (MMRL's representation
      head), or None. The objectives apply their likelihood term to both heads and weight them
      (1 - aux_weight) · term(logits) + aux_weight · term(aux_logits).
    aux_loss: [] float32 extra loss terms of the method, already weighted (MMRL's cosine regularisers);
      the objectives add it as is. None: no such terms.
    aux_weight: static Python float in [0, 1], the weight of the `aux_logits` head (ignored without it).
  """

  logits: jax.Array
  kl: jax.Array
  image_features: jax.Array
  frozen_image_features: jax.Array | None = None
  aux_logits: jax.Array | None = None
  aux_loss: jax.Array | None = None
  aux_weight: float = flax.struct.field(pytree_node=False, default=0.0)


@dataclasses.dataclass(frozen=True)
class PromptLearner:
  """Base class of the learners. Subclasses set `method` and implement `_layout`, `init`, `apply`.

  Attributes:
    clip_config: the frozen CLIP's config (static).
    kl_weight: the recipe's weight of `output.kl` in the loss (0 for deterministic learners).
    full_context: pad the class prompts to the full text context (77 for CLIP) instead of trimming them to
      the longest prompt of the class list. The trim is exact (causal mask, EOT pooling) and several times
      cheaper; full_context=True reproduces the reference implementations' work, for benchmarks.
  """

  method: ClassVar[str] = ""
  # The official OVE-PG Dassl trainer of this learner in MingyuKim87/BP_CLIP (what OVE-PG mode="faithful"
  # reproduces), or None where that repository has none (MPL, VaMP, MMRL): faithful is then refused.
  official_ove_pg_trainer: ClassVar[str | None] = None
  # How the CE objective combines Monte Carlo samples (see objectives.ce.per_example_nll).
  sample_reduction: ClassVar[str] = "mean_loss"
  # Whether prepare_classes needs class prototypes (mean frozen image feature per class) at train time.
  needs_class_prototypes: ClassVar[bool] = False
  # Whether the class state must know the training classes (`train_text_features`, `is_train_class`):
  # learners whose test-time rule depends on how a test class relates to the trained ones (APEX, MMRL).
  needs_train_classes: ClassVar[bool] = False
  # Renamed hyper-parameters, old key -> field: `make_learner` still accepts the old key (flagfiles and stored
  # run configs written before the rename), with a FutureWarning.
  renamed_hparams: ClassVar[dict[str, str]] = {}
  clip_config: clip.CLIPConfig
  kl_weight: float = 0.0
  full_context: bool = False

  # ---------------------------------------------------------------- to be provided by the learners

  def _layout(self) -> engine.PromptLayout:
    raise NotImplementedError

  @property
  def touches_image_tower(self) -> bool:
    """True when learner params change the image tower's computation (prompted vision side)."""
    return False

  def num_samples(self, train: bool) -> int:
    """Monte Carlo samples S in `output.logits` (1 for deterministic learners)."""
    return 1

  @property
  def shares_text_features(self) -> bool:
    """True when the logits are exp(logit_scale)·f·tᵀ (+ logit_bias) of the frozen image features f and
    deterministic class text features t = `shared_text_features(...)` that do not depend on the image, row c
    on class c's entries of the class state only, not on its `learner_state` (post-hoc Laplaces then
    differentiate t once per class list instead of once per image: `bayes.prompt_laplace.fit_shared_text`)."""
    return False

  def shared_text_features(self, learner_params: Params, clip_params: Params,
                           class_state: engine.ClassState) -> jax.Array:
    """Normalised class text features [C, D] float32 of a learner with `shares_text_features`."""
    raise NotImplementedError(f"{self.method}: its text features depend on the image or on a random draw")

  def init(self, rng: jax.Array, clip_params: Params, class_state: engine.ClassState) -> Params:
    """Learner params (a pytree of float32 arrays, trainable only). `clip_params` supplies phrase-initialised
    contexts; `class_state` the class count for class-specific contexts."""
    raise NotImplementedError

  def apply(self, learner_params: Params, clip_params: Params, class_state: engine.ClassState,
            images: jax.Array, rng: jax.Array | None = None, train: bool = False,
            labels: jax.Array | None = None) -> LearnerOutput:
    """Logits (and the KL term) of a batch of images against the class list.

    Args:
      learner_params: from `init` (possibly trained on another class list).
      clip_params: frozen CLIP params (a constant: differentiate w.r.t. learner_params only).
      class_state: from `prepare_classes`.
      images: [B, S, S, 3] float, CLIP-normalised.
      rng: PRNG key for the Monte Carlo samples (VPT, VaMP); unused by deterministic learners.
      train: static Python bool (S = num_samples(train); VaMP's prior).
      labels: [B] int class indices, needed in training by VaMP's class-aware prior; ignored otherwise.
    Returns:
      LearnerOutput with logits [S, B, C].
    """
    raise NotImplementedError

  # ---------------------------------------------------------------- shared

  def prepare_classes(self, clip_params: Params, classnames: Sequence[str],
                      templates: str | Sequence[str] | None = None,
                      class_prototypes: jax.Array | np.ndarray | None = None,
                      train_classnames: Sequence[str] | None = None) -> engine.ClassState:
    """Per-class constants (token embeddings, EOT index, ...) of a class list; never parameters.

    Args:
      clip_params: frozen CLIP params.
      classnames: C class names (may differ from the training classes: same learner params apply).
      templates: the dataset's hand-crafted template(s) with "{}": fill `zeroshot_text_features` [C, D]
        (the frozen zero-shot classifier, e.g. OVE-PG's teacher). VaMP also reads its text input from
        the first template.
      class_prototypes: [C, D] mean frozen-CLIP image feature per class over the training images (VaMP's
        class-aware prior); omit at test time.
      train_classnames: the classes the learner is (or was) trained on; used only by learners with
        `needs_train_classes` (ignored otherwise, so callers may always pass it). Default: `classnames`.
    Returns:
      `engine.ClassState`, a pytree of arrays; `learner_state` holds what `learner_class_state` returns
      (class_prototypes and train_classnames reach only the learners that use them).
    """
    if self.needs_train_classes and train_classnames is None:
      train_classnames = classnames
    state = engine.prepare_class_state(clip_params, self.clip_config, self._layout(), classnames,
                                       templates=templates, full_context=self.full_context)
    return state.replace(learner_state=self.learner_class_state(
        clip_params, classnames, templates=templates, class_prototypes=class_prototypes,
        train_classnames=train_classnames))

  def learner_class_state(self, clip_params: Params, classnames: Sequence[str], *,
                          templates: str | Sequence[str] | None,
                          class_prototypes: jax.Array | np.ndarray | None,
                          train_classnames: Sequence[str] | None) -> dict[str, jax.Array]:
    """This learner's own per-class arrays (`ClassState.learner_state`), from `prepare_classes`' arguments.

    The default has none. A learner that needs per-class state overrides this in its own file (calling
    `super()` first, so mixed-in learners such as VaMP-MMRL get both parents' entries); the shared
    `ClassState` does not change.
    """
    del clip_params, classnames, templates, class_prototypes, train_classnames
    return {}

  def predict_probs(self, output: LearnerOutput) -> jax.Array:
    """Predictive class probabilities [B, C]: mean over samples of the softmax (log-mean-exp)."""
    return engine.mean_softmax(output.logits)

  def _frozen_image_features(self, clip_params: Params, images: jax.Array) -> jax.Array:
    return engine.image_features(clip_params, self.clip_config, images)

  def _zero(self) -> jax.Array:
    return jax.numpy.zeros((), jax.numpy.float32)


_REGISTRY: dict[str, type[PromptLearner]] = {}


def template_prepare_classes(self, clip_params: Params, classnames: Sequence[str],
                             templates: str | Sequence[str] | None = None,
                             class_prototypes: jax.Array | np.ndarray | None = None,
                             train_classnames: Sequence[str] | None = None) -> engine.ClassState:
  """`prepare_classes` of the learners whose text input is a hand-crafted template (MMRL, VaMP).

  As `PromptLearner.prepare_classes`; the text input is the first of `templates` (the dataset's
  hand-crafted template) when given, else the learner's `template` field.
  """
  learner = self
  if templates is not None:
    learner = dataclasses.replace(self, template=engine.as_templates(templates)[0])
  return PromptLearner.prepare_classes(learner, clip_params, classnames, templates=templates,
                                       class_prototypes=class_prototypes, train_classnames=train_classnames)


def register(cls: type[PromptLearner]) -> type[PromptLearner]:
  _REGISTRY[cls.method] = cls
  return cls


def methods() -> list[str]:
  """Names `make_learner` accepts."""
  return sorted(_REGISTRY)


def learner_class(method: str) -> type[PromptLearner]:
  """The registered class of a method name. Raises ValueError for an unknown one (listing `methods()`)."""
  if method not in _REGISTRY:
    raise UserError(f"unknown prompt-learning method {method!r}; known methods: {', '.join(methods())}")
  return _REGISTRY[method]


def make_learner(method: str, clip_config: clip.CLIPConfig, **hparams: Any) -> PromptLearner:
  """The learner of a method name with its hyper-parameters (defaults: the method's paper recipe).

  Args:
    method: one of `methods()` (every registered learner).
    clip_config: the frozen CLIP's config.
    **hparams: the learner's dataclass fields (see each learner's docstring); an old key of the learner's
      `renamed_hparams` is read as its new field, with a FutureWarning.
  Raises:
    ValueError: unknown method; TypeError: unknown hyper-parameter (lists the accepted ones).
  """
  cls = learner_class(method)
  if not isinstance(clip_config, clip.CLIPConfig):
    raise TypeError(f"clip_config must be a bayesprompt.clip.CLIPConfig, got {type(clip_config).__name__}")
  hparams = options.resolve_renamed_keys(hparams, cls.renamed_hparams, f"{method} hyper-parameter")
  accepted = {f.name for f in dataclasses.fields(cls)} - {"clip_config"}
  unknown = sorted(set(hparams) - accepted)
  if unknown:
    raise UserTypeError(f"{method}: unknown hyper-parameter(s) {unknown}; accepted: {sorted(accepted)}")
  return cls(clip_config=clip_config, **hparams)
