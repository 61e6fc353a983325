"""The library's logger, in the style of ``transformers.utils.logging``.

Every module logs through ``get_logger(__name__)``: children of the ``ocd_hf`` logger, which has its own
stderr handler and does not propagate to the root logger (so an application that configures logging gets
no duplicates). Information goes here; ``warnings.warn`` is kept for deprecations and user errors.

The verbosity defaults to ``WARNING``; set it with ``set_verbosity_info()`` (etc.) or the environment
variable ``OCD_HF_VERBOSITY`` (``debug``, ``info``, ``warning``, ``error`` or ``critical``), read when the
logger is first configured. ``enable_propagation()`` sends records on to the root logger as well (what
``pytest``'s ``caplog`` listens to).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from logging import CRITICAL, DEBUG, ERROR, INFO, WARNING

__all__ = [
    "CRITICAL", "DEBUG", "ERROR", "INFO", "WARNING", "LIBRARY_NAME", "VERBOSITY_ENV",
    "disable_default_handler", "disable_propagation", "enable_default_handler", "enable_propagation",
    "get_logger", "get_verbosity", "set_verbosity", "set_verbosity_debug", "set_verbosity_error",
    "set_verbosity_info", "set_verbosity_warning",
]

LIBRARY_NAME = "ocd_hf"
VERBOSITY_ENV = "OCD_HF_VERBOSITY"
LOG_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}
DEFAULT_LEVEL = WARNING

_lock = threading.Lock()
_default_handler: logging.Handler | None = None


class _StderrHandler(logging.StreamHandler):
    """A ``StreamHandler`` that writes to whatever ``sys.stderr`` is when a record is emitted."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _env_level() -> int:
    """The level named by ``OCD_HF_VERBOSITY``, else :data:`DEFAULT_LEVEL` (an unknown name is reported)."""
    value = os.getenv(VERBOSITY_ENV)
    if not value:
        return DEFAULT_LEVEL
    if value.lower() in LOG_LEVELS:
        return LOG_LEVELS[value.lower()]
    logging.getLogger(LIBRARY_NAME).warning(
        "Unknown %s=%s; expected one of %s. Using %s.", VERBOSITY_ENV, value, ", ".join(LOG_LEVELS), logging.getLevelName(DEFAULT_LEVEL)
    )
    return DEFAULT_LEVEL


def _configure_library_root_logger() -> None:
    global _default_handler
    with _lock:
        if _default_handler is not None:
            return
        _default_handler = _StderrHandler()
        root = logging.getLogger(LIBRARY_NAME)
        root.addHandler(_default_handler)
        root.setLevel(_env_level())
        root.propagate = False


def _library_root_logger() -> logging.Logger:
    _configure_library_root_logger()
    return logging.getLogger(LIBRARY_NAME)


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger ``name`` (a module's ``__name__``: a child of ``ocd_hf``), or the library's root logger."""
    _configure_library_root_logger()
    return logging.getLogger(name or LIBRARY_NAME)


def get_verbosity() -> int:
    """The library's logging level (``ocd_hf.logging.WARNING`` = 30 by default)."""
    return _library_root_logger().getEffectiveLevel()


def set_verbosity(level: int | str) -> None:
    """Set the library's logging level: an ``int`` (``ocd_hf.logging.INFO``) or a name (``"info"``)."""
    if isinstance(level, str):
        if level.lower() not in LOG_LEVELS:
            raise ValueError(f"Unknown verbosity {level!r}; expected one of {list(LOG_LEVELS)}.")
        level = LOG_LEVELS[level.lower()]
    _library_root_logger().setLevel(level)


def set_verbosity_debug() -> None:
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    set_verbosity(ERROR)


def disable_default_handler() -> None:
    """Stop writing the library's records to stderr (add your own handler to ``get_logger()``)."""
    _configure_library_root_logger()
    _library_root_logger().removeHandler(_default_handler)


def enable_default_handler() -> None:
    """Write the library's records to stderr again (the default)."""
    _configure_library_root_logger()
    _library_root_logger().addHandler(_default_handler)


def enable_propagation() -> None:
    """Pass the library's records on to the root logger too (off by default, to avoid duplicates)."""
    _library_root_logger().propagate = True


def disable_propagation() -> None:
    """Keep the library's records to its own handler (the default)."""
    _library_root_logger().propagate = False
