"""Log set-up shared by ``kms-broker serve`` and ``trainer``: text or JSON lines, one level.

    setup(level="INFO", fmt="text", prefix="")

- ``fmt="text"``: ``TIME [PREFIX ]LEVEL LOGGER: MESSAGE key=value ...`` on stderr.
- ``fmt="json"``: one JSON object per line (python-json-logger), with the keys ``time``
  (ISO 8601, UTC), ``level``, ``logger``, ``message`` and the record's structured fields.

Structured fields: a call passes ``extra={"fields": {...}}`` (see :func:`fields`); JSON puts
them at the top level of the object, text appends them as ``key=value``. Callers put only
names, ids, counts, durations, status codes and rule reasons in fields: never key material,
PINs, evidence bytes or plaintext (the log tests scan a full run for them).

Defaults come from the environment, so a supervisor's worker processes log like their
parent: ``KMS_BROKER_LOG_FORMAT`` / ``KMS_BROKER_LOG_LEVEL`` for the broker,
``TRAINER_LOG_FORMAT`` / ``TRAINER_LOG_LEVEL`` for the trainer (flags win over both).
Configuration is read once, here, at the process's edge; nothing else reads these variables.

This module imports neither gRPC nor torch: the node's key-holding process loads it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["FORMATS", "LEVELS", "fields", "setup"]

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_FIELDS = "fields"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """``log.info("...", extra=fields(method=m, status=s))``: structured fields of a line."""
    return {_FIELDS: values}


def _record_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    found = getattr(record, _FIELDS, None)
    return found if isinstance(found, Mapping) else {}


class _TextFormatter(logging.Formatter):
    def __init__(self, prefix: str) -> None:
        head = f"{prefix} " if prefix else ""
        super().__init__(f"%(asctime)s {head}%(levelname)s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As logging's default (``2026-12-01 23:01:37,984``, local time), with the part up
        to the second formatted once per second rather than once per line."""
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, time.strftime(self.default_time_format,
                                                  self.converter(record.created)))
        return self.default_msec_format % (self._second[1], record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _record_fields(record)
        if extra:
            line += "".join(f" {k}={_text_value(v)}" for k, v in extra.items())
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + "; ".join(str(v) for v in value) + "]"
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def _json_formatter(prefix: str) -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    static = {"process_role": prefix} if prefix else {}

    class _Json(JsonFormatter):
        def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord,
                       message_dict: dict[str, Any]) -> None:
            super().add_fields(log_record, record, message_dict)
            log_record.pop(_FIELDS, None)  # flattened below
            log_record.update(_record_fields(record))

        def formatTime(self, record: logging.LogRecord,
                       datefmt: str | None = None) -> str:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            return f"{stamp}.{int(record.msecs):03d}Z"

    return _Json(
        "{asctime}{levelname}{name}{message}", style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields=static, json_ensure_ascii=True,
    )


def setup(*, level: str = "INFO", fmt: str = "text", prefix: str = "",
          stream: TextIO | None = None) -> None:
    """Configure the root logger once for this process: one handler on ``stream`` (stderr)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_TextFormatter(prefix) if fmt == "text" else _json_formatter(prefix))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # neither format shows thread or process names: not looked up for every record
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
