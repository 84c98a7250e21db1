"""Errors a user can act on.

They are raised where the problem is found and turned into a one-line message and exit
code 2 at the entry points (the top-level scripts), never into a traceback.
"""

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: a missing file, an unknown name, a value out of range."""


class DatasetError(UserError):
    """A dataset that is unknown, missing offline, or unreadable."""


class CheckpointError(UserError):
    """A teacher or model checkpoint that is missing or does not fit."""


class ConfigError(UserError):
    """A run option outside its valid range."""
