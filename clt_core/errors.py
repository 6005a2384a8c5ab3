"""Errors a user can act on. The CLI prints their message as one line; anything else is a bug."""


class CLTError(Exception):
    """Base for every error whose message tells the user what is wrong and how to fix it."""


class ConfigError(CLTError):
    """A configuration file or value is invalid."""


class StoreError(CLTError):
    """An activation store is missing, unreachable, corrupt or incompatible."""


class ModelError(CLTError):
    """A language model cannot be found, loaded or hooked as asked."""


def first_line(err: BaseException, *, with_type: bool = False, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters) for a one-line error, prefixed by its
    type with `with_type`; its type alone when it has no message."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return f"{type(err).__name__}: {lines[0][:limit]}" if with_type else lines[0][:limit]
