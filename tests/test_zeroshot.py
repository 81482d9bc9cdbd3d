"""Zero-shot evaluation: the library against a per-example brute force, and the absl binary end to end.

The model is the open_clip fixture (/work/shared/fixtures/openclip_vit_tiny, 32 px). Its text vocabulary
has 1000 ids, so CLIP BPE ids do not fit; the tests give it a word-level tokenizer (`--tokenizer`, a
`WordTokenizer` JSON over the words of the dataset's prompts, ids < 1000). That keeps the real checkpoint
loading path and needs no id remapping inside the code under test.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bayesprompt import clip
from bayesprompt.clip.tokenizer import WordTokenizer
from bayesprompt.data import get_dataset, preprocess, protocols, resolve_classnames
from bayesprompt.eval import zeroshot
from bayesprompt.prompts import engine
from bayesprompt.prompts.engine import zeroshot_text_features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "oxford_pets"


@pytest.fixture(scope="module")
def model(fixtures_dir):
  config, params = clip.load_checkpoint(fixtures_dir / "openclip_vit_tiny")
  return config, params


@pytest.fixture(scope="module")
def word_tokenizer_path(tmp_path_factory):
  spec = get_dataset(DATASET)
  prompts = engine.render_prompts(resolve_classnames(spec), spec.template)
  words = sorted({w for p in prompts for w in re.findall(r"[^\s.,]+", p.lower())})
  path = tmp_path_factory.mktemp("tok") / "words.json"
  WordTokenizer(words).to_json(path)
  return str(path)


def test_evaluate_split_matches_per_example_brute_force(model, word_tokenizer_path):
  config, params = model
  tokenizer = clip.get_tokenizer(word_tokenizer_path)
  with tfds.testing.mock_data(num_examples=21):
    split = protocols.zero_shot(DATASET, protocol="base2new").evals["new"]
    text = zeroshot_text_features(params, config, split.classnames, split.template, tokenizer=tokenizer)
    out = zeroshot.evaluate_split(
      params, config, text, split, batch_size=8, progress=False
    )  # 3 batches, padded
    examples = [split[i] for i in range(len(split))]
  assert text.shape == (18, config.embed_dim)  # 37 classes: base 19, new 18
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, atol=1e-5)
  # Oracle: one image at a time, cosine similarity written out in NumPy.
  prompts = [split.template.format(name) for name in split.classnames]
  raw_text = np.asarray(clip.encode_text(params, tokenizer(prompts), config=config), np.float64)
  raw_text /= np.linalg.norm(raw_text, axis=-1, keepdims=True)
  scale = float(np.exp(np.asarray(params["logit_scale"], np.float64)))
  expected = []
  for example in examples:
    image = preprocess.eval_image(example["image"], config.vision.image_size)[None]
    feature = np.asarray(clip.encode_image(params, image, config=config), np.float64)[0]
    expected.append(scale * raw_text @ (feature / np.linalg.norm(feature)))
  expected = np.array(expected)
  labels = np.array([e["label"] for e in examples])
  np.testing.assert_allclose(out["logits"], expected, atol=1e-3)
  np.testing.assert_array_equal(out["labels"], labels)
  assert out["num_examples"] == len(split)
  assert out["metrics"]["accuracy"] == pytest.approx(np.mean(expected.argmax(-1) == labels))
  shifted = expected - expected.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  assert out["metrics"]["nll"] == pytest.approx(-np.mean(log_probs[np.arange(len(labels)), labels]), abs=1e-4)


def test_max_examples_and_class_mismatch(model, word_tokenizer_path):
  config, params = model
  tokenizer = clip.get_tokenizer(word_tokenizer_path)
  with tfds.testing.mock_data(num_examples=30):
    split = protocols.zero_shot(DATASET).evals["all"]
    text = zeroshot_text_features(params, config, split.classnames, split.template, tokenizer=tokenizer)
    out = zeroshot.evaluate_split(params, config, text, split, batch_size=4, max_examples=5, progress=False)
    assert out["num_examples"] == 5 and out["logits"].shape == (5, 37)
    with pytest.raises(ValueError, match="classifier has 36 classes"):
      zeroshot.evaluate_split(params, config, text[:36], split, progress=False)
    with pytest.raises(ValueError, match="max_examples must be positive"):
      zeroshot.evaluate_split(params, config, text, split, max_examples=0, progress=False)


def test_tokenizer_that_does_not_fit_the_checkpoint(model):
  config, params = model
  with pytest.raises(ValueError, match="1000 ids: the tokenizer does not match the checkpoint"):
    zeroshot_text_features(params, config, ["dog", "cat"], "a photo of a {}.",
                           tokenizer=clip.get_tokenizer("clip_bpe"))
  with pytest.raises(ValueError, match="duplicate class name"):
    zeroshot_text_features(params, config, ["dog", "dog"], "a photo of a {}.",
                           tokenizer=clip.get_tokenizer("clip_bpe"))


_DRIVER = textwrap.dedent("""
    import sys
    import tensorflow_datasets as tfds
    from absl import app
    from experiments import zeroshot
    with tfds.testing.mock_data(num_examples=24):
      app.run(zeroshot.main, argv=["zeroshot"] + sys.argv[1:])
""")


def test_binary_end_to_end(fixtures_dir, word_tokenizer_path, tmp_path):
  run_dir = tmp_path / "run"
  argv = [
    f"--checkpoint={fixtures_dir / 'openclip_vit_tiny'}",
    f"--dataset={DATASET}",
    "--protocol=base2new",
    f"--data_dir={tmp_path / 'tfds'}",
    "--batch_size=8",
    f"--run_dir={run_dir}",
    f"--tokenizer={word_tokenizer_path}",
    "--num_threads=2",
  ]
  proc = subprocess.run(
    [sys.executable, "-c", _DRIVER, *argv],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"oxford_pets\s+HM:\s+\d+\.\d\d%", proc.stdout)
  assert "\r" not in proc.stderr  # output redirected: no tqdm bar and its carriage returns (issue 16)
  blob = json.loads((run_dir / "results.json").read_text())
  by_split = {r["split"]: r["metrics"] for r in blob["runs"]}
  assert set(by_split) == {"base", "new"}
  for metrics in by_split.values():
    assert set(metrics) == {"accuracy", "nll", "ece", "brier"} and 0 <= metrics["accuracy"] <= 1
  hm = [r for r in blob["summary"] if r["split"] == "hm"][0]["mean"]
  base, new = by_split["base"]["accuracy"], by_split["new"]["accuracy"]
  assert hm == pytest.approx(2 * base * new / (base + new) if base + new else 0.0)
  assert (run_dir / "results.md").exists() and (run_dir / "results.csv").exists()


def test_template_flag_replaces_the_hand_crafted_prompt(fixtures_dir, word_tokenizer_path, tmp_path,
                                                        monkeypatch):
  import tensorflow_datasets as tfds

  from bayesprompt.eval import zeroshot as zeroshot_lib

  seen = []
  original = zeroshot_lib.zeroshot_text_features

  def recording(params, config, classnames, template, **kwargs):
    seen.append(template)
    return original(params, config, classnames, template, **kwargs)

  monkeypatch.setattr(zeroshot_lib, "zeroshot_text_features", recording)
  kwargs = dict(protocol="base2new", data_dir=str(tmp_path / "tfds"), source=None, batch_size=8,
                max_examples=None,
                tokenizer=str(word_tokenizer_path), num_threads=1, progress=False)
  with tfds.testing.mock_data(num_examples=24):
    default = zeroshot_lib.evaluate_checkpoint(str(fixtures_dir / "openclip_vit_tiny"), [DATASET],
                                               run_dir=str(tmp_path / "a"), **kwargs)
    assert len(seen) == 2 and "{}" in seen[0] and seen[0] != "a type of {}."
    custom = zeroshot_lib.evaluate_checkpoint(str(fixtures_dir / "openclip_vit_tiny"), [DATASET],
                                              run_dir=str(tmp_path / "b"), template="a type of {}.", **kwargs)
  assert seen[2:] == ["a type of {}.", "a type of {}."]
  assert set(custom[DATASET]) == set(default[DATASET]) == {"base", "new", "hm"}
  for bad in ("a photo of a dog.", "a {} of a {}.", "a {0} photo."):
    with pytest.raises(ValueError, match="exactly one '{}'"):
      zeroshot_lib.evaluate_checkpoint("unused", [DATASET], run_dir=str(tmp_path / "c"), template=bad,
                                       **kwargs)


def test_binary_rejects_unknown_dataset(fixtures_dir, tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      _DRIVER,
      f"--checkpoint={fixtures_dir / 'openclip_vit_tiny'}",
      "--dataset=petz",
      f"--run_dir={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode != 0 and "unknown dataset 'petz'; known datasets:" in proc.stderr
