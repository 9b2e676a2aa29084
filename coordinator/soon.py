"""A wake-up deferred to the event loop's next pass, asked for any number of times."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class NextPass:
    """Calls ``callback`` in the next pass of the running loop, once however often it was
    asked for meanwhile (outside a loop: at once).

    The ack ledger and the event publisher wake their writer this way: a read sent later in
    the same pass may carry what they queued (piggyback), and then nothing needs waking.
    """

    __slots__ = ("_callback", "_due")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._due = False

    def __call__(self) -> None:
        if self._due:
            return
        self._due = True
        try:
            asyncio.get_running_loop().call_soon(self._run)
        except RuntimeError:  # no loop running here: no read is coming either
            self._run()

    def _run(self) -> None:
        self._due = False
        self._callback()
