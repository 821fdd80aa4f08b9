"""How a process logs: one line per record on stderr, as text (the default) or as JSON
(`--log-format json`, or `HSM_LOG_FORMAT=json`, which a process's children inherit).

A JSON line is one object with stable keys: `time` (ISO 8601 UTC, milliseconds), `level`
(debug, info, warning, error, critical), `process` (e.g. `hsa-1`, `hsa-1/worker-2`,
`coordinator`), `logger`, `event` (the message), the event's own fields when the call gives
them (`log.info(..., extra={"fields": {...}})`, never overriding those keys), and `exception`
(the traceback) when there is one. JSON escapes every control character, so no message can
forge or split a line. What is logged is the same in both formats: no message of this
project carries a key, plaintext, passphrase or PIN.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, TextIO

__all__ = [
    "LOG_FORMATS",
    "LOG_FORMAT_ENV",
    "JsonFormatter",
    "add_log_format_option",
    "configure_logging",
]

LOG_FORMAT_ENV: Final = "HSM_LOG_FORMAT"
LOG_FORMATS: Final = ("text", "json")
_KEYS: Final = frozenset({"time", "level", "process", "logger", "event", "exception"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": self._process,
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                if isinstance(key, str) and key not in _KEYS:
                    document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"), default=str)


def add_log_format_option(parser: argparse.ArgumentParser) -> None:
    """`--log-format text|json` (default: $HSM_LOG_FORMAT, else text)."""
    default = os.environ.get(LOG_FORMAT_ENV, "text")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default if default in LOG_FORMATS else "text",
        help=f"text (the default) or json: one object per line (default: ${LOG_FORMAT_ENV})",
    )


def configure_logging(
    process: str,
    *,
    verbose: bool,
    log_format: str,
    text_format: str,
    stream: TextIO | None = None,
) -> None:
    """Log to `stream` (default stderr) in `log_format` (`text_format` is the text layout);
    the processes this one starts inherit the format through $HSM_LOG_FORMAT."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ[LOG_FORMAT_ENV] = log_format
