"""Errors a user can act on. The CLI prints their message as one line; anything else is a bug."""


class CLTError(Exception):
    """Base for every error whose message tells the user what is wrong and how to fix it."""


class ConfigError(CLTError):
    """A configuration file or value is invalid."""


class StoreError(CLTError):
    """An activation store is missing, unreachable, corrupt or incompatible."""
