"""Renamed option names: the old spelling keeps working, with a FutureWarning that names the new one.

Used where user-facing keys are read (learner / objective hyper-parameters, protocol names), so flagfiles
and stored run configs written before a rename still run. Pure Python; imports only `bayesprompt.errors`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from bayesprompt.errors import UserTypeError


def warn_renamed(kind: str, old: str, new: str) -> None:
  """Emits the FutureWarning of one renamed key or value (`kind` says what it names, e.g. "mmrl hparam")."""
  warnings.warn(f"{kind} {old!r} is renamed {new!r}; the old name still works but will be removed",
                FutureWarning, stacklevel=3)


def resolve_renamed_keys(values: Mapping[str, Any], renamed: Mapping[str, str], kind: str) -> dict[str, Any]:
  """`values` with every old key of `renamed` (old -> new) replaced by its new name, warning once per key.

  Raises:
    UserTypeError (a TypeError): both the old and the new name of one option are given.
  """
  out = dict(values)
  for old, new in renamed.items():
    if old not in out:
      continue
    if new in out:
      raise UserTypeError(f"{kind}: both {old!r} (the old name) and {new!r} given; pass only {new!r}")
    warn_renamed(kind, old, new)
    out[new] = out.pop(old)
  return out


def resolve_renamed_value(value: str, renamed: Mapping[str, str], kind: str) -> str:
  """The new spelling of `value` if it is an old one of `renamed` (old -> new), with a warning; else
  `value`."""
  if value in renamed:
    warn_renamed(kind, value, renamed[value])
    return renamed[value]
  return value
