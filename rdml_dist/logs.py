"""The driver's progress and events as log records in one format, so a cluster's log shipping can parse them.

Modules log through :data:`logger` (``rdml-dist``); the command line calls :func:`configure_logging`.
A library user's own logging configuration decides where the records go. Results (the epoch table)
stay plain output.
"""

import logging
import sys
from typing import TextIO

LOGGER_NAME = "rdml-dist"
LOG_FORMAT = "%(asctime)s rdml-dist %(levelname)s %(message)s"
logger = logging.getLogger(LOGGER_NAME)


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """One handler writing ``LOG_FORMAT`` lines to ``stream`` (stderr by default); replaces an earlier one of ours.

    The records still propagate: a user's own handlers (and pytest's ``caplog``) see them too.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for old in [old for old in logger.handlers if getattr(old, "rdml_dist", False)]:
        logger.removeHandler(old)
    handler.rdml_dist = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
