"""Loss plug-ins for prompt learners, independent of the learner: `make_objective(name, **kwargs)`.

An objective is called as `objective(output, labels, rng, teacher_logits, *, default_sample_reduction,
default_kl_weight) -> (loss, metrics)` and has a `needs_teacher` attribute (whether it needs frozen
zero-shot CLIP logits).
"""

from __future__ import annotations

from bayesprompt import options
from bayesprompt.errors import UserError
from bayesprompt.objectives.ce import CrossEntropy

OBJECTIVES = ("ce", "ove_pg")


def make_objective(name: str, **kwargs):
  """"ce": CrossEntropy(**kwargs); "ove_pg": OvePG(**kwargs) (one-vs-each + Pólya-Gamma, arXiv 2504.14123).

  A renamed key of `OvePG.renamed_hparams` (`alpha` -> `prior_precision`) is accepted with a FutureWarning.
  """
  if name == "ce":
    return CrossEntropy(**kwargs)
  if name == "ove_pg":
    from bayesprompt.objectives.ove_pg import OvePG

    return OvePG(**options.resolve_renamed_keys(kwargs, OvePG.renamed_hparams, "ove_pg hyper-parameter"))
  raise UserError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
