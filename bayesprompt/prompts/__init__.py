"""Prompt learners on one deep-prompt engine: coop, cocoop, maple, mpl, vpt (Bayesian Prompt Learning), vamp,
apex, mmrl, vamp_mmrl.

    learner = make_learner("coop", clip_config, n_ctx=4, ctx_init="a photo of a")
    class_state = learner.prepare_classes(clip_params, classnames, templates="a photo of a {}.")
    params = learner.init(rng, clip_params, class_state)
    output = learner.apply(params, clip_params, class_state, images, rng, train=True, labels=labels)
    probs = learner.predict_probs(output)   # [B, C]
"""

import importlib as _importlib
import pkgutil as _pkgutil

from bayesprompt.prompts import engine
from bayesprompt.prompts.apex import APEX
from bayesprompt.prompts.base import LearnerOutput, PromptLearner, learner_class, make_learner, methods
from bayesprompt.prompts.coop import CoCoOp, CoOp
from bayesprompt.prompts.engine import ClassState, PromptLayout
from bayesprompt.prompts.maple import MPL, MaPLe
from bayesprompt.prompts.mmrl import MMRL
from bayesprompt.prompts.vamp import VaMP
from bayesprompt.prompts.vamp_mmrl import VaMPMMRL
from bayesprompt.prompts.vpt import VPT

# Every module of this package is loaded, so a learner registers itself (`@register`) by existing: adding a
# learner is one new file here. `methods()` (flag help, error messages, tests) reads the registry.
for _module in _pkgutil.iter_modules(__path__):
  _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "APEX", "MMRL", "VaMPMMRL",
    "MPL", "VPT", "ClassState", "CoCoOp", "CoOp", "LearnerOutput", "MaPLe", "PromptLayout", "PromptLearner",
    "VaMP", "engine", "learner_class", "make_learner", "methods",
]
