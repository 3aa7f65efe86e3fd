"""The project's one user-error type, at the bottom of the import graph so every layer can raise it.

An input check (a config value, a missing file, a malformed data line, a model that cannot be
quantized as asked) raises `UserError` or a subclass; the entry points (utils/cli.py) turn exactly
these into one line on stderr and exit code 2. Any other exception is a bug and keeps its traceback.

`UserError` is a `ValueError`, and `InputFileError` also a `FileNotFoundError`, so callers that
already catch those keep working.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class InputFileError(UserError, FileNotFoundError):
    """A file or folder named by the user does not exist or cannot be used."""
