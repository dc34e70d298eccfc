"""Exceptions raised by pcomp_jax for bad input.

Every error names what was wrong and what is allowed, so that a user can fix the
call without reading the source.
"""


class PcompError(ValueError):
    """Base class of pcomp_jax's input errors (a ``ValueError``)."""


class CheckpointError(PcompError):
    """A checkpoint (directory or GGUF file) is missing, unreadable or unsupported."""


class ConfigError(PcompError):
    """A config field is unknown, of the wrong type, or out of range."""


class InputTooLongError(PcompError):
    """An input does not fit in the window it has to fit in."""
