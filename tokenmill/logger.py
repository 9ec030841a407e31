"""Logging set-up: tokenmill's loggers print INFO to stderr unless TOKENMILL_LOGGING_LEVEL says otherwise."""

from __future__ import annotations

import logging
import os


def init_logging() -> None:
    root = logging.getLogger("tokenmill")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("TOKENMILL_LOGGING_LEVEL", "INFO").upper())
    root.propagate = False
