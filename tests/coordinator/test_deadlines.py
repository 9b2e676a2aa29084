"""Time limits of exchanges: one periodic check cancels what ran over, and only that."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from coordinator.transport.deadlines import Deadlines

pytestmark = pytest.mark.anyio


async def _exchange(deadlines: Deadlines, key: str, takes_s: float, held_s: float = 0.0
                    ) -> BaseException | None:
    """A watched wait of ``takes_s``; returns what an exchange would raise (None: done)."""
    deadlines.start(key, held_s)
    try:
        await asyncio.sleep(takes_s)
    except BaseException as exc:
        return deadlines.failure(key, exc)
    deadlines.end(key)
    return None


async def test_an_exchange_over_its_limit_fails_with_a_timeout_soon_after() -> None:
    deadlines = Deadlines(0.2)
    started = time.monotonic()
    outcome = await _exchange(deadlines, "slow", 5)
    took = time.monotonic() - started
    assert isinstance(outcome, TimeoutError)
    assert 0.2 <= took < 1.5  # checked every 0.05 s
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    # The task was not left cancelled: it goes on awaiting.
    await asyncio.sleep(0.01)


async def test_exchanges_within_their_limit_or_held_on_purpose_are_left_alone() -> None:
    deadlines = Deadlines(0.2)
    assert await _exchange(deadlines, "quick", 0.05) is None
    # A blocking read may take its block time on top of the limit.
    assert await _exchange(deadlines, "held", 0.4, held_s=0.5) is None
    await asyncio.sleep(0.3)  # nothing watched: the check stops and cancels nothing


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines(0.2)
    outcomes: list[BaseException | None] = []

    async def watched() -> None:
        outcomes.append(await _exchange(deadlines, "cancelled", 5))
        await asyncio.sleep(5)  # the scope's cancellation still applies

    with anyio.move_on_after(0.1) as scope:
        await watched()
    assert scope.cancelled_caught
    assert [type(o) for o in outcomes] == [asyncio.CancelledError]


async def test_concurrent_exchanges_time_out_on_their_own() -> None:
    deadlines = Deadlines(0.2)
    outcomes: dict[str, BaseException | None] = {}

    async def run(key: str, takes_s: float) -> None:
        outcomes[key] = await _exchange(deadlines, key, takes_s)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "slow", 5.0)
        tg.start_soon(run, "quick", 0.1)
    assert outcomes["quick"] is None and isinstance(outcomes["slow"], TimeoutError)
