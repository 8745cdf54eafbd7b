"""memguard's own records (``memguard.*`` loggers) inside gunicorn go to gunicorn's error log.

A library installs no handler, so without one these records reach Python's last-resort
handler: bare lines on stderr, with no time, level or pid, beside gunicorn's formatted
log. Inside gunicorn we know where they belong: :class:`GunicornLogForwarder` hands each
one to gunicorn's error logger (its format, its file, its level), as one line naming
the memguard area. An app that configured logging itself (a handler on the root
logger) gets the records there instead, as it asked, and not twice.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["GunicornLogForwarder", "forward_to"]

_LOGGER = "memguard"


class GunicornLogForwarder(logging.Handler):
    """Forwards records to gunicorn's ``error_log`` (a :class:`logging.Logger`)."""

    def __init__(self, error_log: logging.Logger) -> None:
        super().__init__()
        self.error_log = error_log

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the app's own logging configuration gets them (propagation)
        target = self.error_log
        if record.levelno < target.getEffectiveLevel():
            return
        try:
            message = record.getMessage()
        except Exception:
            self.handleError(record)
            return
        # One event, one line: a newline (from a value that was not escaped) cannot start
        # a forged line of gunicorn's log.
        text = f"{record.name}: {message}".replace("\r", "\\r").replace("\n", "\\n")
        forwarded = logging.makeLogRecord(record.__dict__)
        forwarded.msg, forwarded.args = text, None
        target.handle(forwarded)


def forward_to(glog: Any) -> None:
    """Send ``memguard.*`` records to gunicorn's logger ``glog`` (``server.log`` or
    ``worker.log``), replacing a forwarder installed before (the master's, in a worker)."""
    error_log = getattr(glog, "error_log", None)
    if not isinstance(error_log, logging.Logger):
        return  # a custom logger class without gunicorn's error_log: leave logging alone
    logger = logging.getLogger(_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, GunicornLogForwarder):
            logger.removeHandler(handler)
    logger.addHandler(GunicornLogForwarder(error_log))
