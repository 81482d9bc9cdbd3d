"""The BayesVLM pipeline (arXiv 2412.06014) on top of the pure primitives of `bayesprompt.bayes`.

  features.py        cached pre-projection image features and class-prompt text features
  hessian.py         KFAC-GGN factors of both projections from image–caption pairs (chunked, resumable,
                     sharded)
  vlm.py             tower posteriors (λ fitted by the Laplace evidence), zero-shot predictive, metrics
  active.py          acquisition over a pool (random / entropy / BALD / EPIG, direct or kNN-targeted), online
                     rank-one updates, fine-tuning of the image projection
  factors.py         the estimate_hessian experiment and factor loading / posteriors for the other two
  zeroshot.py        the BayesVLM zero-shot experiment (MAP vs Laplace posterior per dataset)
  active_learning.py the active-learning experiment loop (selection, fine-tuning, curves)

Layer: above `train/` and `eval/` (it reads data, runs the towers and writes run directories); binaries in
`experiments/` only wire flags into the `run` functions here.
"""
