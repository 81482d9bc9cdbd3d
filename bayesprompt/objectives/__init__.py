"""Loss plug-ins for prompt learners, independent of the learner: `make_objective(name, **kwargs)`.

An objective is called as `objective(output, labels, rng, teacher_logits, *, default_sample_reduction,
default_kl_weight) -> (loss, metrics)` and has a `needs_teacher` attribute (whether it needs frozen
zero-shot CLIP logits).
"""

from __future__ import annotations

from bayesprompt.errors import UserError
from bayesprompt.objectives.ce import CrossEntropy

OBJECTIVES = ("ce", "ove_pg")


def make_objective(name: str, **kwargs):
  """"ce": CrossEntropy(**kwargs); "ove_pg": OvePG(**kwargs) (one-vs-each + Pólya-Gamma, arXiv 2504.14123)."""
  if name == "ce":
    return CrossEntropy(**kwargs)
  if name == "ove_pg":
    from bayesprompt.objectives.ove_pg import OvePG

    return OvePG(**kwargs)
  raise UserError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
