"""The relay's watchdog (maclustr/relay.py): silence past the limit cancels the request's task;
while a slow client drains (Watchdog.watch), its taking bytes counts as progress. In-process,
no sockets: the watchdog only reads the clock and the callable it is given."""

from __future__ import annotations

import asyncio

from maclustr.relay import Watchdog

LIMIT = 0.2


async def watched(size: list[int], watch: bool) -> bool:
    """A request task waiting on a slow client; True when our watchdog cancelled it."""
    dog = Watchdog(LIMIT, "client draining")
    if watch:
        dog.watch(lambda: size[0])
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return dog.fired
    finally:
        dog.stop()
    return False


async def drain_for(size: list[int], seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await asyncio.sleep(LIMIT / 4)
        size[0] -= 100


async def test_a_client_still_draining_is_not_timed_out_and_one_that_stops_is() -> None:
    size = [100_000]
    task = asyncio.create_task(watched(size, watch=True))
    await drain_for(size, 6 * LIMIT)  # six idle periods, each with progress
    assert not task.done()
    # It stops taking bytes: cancelled within two idle periods (checks run once a period).
    assert await asyncio.wait_for(task, 20 * LIMIT) is True


async def test_without_watch_draining_is_no_progress() -> None:
    """The control: the same slow client, not watched, is timed out after one idle period."""
    size = [100_000]
    task = asyncio.create_task(watched(size, watch=False))
    await drain_for(size, 6 * LIMIT)
    assert task.done() and task.result() is True
