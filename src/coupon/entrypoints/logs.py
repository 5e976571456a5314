"""Structured logs: one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Hashable, Iterable
from contextvars import ContextVar
from datetime import UTC, datetime

from coupon.domain.times import rfc3339

# The raw headers of the request being served, so a log line can carry its request id.
REQUEST_HEADERS: ContextVar[Iterable[tuple[bytes, bytes]]] = ContextVar(
    "request_headers", default=()
)


class LogQuota:
    """One line per kind of event a second at most: an event a client or an outage causes
    at will must not fill the log, nor cost more than its requests. `admit(kind)` is None
    when the line is not to be written, else how many of its kind were not since."""

    EVERY_SECONDS = 1.0

    def __init__(self) -> None:
        self._quiet_until: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def admit(self, kind: Hashable = None) -> int | None:
        now = time.monotonic()
        if now < self._quiet_until.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return None
        if len(self._quiet_until) > 1_000:
            self._quiet_until.clear()
        self._quiet_until[kind] = now + self.EVERY_SECONDS
        return self._suppressed.pop(kind, 0)


def request_id() -> str:
    """The caller's X-Request-Id, or a new id: log lines of one request share it."""
    for name, value in REQUEST_HEADERS.get():
        if name == b"x-request-id" and value:
            return value.decode("latin-1")[:128]
    return uuid.uuid4().hex


# Not extra fields: the record's own attributes, and uvicorn's copy of its message with
# terminal colours.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


# Line breaks to Unicode (and to Python's str.splitlines) that JSON leaves as they are: in a
# value a client chose (an X-Request-Id read as Latin-1 has U+0085 for the byte 0x85) they
# would split a line for any reader that breaks lines the Unicode way.
_UNICODE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": rfc3339(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        if line.isascii():
            return line
        return line.translate(_UNICODE_BREAKS)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the service's own logs and for the server's (uvicorn:
    start-up, shutdown, worker restarts)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("coupon", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
