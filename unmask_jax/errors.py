"""Error types for mistakes a user can fix (bad config, missing or damaged inputs, stale caches).

The scripts (`unmask_jax/cli.py`) print these as one line, `error: <what, the value, how to fix
it>`, and exit with status 2; any other exception is a bug and keeps its traceback. Each type
also derives from the builtin a library caller would expect (ValueError for a bad value,
FileNotFoundError for a missing input), so `except ValueError` in library code keeps working.
"""
from __future__ import annotations


class UserError(Exception):
  """An anticipated error the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value is out of range, of the wrong type, an unknown name, or differs from a cache."""


class MissingInputError(UserError, FileNotFoundError):
  """An input a stage needs (a trained model, attack results) does not exist yet."""

  def __str__(self) -> str:
    # FileNotFoundError formats (errno, strerror) pairs specially; we always pass one message.
    return str(self.args[0]) if self.args else ''
