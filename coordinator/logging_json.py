"""One JSON object per log line, for log shippers (``coordinator --log-format json``).

Ids passed in ``extra`` (agent, node, message, stream...) become fields; the current trace and
span ids are added when a span is active. Only what the log call passed is written: the
library logs ids, never payloads or connection secrets.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from .telemetry import trace_ids

#: Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        for key, value in trace_ids().items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)
