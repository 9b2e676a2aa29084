"""Handler outcomes that are not failures: raise them from a handler to steer delivery."""

from __future__ import annotations

from .errors import CoordinatorError


class Retry(CoordinatorError):
    """Ask for this message again after ``delay_s`` (counts as a delivery).

    :param delay_s: seconds to wait; None uses the configured backoff
    """

    def __init__(self, delay_s: float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested")
        self.delay_s = delay_s


class Reject(CoordinatorError):
    """Refuse this message for good: it goes to the dead letters at once, with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
