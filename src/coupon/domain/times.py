"""Times as the service writes them in its messages."""

from __future__ import annotations

from datetime import datetime


def rfc3339(value: datetime) -> str:
    """`value` in RFC 3339, with `Z` for UTC as the API's JSON writes every Timestamp
    (`2026-12-03T09:01:10.924591Z`, to the microsecond); another offset as it is."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
