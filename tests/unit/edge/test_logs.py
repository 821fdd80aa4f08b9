"""Process logs as JSON lines (issue 17, item 4): stable keys, one line per record whatever
the message holds, the event's fields, tracebacks; the text format stays the default; the
real `domain-coordinator` and `hsa-node` processes log JSON with `--log-format json`."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain_edge.logs import (
    LOG_FORMAT_ENV,
    JsonFormatter,
    add_log_format_option,
    configure_logging,
)

pytestmark = pytest.mark.unit


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("hsa_node.sync", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_record_is_one_json_object_with_stable_keys() -> None:
    line = JsonFormatter("hsa-1").format(_record("state %d from %s", 7, "coordinator"))
    document = json.loads(line)
    assert set(document) == {"time", "level", "process", "logger", "event"}
    assert document["level"] == "warning"
    assert document["process"] == "hsa-1"
    assert document["logger"] == "hsa_node.sync"
    assert document["event"] == "state 7 from coordinator"
    assert document["time"].endswith("+00:00")


def test_no_message_can_split_or_forge_a_line() -> None:
    forged = 'x\n{"level":"info","event":"forged"}\r\x1b[2J'
    line = JsonFormatter("coordinator").format(_record("peer said %s", forged))
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert json.loads(line)["event"] == f"peer said {forged}"


def test_event_fields_are_added_but_never_override_the_stable_keys() -> None:
    fields = {"version": 7, "host": "hsa-2", "level": "debug", "event": "other"}
    document = json.loads(JsonFormatter("hsa-1").format(_record("installed", fields=fields)))
    assert document["version"] == 7
    assert document["host"] == "hsa-2"
    assert document["level"] == "warning"
    assert document["event"] == "installed"


def test_a_traceback_stays_inside_its_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = JsonFormatter("hsa-1").format(record)
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exception"]


@pytest.fixture
def root_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    monkeypatch.delenv(LOG_FORMAT_ENV, raising=False)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_configure_logging_in_both_formats(
    root_logging: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # configure_logging sets the variable for the processes it starts: restored after the
    # test, or every process later tests of this worker start would log JSON. (setenv first:
    # delenv of an unset variable records nothing, and the variable set below would stay.)
    monkeypatch.setenv(LOG_FORMAT_ENV, "text")
    monkeypatch.delenv(LOG_FORMAT_ENV)
    configure_logging(
        "hsa-1",
        verbose=False,
        log_format="text",
        text_format="%(levelname)s %(message)s",
        stream=root_logging,
    )
    logging.getLogger("x").info("plain")
    logging.getLogger("x").debug("hidden")
    assert root_logging.getvalue() == "INFO plain\n"
    configure_logging("hsa-1", verbose=True, log_format="json", text_format="", stream=root_logging)
    logging.getLogger("x").debug("as json")
    last = json.loads(root_logging.getvalue().splitlines()[-1])
    assert (last["level"], last["event"]) == ("debug", "as json")
    assert os.environ[LOG_FORMAT_ENV] == "json"  # the processes it starts inherit it
    configure_logging(
        "hsa-1", verbose=False, log_format="text", text_format="", stream=root_logging
    )
    with pytest.raises(ValueError, match="not one of text, json"):
        configure_logging("hsa-1", verbose=False, log_format="xml", text_format="")


def test_the_option_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for env, expected in ((None, "text"), ("json", "json"), ("yaml", "text")):
        if env is None:
            monkeypatch.delenv(LOG_FORMAT_ENV, raising=False)
        else:
            monkeypatch.setenv(LOG_FORMAT_ENV, env)
        parser = argparse.ArgumentParser()
        add_log_format_option(parser)
        assert parser.parse_args([]).log_format == expected


def test_the_coordinator_process_logs_json_lines(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "domain_coordinator", "--config", str(missing),
            "--log-format", "json", "-v",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    # The refusal is printed for a person; the log lines are JSON.
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert logged
    assert logged[-1]["process"] == "coordinator"
    assert logged[-1]["level"] == "error"
    assert "exception" in logged[-1]
    assert "refusing to start: " in result.stderr
