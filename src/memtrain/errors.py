"""The error type for problems the user can fix, which the ``memtrain`` command prints as one line."""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix: a bad config, data set, path, flag or input, or a missing asset.

    ``memtrain`` prints it as one line without a traceback, while any other exception - a plain ValueError
    included - is a bug and keeps its traceback. It subclasses ValueError so that code and tests catching
    ValueError around user input keep working.
    """
