"""The library's user-error type: bad input from whoever runs it (a path, a name, a flag value, a run
directory), as opposed to a bug in the code.

Binaries (experiments/common.py `run_binary`) print a `UserError` as one line, `error: <message>`, and exit
with status 2; every other exception keeps its traceback, so a programming error is never disguised as bad
input. `UserError` is a ValueError: library callers that catch ValueError for bad input keep working.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input: the message names the value at fault and what was expected."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A path the user gave does not exist (also a FileNotFoundError, for callers that catch that)."""


class UserTypeError(UserError, TypeError):
  """Bad input of the wrong kind, e.g. an unknown keyword (also a TypeError, for callers that catch that)."""
