"""Post-hoc posteriors for a trained prompt learner: score a run with no posterior, a Laplace over its learned
prompt (`bayes.prompt_laplace`), or BayesVLM's projection Laplace with the learner's text features.

  run = prompt_run.load_trained("runs/.../seed1")
  scorer = PosteriorScorer(run, posteriors=("none", "laplace", "bayesvlm"), factors=..., ...)
  results = scorer.score_splits(prompt_run.evaluation_splits(run.cfg, extra_eval_datasets=[...]))

Which Laplace each learner gets (`laplace_kind="auto"`): "full" (dense GGN) when the learner has at most
`max_full_params` trainable parameters (CoOp n_ctx·W_t, VPT n_ctx·W_t + 2·W_t), else "diag" (sampled-label
diagonal GGN: VaMP, MaPLe, ...; by default with one prior precision per parameter leaf, `laplace_prior_groups`,
because these learners' leaves live on different scales). A learner declaring `shares_text_features` (CoOp)
gets the full GGN from its text Jacobian, taken once per class list instead of once per batch of images. Learners that leave the image
tower frozen (CoOp, CoCoOp, VPT) are evaluated on cached frozen image features, so the Laplace's Jacobians and
jvps only re-run the text side.
Stochastic learners (VPT, VaMP) are linearised per draw of their own noise: the Laplace predictive's sample s
uses the learner's draw ε_s and a parameter perturbation δ_s (`prompt_laplace.glm_logit_samples`).

BayesVLM needs the projections' inputs of the learner's towers: for learners whose prompts are shared by all
images (CoOp, VPT with coop conditioning; `learner_text_features`) the class prompts' text features and the
frozen CLIP's image features; for VaMP its prompted image tower and its per-image text prompts
(`vamp_projection_features`, one ProbCosine per image). Other learners are refused with a ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bayesprompt.clip as clip
from bayesprompt.bayes import prompt_laplace
from bayesprompt.bayesvlm import features as features_lib
from bayesprompt.bayesvlm import vlm
from bayesprompt.data import pipeline, protocols
from bayesprompt.data.sources import LabeledSplit
from bayesprompt.errors import UserError
from bayesprompt.eval import metrics as metrics_lib
from bayesprompt.prompts import engine
from bayesprompt.train import prompt_run
from bayesprompt.train.prompt_run import TrainedRun

POSTERIORS = ("none", "laplace", "bayesvlm")
LAPLACE_KINDS = ("auto", "full", "diag")


def check_posteriors(names: Sequence[str]) -> tuple[str, ...]:
  names = tuple(names)
  bad = [n for n in names if n not in POSTERIORS]
  if bad or not names:
    raise ValueError(f"posterior(s) {bad or names!r}; expected a non-empty subset of {POSTERIORS}")
  return names


def load_split(split: LabeledSplit, image_size: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """All images [N, S, S, 3] float32 (evaluation preprocessing) and labels [N] int32 of a split."""
  batches = pipeline.make_pipeline(split, image_size=image_size, batch_size=batch_size, train=False)
  images, labels = [], []
  for batch, n in pipeline.iterate_padded(batches, batch_size):
    images.append(np.asarray(batch["image"], np.float32)[:n])
    labels.append(np.asarray(batch["label"], np.int32)[:n])
  return np.concatenate(images), np.concatenate(labels)


def _on_features(learner):
  """The learner reading normalised frozen image features [B, D] as its `images` (only for learners that
  leave the image tower frozen: they use the frozen features and nothing else of the images)."""
  base = type(learner)

  class OnFeatures(base):
    def _frozen_image_features(self, clip_params, images):
      return images

  OnFeatures.__name__ = f"{base.__name__}OnFeatures"
  fields = {f.name: getattr(learner, f.name) for f in dataclasses.fields(learner) if f.init}
  return OnFeatures(**fields)


def _one_draw(learner):
  """A stochastic learner drawing one sample of its noise per call (the Laplace linearises per draw)."""
  if learner.num_samples(False) == 1:
    return learner
  for name in ("num_test_samples",):
    if hasattr(learner, name):
      return dataclasses.replace(learner, **{name: 1})
  raise ValueError(f"{learner.method}: cannot make a one-draw version (no num_test_samples field)")


def _per_class(class_state: engine.ClassState) -> engine.ClassState:
  """The class state's fields with a leading class axis (the Laplace's per-class Jacobian slices them):
  `learner_state` is dropped (its entries need not have that axis; `shares_text_features` learners do not
  read it)."""
  return class_state.replace(learner_state={})


def learner_text_features(learner, params, clip_params, class_state: engine.ClassState, key: jax.Array,
                          num_samples: int) -> dict[str, jax.Array]:
  """Pre-projection features and embeddings of the learner's class prompts, per draw of its noise.

  Returns {"pre_projection": [S, C, d_t], "embeddings": [S, C, D]} (S = 1 for CoOp, `num_samples` draws of
  VPT's residual, drawn as its `apply` draws them from `key`). Raises ValueError for learners whose prompts
  depend on the image (CoCoOp, VPT-cocoop, VaMP, MaPLe ...): BayesVLM needs shared text features here."""
  method = learner.method
  if method == "coop":
    ctx = params["ctx"][None]
  elif method == "vpt" and getattr(learner, "conditioning", None) == "coop":
    mean, log_var = params["posterior"]["mean"], params["posterior"]["log_var"]
    eps = jax.random.normal(key, (num_samples, *mean.shape), jnp.float32)
    ctx = params["ctx"] + (mean + jnp.exp(0.5 * log_var) * eps)[:, None, :]  # [S, n, W]
  else:
    raise UserError(f"--posterior=bayesvlm supports coop, vpt (coop conditioning) and vamp; {method!r} "
                     "(image-conditioned or deep prompts) has no class prompts shared by all images")
  if getattr(learner, "class_specific", False):
    prompts = jax.vmap(lambda c: engine.build_prompts(class_state, c, class_specific=True))(ctx)
  else:
    prompts = engine.build_prompts(class_state, ctx)  # [S, C, T, W]
  num_draws, num_classes = prompts.shape[:2]
  flat = prompts.reshape(-1, *prompts.shape[2:])
  pool = jnp.broadcast_to(class_state.pool_index, (num_draws, num_classes)).reshape(-1)
  embeddings, out = clip.text_tower_from_embeddings(clip_params, flat, pool, config=learner.clip_config)
  return {"pre_projection": out["pre_projection"].astype(jnp.float32).reshape(num_draws, num_classes, -1),
          "embeddings": embeddings.astype(jnp.float32).reshape(num_draws, num_classes, -1)}


@functools.partial(jax.jit, static_argnames=("learner",))
def vamp_projection_features(learner, params, clip_params, class_state: engine.ClassState, images: jax.Array,
                             key: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """VaMP's projection inputs with the draws its `apply(..., key)` makes: image {"pre_projection" [B, d_v],
  "embeddings" [B, D]} of its prompted image tower, and text {..: [S, B, C, ·]} of its per-image prompts."""
  config = learner.clip_config
  frozen = learner._frozen_image_features(clip_params, images)
  embeddings, out = clip.image_tower(clip_params, images, config=config, edits=learner.vision_edits(params))
  image = {"pre_projection": out["pre_projection"].astype(jnp.float32), "embeddings": embeddings.astype(jnp.float32)}
  mean, log_var = learner.posterior(params, frozen)
  z = learner.sample_prompts(key, mean, log_var, train=False)
  return image, learner.sampled_text_features(clip_params, class_state, z, projection_inputs=True)


@dataclasses.dataclass
class PosteriorScorer:
  """Scores a trained run's predictive on splits with each posterior in `posteriors`.

  Attributes:
    run: the restored run (`prompt_run.load_trained`).
    posteriors: subset of POSTERIORS.
    laplace_kind: "auto", "full" or "diag"; max_full_params: the "auto" threshold.
    laplace_predictive: "probit" or "mc"; laplace_samples: jvp samples of the predictive (stochastic learners:
      at least the learner's own number of test draws); laplace_jacobian: deterministic learners use the
      explicit Jacobian (exact logit covariance) instead of jvp samples.
    shared_text_path: learners with `shares_text_features` (CoOp) fit the full GGN (and the Jacobian
      predictive) from the text Jacobian, once per class list (`prompt_laplace.fit_shared_text`); equal to
      the generic path, 2.8x cheaper on the sandbox; class_chunk: classes per vmap-ed Jacobian batch.
    bayesvlm_posteriors: {"img", "txt"}: `vlm.TowerPosterior` (from `vlm.tower_posterior`), for "bayesvlm".
    bayesvlm_predictive: "probit" or "mc".
    laplace_model_samples: draws of a stochastic learner's noise averaged into the full GGN (each costs one
      Jacobian; the sandbox table uses 1).
    laplace_prior_groups: the diagonal Laplace's prior: one λ per params leaf ("leaves",
      `prompt_laplace.fit_prior_precision_groups`; a learner's leaves live on different scales), or "one" λ;
      the full GGN always fits one λ.
  """

  run: TrainedRun
  posteriors: Sequence[str] = ("none", "laplace")
  laplace_kind: str = "auto"
  max_full_params: int = 4096
  laplace_predictive: str = "probit"
  laplace_samples: int = 32
  laplace_jacobian: bool = False
  bayesvlm_posteriors: Mapping[str, Any] | None = None
  bayesvlm_predictive: str = "probit"
  batch_size: int = 512
  seed: int = 0
  laplace_model_samples: int = 1
  # Examples per vmap-ed batch of per-example gradients ("diag"): VaMP at 64 needed 11.5 GB (OOM-killed).
  diag_chunk: int = 8
  # Learners with `shares_text_features` (CoOp): the full GGN and the Jacobian predictive from the text
  # Jacobian, once per class list (`prompt_laplace.fit_shared_text`); False: the generic per-batch path.
  # Learners that read images (VaMP, MaPLe, ...): jvp samples of the Laplace predictive vmap-ed at once, and
  # images x samples per step.
  image_sample_chunk: int = 8
  image_sample_budget: int = 256
  shared_text_path: bool = True
  class_chunk: int | None = 64  # classes per vmap-ed batch of the text Jacobian (memory: D cotangents each)
  # Shared-text fit: None = the exact GGN (D vjps per class); r = the low-rank GGN along each class's top-r
  # image-feature directions (`prompt_laplace.feature_subspace`), about r/D of the exact fit's Jacobian cost.
  laplace_rank: int | None = None
  laplace_prior_groups: str = "leaves"

  def __post_init__(self):
    self.posteriors = check_posteriors(self.posteriors)
    if self.laplace_kind not in LAPLACE_KINDS:
      raise ValueError(f"laplace_kind={self.laplace_kind!r}; expected one of {LAPLACE_KINDS}")
    if self.laplace_prior_groups not in prompt_laplace.PRIOR_GROUPS:
      raise ValueError(f"laplace_prior_groups={self.laplace_prior_groups!r}; expected one of "
                       f"{prompt_laplace.PRIOR_GROUPS}")
    if self.laplace_predictive not in prompt_laplace.PREDICTIVES:
      raise ValueError(f"laplace_predictive={self.laplace_predictive!r}; expected one of "
                       f"{prompt_laplace.PREDICTIVES}")
    if "bayesvlm" in self.posteriors and not self.bayesvlm_posteriors:
      raise UserError("posterior 'bayesvlm' needs the projection posteriors (KFAC factors: --factors_dir)")
    learner = self.run.learner
    self.on_features = not learner.touches_image_tower
    base = _on_features(learner) if self.on_features else learner
    self.model = _one_draw(base)
    self.num_draws = learner.num_samples(False)
    # jit with the frozen CLIP as an argument (a closed-over array would be compiled in as a constant).
    self.predict = jax.jit(self._predict_none)
    self._image_fn = jax.jit(functools.partial(engine.image_features, config=learner.clip_config))
    self.apply = self._make_apply()
    self.shared_text = (self.shared_text_path and self.on_features and self.num_draws == 1
                        and learner.shares_text_features)
    self._text_fn = lambda params, key, clip_params, class_state: learner.shared_text_features(
        params, clip_params, class_state)
    self.laplace = None
    self.laplace_info: dict[str, Any] = {}
    self.timings: dict[str, float] = {}

  # ------------------------------------------------------------------ inputs

  def inputs(self, images: np.ndarray) -> jax.Array:
    """What the learner reads: frozen normalised image features [N, D] (image tower untouched) or images."""
    if not self.on_features:
      return jnp.asarray(images)
    return jnp.concatenate([self._image_fn(self.run.clip_params, images=jnp.asarray(images[s:s + self.batch_size]))
                            for s in range(0, len(images), self.batch_size)])

  def _class_state(self, classnames: Sequence[str], template: str) -> engine.ClassState:
    return self.run.learner.prepare_classes(self.run.clip_params, list(classnames), templates=[template],
                                            train_classnames=list(self.run.train_classnames))

  def _make_apply(self):
    """apply(params, inputs, key, (clip_params, class_state)) -> logits [B, C] of one draw: one function per
    scorer (jit caches on it); the frozen CLIP and the class list travel as traced `context`."""
    model = self.model

    def apply(params, inputs, key, context):
      clip_params, class_state = context
      return model.apply(params, clip_params, class_state, inputs, key, train=False).logits[0]

    return apply

  def _predict_none(self, params, clip_params, class_state, inputs, key):
    base = _on_features(self.run.learner) if self.on_features else self.run.learner
    output = base.apply(params, clip_params, class_state, inputs, key, train=False)
    return base.predict_probs(output)

  # ------------------------------------------------------------------ fitting

  def kind(self) -> str:
    if self.laplace_kind != "auto":
      return self.laplace_kind
    size = sum(int(np.size(x)) for x in jax.tree.leaves(self.run.params))
    return "full" if size <= self.max_full_params else "diag"

  def fit_laplace(self, train_split: LabeledSplit) -> dict[str, Any]:
    """Fits the Laplace on the run's training split (evaluation preprocessing, no augmentation)."""
    images, labels = load_split(train_split, self.run.clip_config.vision.image_size, self.batch_size)
    start = time.perf_counter()
    inputs = self.inputs(images)
    class_state = self._class_state(train_split.classnames, train_split.template)
    kind = self.kind()
    stochastic = self.num_draws > 1
    if kind == "full" and self.shared_text:
      posterior, info = prompt_laplace.fit_shared_text(
          self._text_fn, self.run.params, inputs, jnp.asarray(labels), jax.random.key(self.seed),
          self.run.clip_params, _per_class(class_state), *self._logit_scale_bias(),
          class_chunk=self.class_chunk, rank=self.laplace_rank)
    else:
      posterior, info = prompt_laplace.fit(
          self.apply, self.run.params, inputs, jnp.asarray(labels), jax.random.key(self.seed),
          (self.run.clip_params, class_state), kind=kind,
          chunk_size=None if kind == "full" else self.diag_chunk,
          num_model_samples=self.laplace_model_samples if stochastic else 1, tangent_chunk=128,
          prior_groups=self.laplace_prior_groups if kind == "diag" else "one")
    jax.block_until_ready(posterior)
    self.timings["fit_seconds"] = time.perf_counter() - start
    self.laplace = posterior
    self.laplace_info = info
    return info

  # ------------------------------------------------------------------ scoring

  def probabilities(self, split: LabeledSplit, images: np.ndarray) -> dict[str, np.ndarray]:
    """{posterior: predictive probabilities [N, C]} of one split."""
    class_state = self._class_state(split.classnames, split.template)
    inputs = self.inputs(images)
    key = jax.random.key(self.seed)
    out = {}
    for name in self.posteriors:
      start = time.perf_counter()
      if name == "none":
        probs = self._batched(lambda x, k: self.predict(self.run.params, self.run.clip_params, class_state, x, k),
                              inputs, key)
      elif name == "laplace":
        probs = self._laplace_probs(class_state, inputs, key)
      else:
        probs = self._bayesvlm(class_state, images, key)
      out[name] = np.asarray(probs)
      self.timings[f"{name}_seconds"] = self.timings.get(f"{name}_seconds", 0.0) + time.perf_counter() - start
    return out

  def _laplace_probs(self, class_state, inputs, key):
    if self.laplace is None:
      raise ValueError("fit_laplace must run before scoring the 'laplace' posterior")
    context = (self.run.clip_params, class_state)
    num = max(self.laplace_samples, self.num_draws)
    # Deterministic learners with a full posterior could use the explicit Jacobian (exact moments), but it
    # costs P jvps (generic) or D vjps per class (shared text) of the θ-dependent part; `laplace_samples` jvps
    # are cheaper (sandbox CoOp: 1.32x a deterministic evaluation against 2.4-2.6x; benchmarks/RESULTS.md).
    use_jacobian = self.laplace_jacobian and self.num_draws == 1
    if use_jacobian and self.shared_text:  # the text Jacobian once for the class list, then einsums
      text, text_jac = prompt_laplace.shared_text_jacobian(
          self._text_fn, self.run.params, key, self.run.clip_params, _per_class(class_state),
          class_chunk=self.class_chunk)
      return jax.block_until_ready(prompt_laplace.shared_text_predictive(
          self.laplace, text, text_jac, inputs, key, *self._logit_scale_bias(),
          method=self.laplace_predictive, num_samples=num))
    # Learners that read images: a jvp sample costs a forward of the image batch, so images and samples go in
    # chunks (VaMP at 512 images x 32 samples asked for 57 GB).
    sample_chunk = None if self.on_features else min(num, self.image_sample_chunk)
    batch = None if self.on_features else max(1, self.image_sample_budget // sample_chunk)
    return self._batched(lambda x, k: prompt_laplace.glm_predictive(
        self.apply, self.run.params, self.laplace, x, k, context, method=self.laplace_predictive, num_samples=num,
        use_jacobian=use_jacobian, tangent_chunk=128, sample_chunk=sample_chunk), inputs, key, batch=batch)

  def _logit_scale_bias(self) -> tuple[jax.Array, jax.Array | float]:
    """(exp(logit_scale), logit_bias or 0) of the frozen CLIP: `engine.logits`' affine map of the cosines."""
    params = self.run.clip_params
    return jnp.exp(params["logit_scale"]), params["logit_bias"] if "logit_bias" in params else 0.0

  def _batched(self, fn, inputs, key, batch: int | None = None):
    size = inputs.shape[0]
    if batch is None:
      batch = size if self.on_features else self.batch_size  # features: one batch (the text side runs once)
    parts = [fn(inputs[s:s + batch], jax.random.fold_in(key, s)) for s in range(0, size, batch)]
    return jax.block_until_ready(jnp.concatenate(parts))

  def _bayesvlm(self, class_state, images, key):
    run = self.run
    params, config = run.clip_params, run.clip_config
    scale = float(np.asarray(params["logit_scale"]))
    bias = vlm.logit_bias_of(params) if "logit_bias" in params else None
    towers = self.bayesvlm_posteriors

    def predictive(image, text):  # per-draw BayesVLM probabilities [B, C]
      return jnp.exp(vlm.zero_shot_predictive(towers["img"], towers["txt"], image, text, scale, bias,
                                              method=self.bayesvlm_predictive, key=key))

    per_image = run.learner.method == "vamp"
    # The draws of the learner's own noise are those of its 'none' predictive (first batch key).
    shared = None if per_image else learner_text_features(run.learner, run.params, params, class_state,
                                                          jax.random.fold_in(key, 0), self.num_draws)
    # Jitted once per call: eager vmap dispatched op by op (VaMP on 1000 images took > 10 CPU-min per split).
    per_image_draw = jax.jit(jax.vmap(lambda img, txt: predictive(jax.tree.map(lambda x: x[None], img), txt)[0]))
    probs = []
    for s in range(0, len(images), self.batch_size):  # the 'none' predictive's batches: the same draws
      batch = images[s:s + self.batch_size]
      if per_image:  # VaMP: its prompted image tower and per-image text prompts, one image at a time
        image, text = vamp_projection_features(run.learner, run.params, params, class_state, jnp.asarray(batch),
                                               jax.random.fold_in(key, s))
        draws = [per_image_draw(image, jax.tree.map(lambda x, d=d: x[d], text))
                 for d in range(text["embeddings"].shape[0])]
      else:
        image = features_lib.image_features(params, config, batch)
        draws = [predictive(image, jax.tree.map(lambda x, d=d: x[d], shared))
                 for d in range(shared["embeddings"].shape[0])]
      probs.append(jnp.mean(jnp.stack(draws), axis=0))
    return jax.block_until_ready(jnp.concatenate(probs))

  def score_splits(self, splits: Mapping[str, LabeledSplit], *, max_examples: int | None = None,
                   png_dir: str | pathlib.Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{split name: {posterior: {accuracy, nll, ece, brier, num_examples}}}; reliability PNGs per split into
    `png_dir` (one panel per posterior)."""
    results = {}
    for name, split in splits.items():
      split = protocols.evaluation_subset(split, max_examples)
      images, labels = load_split(split, self.run.clip_config.vision.image_size, self.batch_size)
      probs = self.probabilities(split, images)
      results[name] = {post: predictive_metrics(p, labels) for post, p in probs.items()}
      if png_dir is not None:
        from bayesprompt.eval import plots

        path = pathlib.Path(png_dir) / f"reliability_{name.replace('/', '_')}.png"
        plots.reliability_png(path, probs, labels, title=f"{self.run.cfg.method} {name}")
    return results


def predictive_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """accuracy, nll (probabilities clipped at 1e-12), ece, brier of predictive probabilities [N, C]."""
  probs = jnp.asarray(probs, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if not bool(jnp.all(jnp.isfinite(probs))):
    raise FloatingPointError("the predictive probabilities have non-finite entries")
  return {"accuracy": float(metrics_lib.accuracy(probs, labels)),
          "nll": float(metrics_lib.nll(jnp.clip(probs, 1e-12, 1.0), labels)),
          "ece": float(metrics_lib.ece(probs, labels)),
          "brier": float(metrics_lib.brier(probs, labels)),
          "num_examples": int(labels.shape[0])}


def score_runs(run_dirs: Sequence[str], scores_dir: str | pathlib.Path, posteriors: Sequence[str],
               bayesvlm_config: Mapping[str, Any] | None = None, *, extra_eval_datasets: Sequence[str] = (),
               max_eval_examples: int | None = None, **scorer_kwargs: Any) -> dict[str, str]:
  """`experiments.calibrate_prompts`: scores every run directory with each posterior, writes per run
  posterior_results.json and reliability PNGs under scores_dir/<method>_<objective>_seed<k>/, and
  results.{md,csv,json} over the runs (rows "<method>+<objective> / <posterior>"). Returns the table paths.

  `bayesvlm_config`: the BayesVLM settings (`experiments.bayesvlm_flags.zeroshot_config()`: factors_dir,
  pseudo_data_count, prior_precision, evidence_mode, predictive), needed with the "bayesvlm" posterior."""
  import json

  from bayesprompt.bayesvlm import factors as factors_lib
  from bayesprompt.eval.results import ResultsWriter

  posteriors = check_posteriors(posteriors)
  if not run_dirs:
    raise ValueError("no run directories given: name at least one trained run directory")
  scores_dir = pathlib.Path(scores_dir)
  # Rows are (learner, posterior) pairs on one dataset: no average row over them.
  writer = ResultsWriter(scores_dir, title="Post-hoc posteriors for prompt learners",
                         row_label="learner / posterior", average=False)
  for run_dir in run_dirs:
    run = prompt_run.load_trained(run_dir)
    name = f"{run.cfg.method}+{run.cfg.objective}"
    out_dir = scores_dir / f"{name.replace('+', '_')}_seed{run.cfg.seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    towers, predictive = None, "probit"
    if "bayesvlm" in posteriors:
      if bayesvlm_config is None:
        raise ValueError("the 'bayesvlm' posterior needs the BayesVLM settings (factors_dir, ...)")
      towers, _, _, _ = factors_lib.posteriors(
          dict(bayesvlm_config), run.clip_config, run.clip_params, clip.get_tokenizer(run.clip_config), out_dir,
          features_lib.params_fingerprint(run.clip_params))
      predictive = bayesvlm_config["predictive"]
    scorer = PosteriorScorer(run, posteriors=posteriors, bayesvlm_posteriors=towers,
                             bayesvlm_predictive=predictive, **scorer_kwargs)
    data = prompt_run.protocol_data(run.cfg)
    info = scorer.fit_laplace(data.train) if "laplace" in posteriors else {}
    splits = prompt_run.evaluation_splits(run.cfg, data, extra_eval_datasets)
    results = scorer.score_splits(splits, max_examples=max_eval_examples, png_dir=out_dir)
    (out_dir / "posterior_results.json").write_text(json.dumps(
        {"run_dir": str(run_dir), "laplace": info, "timings": scorer.timings, "results": results}, indent=1))
    print(f"{name} seed {run.cfg.seed}: laplace {info}  timings {scorer.timings}")
    for split, per_posterior in results.items():
      for post, metrics in per_posterior.items():
        writer.add(f"{name} / {post}", run.cfg.seed, {k: v for k, v in metrics.items() if k != "num_examples"},
                   split=split)
  paths = writer.write()
  print(writer.markdown())
  return paths


# ------------------------------------------------------------------------------------------------------------
# Tables over scored runs (experiments.posterior_table).
# ------------------------------------------------------------------------------------------------------------

PROTOCOL_SPLITS = ("base", "new")
SUMMARY_GROUPS = ("base", "new", "shifted")
SUMMARY_METRICS = ("accuracy", "nll", "ece")


def collect_scores(scores_dirs: Sequence[str | pathlib.Path]) -> dict[tuple[str, int], dict[str, Any]]:
  """Every `posterior_results.json` under `scores_dirs` (searched recursively; written by `score_runs` into
  <learner>_seed<k>/): {(learner, seed): {"laplace": {seed's Laplace info}, "results": {split: {posterior:
  metrics}}}}. A later directory's metrics for the same learner, seed, split and posterior replace an earlier
  one's (so re-scoring one posterior of older runs keeps their other posteriors). Raises UserError when a
  directory is missing or holds no scores."""
  import json
  import re

  merged: dict[tuple[str, int], dict[str, Any]] = {}
  for directory in scores_dirs:
    directory = pathlib.Path(directory)
    files = sorted(directory.rglob("posterior_results.json")) if directory.is_dir() else []
    if not files:
      raise UserError(f"{directory}: no posterior_results.json under it (expected the --scores_dir of "
                      "experiments.calibrate_prompts)")
    for path in files:
      match = re.fullmatch(r"(.+)_seed(\d+)", path.parent.name)
      if match is None:
        raise UserError(f"{path}: its folder is not named <learner>_seed<k>")
      entry = merged.setdefault((match[1], int(match[2])), {"laplace": {}, "results": {}})
      scored = json.loads(path.read_text())
      if scored.get("laplace"):
        entry["laplace"] = scored["laplace"]
      for split, per_posterior in scored["results"].items():
        entry["results"].setdefault(split, {}).update(per_posterior)
  return merged


def summary_rows(scores: Mapping[tuple[str, int], Mapping[str, Any]],
                 groups: Sequence[str] = SUMMARY_GROUPS) -> list[dict[str, Any]]:
  """One row per (learner, posterior): for each group ("base", "new", or "shifted" = per seed the mean over its
  splits other than base and new) and metric, the per-seed values and their mean and sample std (ddof 1; 0
  for one seed). Seeds lacking a group are left out of that group's cell."""
  unknown = [g for g in groups if g not in SUMMARY_GROUPS]
  if unknown:
    raise UserError(f"groups {unknown}; expected some of {SUMMARY_GROUPS}")
  learners = list(dict.fromkeys(learner for learner, _ in scores))
  rows = []
  for learner in learners:
    seeds = sorted(seed for name, seed in scores if name == learner)
    posteriors = list(dict.fromkeys(post for seed in seeds for split in scores[learner, seed]["results"].values()
                                    for post in split))
    for post in posteriors:
      row: dict[str, Any] = {"learner": learner, "posterior": post, "cells": {}}
      for group in groups:
        per_seed: dict[str, list[float]] = {m: [] for m in SUMMARY_METRICS}
        num_splits = set()
        for seed in seeds:
          results = scores[learner, seed]["results"]
          splits = [group] if group != "shifted" else [s for s in results if s not in PROTOCOL_SPLITS]
          splits = [s for s in splits if post in results.get(s, {})]
          if not splits:
            continue
          num_splits.add(len(splits))
          for metric in SUMMARY_METRICS:
            per_seed[metric].append(float(np.mean([results[s][post][metric] for s in splits])))
        if per_seed["accuracy"]:
          row["cells"][group] = {
              "seeds": len(per_seed["accuracy"]), "splits": sorted(num_splits),
              **{m: {"values": v, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                 for m, v in per_seed.items()}}
      rows.append(row)
  return rows


def summary_markdown(rows: Sequence[Mapping[str, Any]], groups: Sequence[str] = SUMMARY_GROUPS) -> str:
  """The rows as a Markdown table: accuracy (%) / NLL / ECE, mean ± std over seeds, the seeds per cell."""
  header = "| learner | posterior | " + " | ".join(f"{g}: seeds, acc / NLL / ECE" for g in groups) + " |"
  lines = [header, "|" + "---|" * (2 + len(groups))]
  for row in rows:
    cells = []
    for group in groups:
      cell = row["cells"].get(group)
      if cell is None:
        cells.append("not scored")
        continue
      acc, nll, ece = (cell[m] for m in SUMMARY_METRICS)
      cells.append(f"{cell['seeds']}: {100 * acc['mean']:.1f}±{100 * acc['std']:.1f} / "
                   f"{nll['mean']:.3f}±{nll['std']:.3f} / {ece['mean']:.3f}±{ece['std']:.3f}")
    lines.append(f"| {row['learner']} | {row['posterior']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
