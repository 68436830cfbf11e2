"""container_log_util: logging for inference programs (reference chapter 6).

Every record logged through these functions carries the ``code`` given by the caller
(-1 when none) as ``record.code``; the default format shows ``[code]`` only when one was
given, and formats any other record on that logger (or its children) as well. Without
``log_setting`` a default logger writing to stderr is used (in a deployed container,
stderr goes to the container's log).

Any thread of the container program (Python's logging is thread-safe).
"""
from __future__ import annotations

import logging
import sys

DEFAULT_NAME = "infinibrain.container"
FORMAT = "%(asctime)s %(levelname)s%(code_text)s %(name)s: %(message)s"
NO_CODE = -1

_logger: logging.Logger | None = None


class CodeFormatter(logging.Formatter):
    """FORMAT, with `` [code]`` where a code was given and nothing where none was (so a
    record from any other code, without ``code``, formats too)."""

    def __init__(self, fmt: str = FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        code = getattr(record, "code", NO_CODE)
        record.code_text = f" [{code}]" if code != NO_CODE else ""
        return super().format(record)


def _default_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CodeFormatter())
    return handler


def log_setting(logger_name: str, level: int = logging.DEBUG) -> None:
    """Use the logger ``logger_name`` at ``level`` for the log functions of this module."""
    global _logger
    logger = logging.getLogger(logger_name)
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        logger.addHandler(_default_handler())
    _logger = logger


def _get() -> logging.Logger:
    if _logger is None:
        log_setting(DEFAULT_NAME, logging.DEBUG)
    assert _logger is not None
    return _logger


def debug(msg: str, code: int = -1) -> None:
    """Log ``msg`` at debug level with error code ``code``."""
    _get().debug(msg, extra={"code": code})


def info(msg: str, code: int = -1) -> None:
    """Log ``msg`` at info level with error code ``code``."""
    _get().info(msg, extra={"code": code})


def warning(msg: str, code: int = -1) -> None:
    """Log ``msg`` at warning level with error code ``code``."""
    _get().warning(msg, extra={"code": code})


def error(msg: str, code: int = -1) -> None:
    """Log ``msg`` at error level with error code ``code``."""
    _get().error(msg, extra={"code": code})


def critical(msg: str, code: int = -1) -> None:
    """Log ``msg`` at critical level with error code ``code``."""
    _get().critical(msg, extra={"code": code})


def exception(msg: str, code: int = -1) -> None:
    """Log ``msg`` at error level with the current exception's traceback and ``code``."""
    _get().exception(msg, extra={"code": code})


__all__ = ["log_setting", "debug", "info", "warning", "error", "critical", "exception"]
