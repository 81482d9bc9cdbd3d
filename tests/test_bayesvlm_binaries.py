"""The BayesVLM binaries (estimate_hessian, bayesvlm, active_learning) and the library code they wire.

Model: a tiny random CLIP with the sandbox architecture's tokenizer (saved with clip.save_checkpoint), so the
real checkpoint-loading path runs. Data: `tfds.testing.mock_data` for the classification splits, an in-memory
caption store (oracles) and the sandbox's generated 192-pair smoke corpus (the binaries' --runlocal).
Oracles: per-example tower forwards, the per-sample GGN `laplace.embedding_ggn` summed by brute force, the
dense Kronecker covariance, a brute-force nearest-neighbour ordering, the closed-form first AdamW step.
"""

import dataclasses
import math
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from bayesprompt import clip
from bayesprompt.bayes import laplace
from bayesprompt.bayesvlm import active, hessian, vlm
from bayesprompt.bayesvlm import active_learning as bv_active_learning
from bayesprompt.bayesvlm import factors as factors_lib
from bayesprompt.bayesvlm import features as features_lib
from bayesprompt.bayesvlm import zeroshot as bv_zeroshot
from bayesprompt.data import preprocess, sources
from bayesprompt.data.sandbox import model as sandbox_model
from tests.conftest import binary_module
from tests.test_laplace import official_kfac_ggn

# Tiny towers and float64 oracles: XLA's optimisation passes cost more compile time than they save (cold
# suite), and the warm run is no slower (tests/conftest.py::fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")

# Imported per test module (see conftest.binary_module): binaries' absl flags clash in one process.
bayesvlm_flags = None


@pytest.fixture(scope="module", autouse=True)
def _binaries():
  global bayesvlm_flags
  # The three binaries define their flags (shared groups in experiments.bayesvlm_flags) on import.
  with binary_module("experiments.bayesvlm_flags", "experiments.active_learning", "experiments.bayesvlm",
                     "experiments.estimate_hessian") as (bayesvlm_flags, *_):
    yield

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(checkpoint dir, config, params) of a tiny random sandbox-tokenizer CLIP."""
  root = tmp_path_factory.mktemp("tiny")
  sandbox_model.tokenizer().to_json(root / "tok.json")
  cfg = sandbox_model.config(str(root / "tok.json"), width=32, layers=1, heads=1, mlp_dim=64)
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, width=24, layers=1, heads=1, mlp_dim=48), embed_dim=16)
  clip.save_checkpoint(root / "ckpt", cfg, clip.init_params(cfg, jax.random.key(0)))
  config, params = clip.load_checkpoint(root / "ckpt")
  return str(root / "ckpt"), config, params


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sandbox_data"))
  old = os.environ.get("BAYESPROMPT_DATA_DIR")
  os.environ["BAYESPROMPT_DATA_DIR"] = path  # the smoke caption corpus is generated here
  yield path
  if old is None:
    os.environ.pop("BAYESPROMPT_DATA_DIR", None)
  else:
    os.environ["BAYESPROMPT_DATA_DIR"] = old


def parse_flags(*argv):
  FLAGS.unparse_flags()
  FLAGS(["test", "--noprogress", "--num_threads=2", *argv])


# ------------------------------------------------------------------------------------------------------------
# Library: features, factors, posteriors, predictive, selection, fine-tuning.
# ------------------------------------------------------------------------------------------------------------


def test_split_features_match_per_example_forward_and_resume(tiny, tmp_path, monkeypatch):
  _, config, params = tiny
  with tfds.testing.mock_data(num_examples=11):
    split = sources.open_split("sandbox_shapes", "test")
    out = features_lib.extract_split_features(params, config, split, cache_dir=tmp_path, batch_size=4,
                                              chunk_size=8, progress=False, num_threads=1)
    images = np.stack([preprocess.eval_image(split[i]["image"], 32) for i in range(len(split))])
    labels = split.labels
  _, tower_out = clip.image_tower(params, images, config=config)
  np.testing.assert_allclose(out["pre_projection"], tower_out["pre_projection"], atol=1e-5)
  np.testing.assert_allclose(out["embeddings"], clip.encode_image(params, images, config=config), atol=1e-5)
  np.testing.assert_array_equal(out["labels"], labels)
  chunks = sorted(tmp_path.glob("*/chunk_*.npz"))
  assert len(chunks) == 2  # 11 examples in chunks of 8
  chunks[1].unlink()  # an interrupted run: the second chunk is missing and gets recomputed, the first is read
  calls = []
  real = features_lib._extract_chunk
  monkeypatch.setattr(features_lib, "_extract_chunk", lambda *a: calls.append(1) or real(*a))
  with tfds.testing.mock_data(num_examples=11):
    again = features_lib.extract_split_features(params, config, sources.open_split("sandbox_shapes", "test"),
                                                cache_dir=tmp_path, batch_size=4, chunk_size=8, progress=False,
                                                num_threads=1)
  assert len(calls) == 1
  for k in out:
    np.testing.assert_allclose(again[k], out[k], atol=1e-6)
  with pytest.raises(ValueError, match="empty split"):
    features_lib.extract_split_features(params, config, split.select([]), progress=False)


class _Store:
  """An in-memory caption store; `fail_after` reads raise (an interrupted run)."""

  def __init__(self, n, fail_after=None):
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "circle", "square", "a", "photo", "of", "small", "big"]
    self.examples = [{"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                      "caption": " ".join(rng.choice(words, 4))} for _ in range(n)]
    self.reads = 0
    self.fail_after = fail_after

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.reads += 1
    if self.fail_after is not None and self.reads > self.fail_after:
      raise RuntimeError("simulated crash")
    return self.examples[i]


def test_pair_factors_match_brute_force_ggn_and_resume(tiny, tmp_path):
  _, config, params = tiny
  tok = clip.get_tokenizer(config)
  n, class_batch = 20, 8
  kwargs = dict(tokenizer=tok, class_batch_size=class_batch, batch_size=4, seed=3, progress=False, num_threads=1)
  factors, info = hessian.estimate_pair_factors(params, config, hessian.CaptionPairs(_Store(n), name="mem"),
                                                **kwargs)
  assert info["num_class_batches"] == 3 and info["likelihood"] == "infonce"
  # Oracle: every pair's features by a direct forward, per-sample GGNs summed over each class batch.
  store = _Store(n)
  order = np.random.default_rng(3).permutation(n)
  images = np.stack([preprocess.eval_image(store.examples[i]["image"], 32) for i in order])
  ids = tok([store.examples[i]["caption"] for i in order], context_length=config.text.context_length)
  _, img_out = clip.image_tower(params, images, config=config)
  _, txt_out = clip.text_tower(params, ids, config=config)
  g_img = clip.project_image(params, img_out["pre_projection"], config=config)
  g_txt = clip.project_text(params, txt_out["pre_projection"], config=config)
  scale = params["logit_scale"]
  for tower, phi, g, other in (("img", img_out["pre_projection"], g_img, g_txt),
                               ("txt", txt_out["pre_projection"], g_txt, g_img)):
    per_sample = jax.jit(jax.vmap(laplace.embedding_ggn, in_axes=(0, None, None)))
    b_sum = sum(per_sample(g[s:s + class_batch], other[s:s + class_batch], scale).sum(0)
                for s in range(0, n, class_batch))
    np.testing.assert_allclose(factors[tower].a, phi.T @ phi / math.sqrt(n), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(factors[tower].b, b_sum / math.sqrt(n), rtol=1e-3, atol=1e-4)
  # The official switch: BayesVLM's kfac_ggn (transliterated in tests/test_laplace.py) with la_batch_size=3 on
  # the same pairs in the same order drops the trailing 4 pairs and, in each class batch of 8, 2 pairs from B.
  official, official_info = hessian.estimate_pair_factors(
      params, config, hessian.CaptionPairs(_Store(n), name="mem"), la_batch_size=3, **kwargs)
  assert official_info["num_class_batches"] == 2 and official_info["la_batch_size"] == 3
  for tower, phi, g, other in (("img", img_out["pre_projection"], g_img, g_txt),
                               ("txt", txt_out["pre_projection"], g_txt, g_img)):
    a, b = official_kfac_ggn(*(np.asarray(x, np.float64) for x in (g, phi, other)), class_batch, 3,
                             float(scale), "infonce")
    np.testing.assert_allclose(official[tower].a, a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(official[tower].b, b, rtol=1e-3, atol=1e-4)
    assert float(official[tower].num_data) == 16
  with pytest.raises(ValueError, match="one device"):
    hessian.estimate_pair_factors(params, config, hessian.CaptionPairs(_Store(n), name="mem"),
                                  la_batch_size=3, mesh=object(), **kwargs)
  # Interrupted after the first class batch (8 pairs = 8 reads), resumed from the checkpoint: same factors.
  ckpt = tmp_path / "partial"
  with pytest.raises(RuntimeError, match="simulated crash"):
    hessian.estimate_pair_factors(params, config, hessian.CaptionPairs(_Store(n, fail_after=10), name="mem"),
                                  checkpoint_dir=ckpt, **kwargs)
  assert [p.name for p in ckpt.glob("step_*")] == ["step_000001"]
  resumed_store = _Store(n)
  resumed, _ = hessian.estimate_pair_factors(params, config, hessian.CaptionPairs(resumed_store, name="mem"),
                                             checkpoint_dir=ckpt, **kwargs)
  assert resumed_store.reads == n - class_batch  # the first class batch was not read again
  for tower in ("img", "txt"):
    np.testing.assert_allclose(resumed[tower].a, factors[tower].a, atol=1e-5)
    np.testing.assert_allclose(resumed[tower].b, factors[tower].b, atol=1e-5)
  with pytest.raises(ValueError, match="another estimate"):
    hessian.estimate_pair_factors(params, config, hessian.CaptionPairs(_Store(n), name="mem"),
                                  checkpoint_dir=ckpt, **{**kwargs, "seed": 4})
  with pytest.raises(ValueError, match="num_pairs=21"):
    hessian.estimate_pair_factors(params, config, hessian.CaptionPairs(_Store(n), name="mem"), num_pairs=21,
                                  **kwargs)


def _random_factors(key, p, q):
  ka, kb = jax.random.split(key)
  a, b = jax.random.normal(ka, (p, p)), jax.random.normal(kb, (q, q))
  return laplace.KFACFactors(a @ a.T / p, b @ b.T / q, jnp.asarray(10.0))


def test_zero_shot_predictive_matches_dense_kronecker_oracle(tiny):
  _, config, params = tiny
  (d_v, dim), (d_t, _) = vlm.projection_dims(params, config, "img"), vlm.projection_dims(params, config, "txt")
  posts = {t: vlm.tower_posterior(_random_factors(jax.random.key(i), d, dim), params, config, t,
                                  pseudo_data_count=10.0, prior_precision=lam)[0]
           for i, (t, d, lam) in enumerate((("img", d_v, 2.0), ("txt", d_t, 3.0)))}
  rng = np.random.default_rng(0)
  image = {"pre_projection": rng.normal(size=(5, d_v)).astype(np.float32)}
  text = {"pre_projection": rng.normal(size=(4, d_t)).astype(np.float32)}
  image["embeddings"] = image["pre_projection"] @ np.asarray(params["visual"]["proj"]["kernel"])
  text["embeddings"] = text["pre_projection"] @ np.asarray(params["text"]["proj"]["kernel"])
  scale = float(params["logit_scale"])
  got = vlm.zero_shot_predictive(posts["img"], posts["txt"], image, text, scale)
  # Oracle: the weight covariance as a dense Kronecker product, the embedding covariance φᵀ-blocks of it.
  def diag_var(post, phi):
    a_inv, b_inv = (np.asarray(m, np.float64) for m in laplace.covariance_factors(post.posterior))
    cov_w = np.kron(a_inv, b_inv)  # row-major vec(W)
    q = b_inv.shape[0]
    out = []
    for x in np.asarray(phi, np.float64):
      jac = np.kron(x[None], np.eye(q))  # g = Wᵀ φ: ∂g/∂vec(W) = φᵀ ⊗ I
      out.append(np.diag(jac @ cov_w @ jac.T))
    return np.array(out)
  vg, vh = diag_var(posts["img"], image["pre_projection"]), diag_var(posts["txt"], text["pre_projection"])
  mg, mh = (np.asarray(x["embeddings"], np.float64) for x in (image, text))
  eg, eh = (mg**2 + vg).sum(-1), (mh**2 + vh).sum(-1)
  mean = mg @ mh.T / np.sqrt(np.outer(eg, eh))
  var = ((mg**2 + vg) @ vh.T + vg @ (mh**2).T) / np.outer(eg, eh)
  s = math.exp(scale)
  z = s * mean / np.sqrt(1 + math.pi / 8 * s**2 * var)
  expected = z - np.log(np.exp(z).sum(-1, keepdims=True))
  np.testing.assert_allclose(got, expected, atol=2e-4)
  # SigLIP's bias in the ProbCosine mean (our default; the official BayesVLM leaves it out, which is what
  # logit_bias=None / the bayesvlm flag --noprobcosine_logit_bias gives, checked just above).
  bias = -3.0
  with_bias = vlm.zero_shot_predictive(posts["img"], posts["txt"], image, text, scale, bias)
  z = (s * mean + bias) / np.sqrt(1 + math.pi / 8 * s**2 * var)
  np.testing.assert_allclose(with_bias, z - np.log(np.exp(z).sum(-1, keepdims=True)), atol=2e-4)
  assert np.max(np.abs(np.exp(with_bias) - np.exp(got))) > 1e-3  # the bias does not cancel in the probit
  # λ → ∞: the posterior collapses onto the MAP model.
  sharp = {t: vlm.tower_posterior(_random_factors(jax.random.key(0), d, dim), params, config, t,
                                  pseudo_data_count=10.0, prior_precision=1e12)[0]
           for t, d in (("img", d_v), ("txt", d_t))}
  np.testing.assert_allclose(vlm.zero_shot_predictive(sharp["img"], sharp["txt"], image, text, scale),
                             vlm.map_log_probs(image, text, scale), atol=1e-4)


def test_tower_posterior_rejects_bad_input(tiny):
  _, config, params = tiny
  d_v, dim = vlm.projection_dims(params, config, "img")
  good = _random_factors(jax.random.key(0), d_v, dim)
  with pytest.raises(ValueError, match="img factors do not fit the model"):
    vlm.tower_posterior(_random_factors(jax.random.key(0), d_v + 1, dim), params, config, "img",
                        pseudo_data_count=10.0)
  with pytest.raises(ValueError, match="txt factors do not fit"):  # image factors used for the text tower
    vlm.tower_posterior(_random_factors(jax.random.key(0), d_v, dim + 2), params, config, "txt",
                        pseudo_data_count=10.0)
  for lam in (0.0, -1.0):
    with pytest.raises(ValueError, match="λ > 0"):
      vlm.tower_posterior(good, params, config, "img", pseudo_data_count=10.0, prior_precision=lam)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
      factors_lib.parse_prior_precision(str(lam))
  with pytest.raises(ValueError, match="pseudo_data_count"):
    vlm.tower_posterior(good, params, config, "img", pseudo_data_count=0.0)
  _, lam = vlm.tower_posterior(good, params, config, "img", pseudo_data_count=10.0, prior_precision="fit")
  assert lam > 0


def test_targeted_order_is_brute_force_nearest_neighbours():
  rng = np.random.default_rng(0)
  pool_mean, pool_var = rng.normal(size=(30, 6)), rng.uniform(0.01, 0.1, (30, 6))
  t_mean, t_var = rng.normal(size=(5, 6)), rng.uniform(0.01, 0.1, (5, 6))
  scores = rng.normal(size=5)
  got = active.targeted_order(scores, (t_mean, t_var), (pool_mean, pool_var), 6, k=2, metric="wasserstein",
                              exclude=np.array([3]))
  # Oracle: targets by decreasing score, each one's two nearest (W₂²) pool points, skipping taken ones.
  expected, taken = [], {3}
  for t in np.argsort(-scores):
    dist = ((t_mean[t] - pool_mean) ** 2).sum(-1) + ((np.sqrt(t_var[t]) - np.sqrt(pool_var)) ** 2).sum(-1)
    for i in np.argsort(dist)[:2]:
      if i not in taken and len(expected) < 6:
        taken.add(i)
        expected.append(i)
  np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="larger than the pool|expected an integer in"):
    active.targeted_order(scores, (t_mean, t_var), (pool_mean, pool_var), 3, k=31)
  with pytest.raises(ValueError, match="pool is empty"):
    active.targeted_order(scores, (t_mean, t_var), (pool_mean[:0], pool_var[:0]), 3, k=1)


def test_first_finetune_step_is_the_closed_form_adamw_step(tiny):
  _, config, params = tiny
  head = active.head_from_params(params, config)
  rng = np.random.default_rng(1)
  d_v, dim = head.weight.shape
  phi = rng.normal(size=(1, d_v)).astype(np.float32)
  text = {"embeddings": rng.normal(size=(3, dim)).astype(np.float32), "pre_projection": None}
  problem = active.Problem(text, None, 2.0, None)
  offset = np.zeros((1, dim), np.float32)
  lr, wd = 1e-3, 5e-2
  tuned, _ = active.finetune_head(head, phi, offset, np.array([2]), problem, jax.random.key(0), learning_rate=lr,
                                  weight_decay=wd, epochs=1, batch_size=4)
  w = np.asarray(head.weight, np.float64)

  def loss(w):  # cross-entropy of one example, written out
    g = phi[0].astype(np.float64) @ w
    t = text["embeddings"] / np.linalg.norm(text["embeddings"], axis=-1, keepdims=True)
    z = math.exp(2.0) * t @ (g / np.linalg.norm(g))
    return np.log(np.exp(z).sum()) - z[2]

  eps = 1e-6
  grad = np.zeros_like(w)
  for i, j in [(0, 0), (3, 5), (d_v - 1, dim - 1)]:  # central differences on a few coordinates
    e = np.zeros_like(w)
    e[i, j] = eps
    grad[i, j] = (loss(w + e) - loss(w - e)) / (2 * eps)
    # AdamW's first step: m̂/(√v̂ + ε) = sign(g) (ε = 1e-8), decoupled decay lr·wd·w.
    expected = w[i, j] - lr * (np.sign(grad[i, j]) + wd * w[i, j])
    assert float(tuned.weight[i, j]) == pytest.approx(expected, abs=1e-6)
  with pytest.raises(ValueError, match="empty selection"):
    active.finetune_head(head, phi[:0], offset[:0], np.array([], int), problem, jax.random.key(0))


# ------------------------------------------------------------------------------------------------------------
# The binaries, end to end (--runlocal).
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def factors_dir(tiny, data_dir, tmp_path_factory):
  """estimate_hessian --runlocal on the generated 192-pair sandbox smoke corpus."""
  out = tmp_path_factory.mktemp("hessian")
  parse_flags(f"--checkpoint={tiny[0]}", "--runlocal", f"--output_dir={out}")
  info = factors_lib.run_estimate(bayesvlm_flags.hessian_config(), out)
  return out, info


def test_estimate_hessian_runlocal(tiny, factors_dir):
  out, info = factors_dir
  _, config, params = tiny
  factors, stored = laplace.load_factors(out / "factors")
  assert stored["lambda_img"] == pytest.approx(info["lambda_img"]) and info["num_pairs"] == 192
  assert stored["model_fingerprint"] == features_lib.params_fingerprint(params)
  assert factors["img"].a.shape == (32, 32) and factors["txt"].a.shape == (24, 24)
  assert factors["img"].b.shape == (16, 16) and float(factors["img"].num_data) == 192
  # λ is the evidence maximiser at n = 10 (checked against a grid), and the run dir holds config + metrics.
  post = laplace.posterior_from_factors(factors["img"].a, factors["img"].b, pseudo_data_count=10.0)
  sq = laplace.projection_sq_norm(params["visual"]["proj"]["kernel"])
  grid = np.log(info["lambda_img"]) + np.linspace(-0.5, 0.5, 11)
  evidence = [float(laplace.log_evidence(post, sq, t)) for t in grid]
  assert int(np.argmax(evidence)) == 5
  assert (out / "config.json").exists() and (out / "metrics.jsonl").exists() and (out / "prior_precision.json").exists()


def test_estimate_hessian_la_batch_size_flag_is_the_official_b(tiny, factors_dir, tmp_path):
  """--la_batch_size reaches estimate_pair_factors: on the same 192 pairs (3 class batches of 64), A and N are
  the default run's and B drops 64 mod 5 = 4 pairs per class batch (the oracle is
  test_pair_factors_match_brute_force_ggn_and_resume)."""
  out, _ = factors_dir
  parse_flags(f"--checkpoint={tiny[0]}", "--runlocal", f"--output_dir={tmp_path}", "--la_batch_size=5")
  cfg = bayesvlm_flags.hessian_config()
  assert cfg["la_batch_size"] == 5
  _, config, params = tiny
  official, info = factors_lib.estimate(cfg, config, params, clip.get_tokenizer(config), tmp_path)
  default, _ = laplace.load_factors(out / "factors")
  assert info["la_batch_size"] == 5 and info["num_class_batches"] == 3
  for tower in ("img", "txt"):
    np.testing.assert_allclose(official[tower].a, default[tower].a, rtol=1e-5, atol=1e-6)
    assert float(official[tower].num_data) == float(default[tower].num_data) == 192
    assert np.max(np.abs(np.asarray(official[tower].b) - np.asarray(default[tower].b))) > 1e-3


def test_bayesvlm_runlocal_and_bad_input(tiny, factors_dir, tmp_path):
  out, _ = factors_dir
  parse_flags(f"--checkpoint={tiny[0]}", "--runlocal", f"--factors_dir={out}", f"--run_dir={tmp_path / 'bv'}",
              "--dataset=sandbox_shapes,sandbox_shapes_sketch", "--prior_precision=stored")
  cfg = bayesvlm_flags.zeroshot_config()
  with tfds.testing.mock_data(num_examples=24):
    results = bv_zeroshot.run_zero_shot(cfg, tmp_path / "bv")
  assert set(results) == {"sandbox_shapes", "sandbox_shapes_sketch"}
  for per in results.values():
    assert set(per) == {"map", "bayesvlm"}
    assert set(per["map"]) == {"accuracy", "nlpd", "ece", "brier"}
  assert (tmp_path / "bv" / "reliability_sandbox_shapes.png").stat().st_size > 1000
  assert (tmp_path / "bv" / "results.md").exists() and (tmp_path / "bv" / "config.json").exists()
  with pytest.raises(ValueError, match="must be a finite number > 0"):
    bv_zeroshot.run_zero_shot({**cfg, "prior_precision": "-1"}, tmp_path / "bad")
  # Factors of another model (wider image features): a clear error naming the mismatch.
  wrong = {"img": _random_factors(jax.random.key(0), 40, 16), "txt": _random_factors(jax.random.key(1), 24, 16)}
  laplace.save_factors(tmp_path / "wrong", wrong, {})
  with pytest.raises(ValueError, match=r"img factors do not fit the model \(32 -> 16"):
    bv_zeroshot.run_zero_shot({**cfg, "factors_dir": str(tmp_path / "wrong"), "prior_precision": "fit"}, tmp_path / "bad2")
  # Factors of the right shapes but another model's weights (e.g. a re-trained checkpoint): refused by name.
  factors, stored = laplace.load_factors(out / "factors")
  laplace.save_factors(tmp_path / "stale", factors, {**stored, "model_fingerprint": "0" * 64})
  with pytest.raises(ValueError, match="holds factors of another model .*000000000000"):
    bv_zeroshot.run_zero_shot({**cfg, "factors_dir": str(tmp_path / "stale"), "prior_precision": "fit"}, tmp_path / "bad3")


def test_active_learning_runlocal_and_bad_input(tiny, factors_dir, tmp_path):
  out, _ = factors_dir
  parse_flags(f"--checkpoint={tiny[0]}", "--runlocal", f"--factors_dir={out}", f"--run_dir={tmp_path / 'al'}",
              "--selection=targeted", "--knn_metric=wasserstein", "--rounds=2")
  cfg = bayesvlm_flags.active_config()
  with tfds.testing.mock_data(num_examples=48):
    result = bv_active_learning.run_active_learning(cfg, tmp_path / "al")
    assert set(result["curves"]) == {"random", "entropy", "bald", "epig"}
    for acq, per in result["curves"].items():
      assert sorted(per) == [4, 8]
      indices = result["selections"][f"{acq}/seed0"]
      assert len(indices) == 8 and len(set(indices)) == 8 and max(indices) < 48
    assert (tmp_path / "al" / "curves.png").stat().st_size > 1000 and (tmp_path / "al" / "results.md").exists()
    with pytest.raises(ValueError, match="larger than the pool"):
      bv_active_learning.run_active_learning({**cfg, "runlocal": False, "pool_size": 6, "budgets": [4], "knn_k": 7,
                           "max_examples": 8}, tmp_path / "bad")
    with pytest.raises(ValueError, match="pool has only 6 images"):
      bv_active_learning.run_active_learning({**cfg, "runlocal": False, "pool_size": 6, "budgets": [8], "max_examples": 8},
                          tmp_path / "bad2")
  with pytest.raises(ValueError, match="the pool must not be empty"):
    bv_active_learning.run_active_learning({**cfg, "runlocal": False, "pool_size": 0}, tmp_path / "bad3")


def test_online_selection_ignores_picks_outside_the_label_set(tiny):
  """Pool labels < 0 (images of none of the target's classes, bayesprompt.data.pool) spend budget but give no
  gradient step and no Hessian term: with every pool label < 0, two online rounds of (deterministic) entropy
  selection equal one offline round."""
  _, config, params = tiny
  head = active.head_from_params(params, config)
  d_v, dim = head.weight.shape
  rng = np.random.default_rng(3)
  phi = rng.normal(size=(40, d_v)).astype(np.float32)
  pool = {"pre_projection": phi, "embeddings": np.asarray(active.head_embeddings(head, phi, 0.0)),
          "labels": np.full(40, -1)}
  targets = {"pre_projection": phi[:5], "embeddings": pool["embeddings"][:5]}
  text = {"embeddings": rng.normal(size=(3, dim)).astype(np.float32), "pre_projection": None}
  problem = active.Problem(text, None, 2.0, None)
  common = dict(head=head, factors=_random_factors(jax.random.key(0), d_v, dim), problem=problem, pool=pool,
                pool_offset=jnp.zeros((40, dim)), targets=targets, budget=12, pseudo_data_count=10.0,
                prior_precision="fit", online_lr=1e-1)
  offline = active.select("entropy", jax.random.key(1), rounds=1, **common)
  online = active.select("entropy", jax.random.key(1), rounds=3, **common)
  np.testing.assert_array_equal(online.indices, offline.indices)
  np.testing.assert_array_equal(online.rounds, np.repeat([0, 1, 2], 4))
  # With real labels the online rounds move the head and re-score the pool (the filter is not a no-op).
  labelled = active.select("entropy", jax.random.key(1), rounds=3,
                           **{**common, "pool": {**pool, "labels": rng.integers(0, 3, 40)}})
  assert not np.array_equal(labelled.indices, offline.indices)
  # The official update's switch reaches the online update of A (tests/test_laplace.py checks its algebra).
  products = []
  real = laplace.rank_one_update

  def recording(*args, **kwargs):
    products.append(kwargs["product"])
    return real(*args, **kwargs)

  with mock.patch.object(laplace, "rank_one_update", recording):
    active.select("entropy", jax.random.key(1), rounds=3, hessian_update_product="inner",
                  **{**common, "pool": {**pool, "labels": rng.integers(0, 3, 40)}})
  assert products == ["inner", "inner"]
  parse_flags("--hessian_update_product=inner")
  assert bayesvlm_flags.active_config()["hessian_update_product"] == "inner"


def test_active_learning_runlocal_offtarget_pool(tiny, factors_dir, tmp_path):
  """The off-target flagfile through --runlocal: the pool's make-up and each selection's bookkeeping (on-target
  share, usable labels, classes covered) against a recount from the returned pool; picks outside the label
  set never reach the fine-tuning (a selection of only such picks leaves the zero-shot model)."""
  from bayesprompt.data import pool as pool_lib

  out, _ = factors_dir
  flagfile = os.path.join(REPO, "experiments/flags/active_learning_offtarget_sandbox.flags")
  parse_flags(f"--flagfile={flagfile}", f"--checkpoint={tiny[0]}", "--runlocal", f"--factors_dir={out}",
              f"--run_dir={tmp_path / 'al'}", f"--feature_cache_dir={tmp_path / 'features'}")
  cfg = bayesvlm_flags.active_config()
  assert cfg["selection"] == "targeted" and cfg["target_classes"] == "base"
  with tfds.testing.mock_data(num_examples=48):
    result = bv_active_learning.run_active_learning(cfg, tmp_path / "al")
    composed = result["pool"]
    expected = pool_lib.scale_counts(pool_lib.parse_pool_sources(cfg["pool_sources"]), 64)
    assert [len(s) for s in composed.splits] == [s.count for s in expected]
    target = sources.open_split("sandbox_shapes_v2", "test").classnames[:32]  # the base half
    for i, part in enumerate(composed.splits):
      own = [part.classnames[c] for c in part.labels]
      mine = composed.labels[composed.source_ids == i]
      np.testing.assert_array_equal(mine, [target.index(n) if n in target else -1 for n in own])
    for acq, per in result["curves"].items():
      indices = np.asarray(result["selections"][f"{acq}/seed0"])
      for budget, (row,) in per.items():
        idx = indices[:budget]
        labels = composed.labels[idx]
        assert row["on_target"] == pytest.approx(np.mean(composed.on_target[idx]))
        assert row["labelled"] == pytest.approx(np.mean(labels >= 0))
        assert row["classes_covered"] == len(np.unique(labels[labels >= 0]))
        assert np.isfinite(row["accuracy"]) and np.isfinite(row["nlpd"])
    md = (tmp_path / "al" / "curves.md").read_text()
    assert "## on_target" in md and "| total |" in md and (tmp_path / "al" / "pool.json").exists()
    # A pool of other tasks' images (no colour x shape class) and 4 target images: rows whose picks are all
    # outside the label set score exactly the zero-shot model.
    cfg2 = {**cfg, "pool_sources": ["sandbox_textures:train:40", "sandbox_shapes:train:4:on_target"],
            "target_classes": "all", "selection": "direct"}
    result = bv_active_learning.run_active_learning(cfg2, tmp_path / "al2")
  assert np.all(result["pool"].labels[:40] == -1) and np.all(result["pool"].labels[40:] >= 0)
  empty = [row for per in result["curves"].values() for rows in per.values() for row in rows
           if row["labelled"] == 0]
  assert empty, "no selection of only off-label-set picks: the check below would be vacuous"
  for row in empty:
    assert row["accuracy"] == result["zero_shot"]["map"]["accuracy"]
    assert row["nlpd"] == pytest.approx(result["zero_shot"]["map"]["nlpd"], rel=1e-6)
    assert row["classes_covered"] == 0
  with pytest.raises(ValueError, match="no pool image is of a target class"):
    with tfds.testing.mock_data(num_examples=48):
      bv_active_learning.run_active_learning({**cfg2, "pool_sources": ["sandbox_textures:train:40"]}, tmp_path / "bad")


def test_estimate_hessian_binary_entry_point(tiny, data_dir, tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.estimate_hessian", f"--checkpoint={tiny[0]}", "--runlocal",
     f"--output_dir={tmp_path / 'eh'}", "--pseudo_data_count=-1"],
    cwd=tmp_path, capture_output=True, text=True, timeout=120,  # --runlocal writes under the cwd's runs/
    env={**os.environ, "JAX_PLATFORMS": "cpu", "BAYESPROMPT_DATA_DIR": data_dir, "PYTHONPATH": str(REPO)})
  assert proc.returncode != 0 and "--pseudo_data_count=-1.0; expected n > 0" in proc.stderr
