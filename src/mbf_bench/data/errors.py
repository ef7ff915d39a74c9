"""The one exception type of the data loaders."""

from __future__ import annotations


class DataError(Exception):
    """A data file is missing, unreadable, corrupt or unsafe.

    The message always names the file (or the folders searched) and says what to do about it:
    where to put the file, which argument or command-line flag to pass.
    """
