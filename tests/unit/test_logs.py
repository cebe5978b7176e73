"""The driver's log records: one format for the command line, and still every user's handlers."""

import io
import logging

import pytest

from rdml_dist.logs import LOGGER_NAME, configure_logging, logger


def test_the_drivers_records_reach_the_users_own_handlers_after_the_command_line_set_its_format(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    handler = configure_logging(stream=stream)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
            logger.info("driver state: running")
        assert [record.getMessage() for record in caplog.records] == ["driver state: running"]  # a root-level handler
        assert stream.getvalue().endswith(" rdml-dist INFO driver state: running\n")  # and the command line's format
    finally:
        logger.removeHandler(handler)
