"""An independent NumPy implementation of the open_clip CLIP forward, straight from a torch-named state dict.

Written from open_clip's module definitions (fused in_proj, pre-LN blocks, ln_post on CLS, `x @ proj`), with no
code shared with bayesprompt.clip, so tests can check architectures no fixture covers (other widths, depths,
heads, patch and image sizes) against it.
"""

import numpy as np


def _ln(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _act(x, quick_gelu):
  if quick_gelu:
    return x / (1 + np.exp(-1.702 * x))
  from math import erf, sqrt

  return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))


def _block(x, s, prefix, heads, mask, quick_gelu):
  n, t, w = x.shape
  y = _ln(x, s[f"{prefix}.ln_1.weight"], s[f"{prefix}.ln_1.bias"])
  qkv = y @ s[f"{prefix}.attn.in_proj_weight"].T + s[f"{prefix}.attn.in_proj_bias"]
  q, k, v = np.split(qkv, 3, axis=-1)
  hd = w // heads
  q, k, v = (a.reshape(n, t, heads, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
  att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  if mask is not None:
    att = np.where(mask, att, -np.inf)
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = (att @ v).transpose(0, 2, 1, 3).reshape(n, t, w)
  x = x + o @ s[f"{prefix}.attn.out_proj.weight"].T + s[f"{prefix}.attn.out_proj.bias"]
  y = _ln(x, s[f"{prefix}.ln_2.weight"], s[f"{prefix}.ln_2.bias"])
  h = _act(y @ s[f"{prefix}.mlp.c_fc.weight"].T + s[f"{prefix}.mlp.c_fc.bias"], quick_gelu)
  return x + h @ s[f"{prefix}.mlp.c_proj.weight"].T + s[f"{prefix}.mlp.c_proj.bias"]


def _layers(s, prefix):
  return len({k.split(".")[len(prefix.split("."))] for k in s if k.startswith(prefix + ".")})


def encode_image(s, images_nchw, heads, quick_gelu, prompts=None, deep_prompts=None, appended_prompts=None):
  """Image embedding [N, D] and pre-projection [N, W] of NCHW images.

  Vision prompts (MaPLe's schedule, written from its paper/official code): `prompts` [n, W] are appended to
  every image's tokens after the positional embedding, before ln_pre; `deep_prompts` {layer i: [n, W]}
  overwrite the last n tokens before block i. `appended_prompts` {layer i: [n, W]} are appended after the
  last token before block i (after ln_pre for i = 0): VaMP's / MMRL's shared vision prompts enter at layer J.
  """
  s = {k: np.asarray(v, np.float64) for k, v in s.items()}
  w = s["visual.conv1.weight"]  # [width, 3, p, p]
  width, _, p, _ = w.shape
  n, c, h, _ = images_nchw.shape
  g = h // p
  patches = images_nchw.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
  x = patches @ w.reshape(width, -1).T
  cls = np.broadcast_to(s["visual.class_embedding"], (n, 1, width))
  x = np.concatenate([cls, x], 1) + s["visual.positional_embedding"]
  if prompts is not None:
    x = np.concatenate([x, np.broadcast_to(np.asarray(prompts, np.float64), (n, *np.shape(prompts)))], 1)
  x = _ln(x, s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
  for i in range(_layers(s, "visual.transformer.resblocks")):
    if appended_prompts and i in appended_prompts:
      tokens = np.asarray(appended_prompts[i], np.float64)
      x = np.concatenate([x, np.broadcast_to(tokens, (n, *tokens.shape))], 1)
    if deep_prompts and i in deep_prompts:
      count = np.shape(deep_prompts[i])[0]
      x = np.concatenate([x[:, :-count], np.broadcast_to(np.asarray(deep_prompts[i], np.float64),
                                                          (n, count, width))], 1)
    x = _block(x, s, f"visual.transformer.resblocks.{i}", heads, None, quick_gelu)
  pooled = _ln(x[:, 0], s["visual.ln_post.weight"], s["visual.ln_post.bias"])
  return pooled @ s["visual.proj"], pooled


def encode_text(s, tokens, heads, quick_gelu):
  s = {k: np.asarray(v, np.float64) for k, v in s.items()}
  t = tokens.shape[1]
  x = s["token_embedding.weight"][tokens] + s["positional_embedding"][:t]
  mask = np.tril(np.ones((t, t), bool))
  for i in range(_layers(s, "transformer.resblocks")):
    x = _block(x, s, f"transformer.resblocks.{i}", heads, mask, quick_gelu)
  x = _ln(x, s["ln_final.weight"], s["ln_final.bias"])
  pooled = x[np.arange(len(tokens)), tokens.argmax(-1)]
  return pooled @ s["text_projection"], pooled
