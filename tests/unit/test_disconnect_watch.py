"""DisconnectWatch: the client leaving cancels the work in the block and nothing else."""

import asyncio

import pytest

from modelfleet.http import DisconnectWatch


class Client:
    """An ASGI receive() whose http.disconnect arrives when `leave()` is called."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.gone.set()


def test_leaving_cancels_the_block_which_then_ends_quietly():
    async def main() -> list[str]:
        client, seen = Client(), []
        async with DisconnectWatch(client.receive):
            asyncio.get_running_loop().call_later(0.01, client.leave)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            seen.append("not reached")
        seen.append("after")
        await asyncio.sleep(0.01)  # no cancellation is left pending for the code that follows
        return seen

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ["cancelled", "after"]


def test_a_cancellation_from_elsewhere_still_propagates():
    async def main() -> None:
        client = Client()
        async with DisconnectWatch(client.receive):
            await asyncio.sleep(10)

    async def outer() -> None:
        task = asyncio.create_task(main())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(outer())


def test_leaving_after_finishing_changes_nothing():
    async def main() -> str:
        client = Client()
        async with DisconnectWatch(client.receive) as watch:
            watch.finishing()
            client.leave()  # servers answer http.disconnect once the response is complete
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        return "done"

    assert asyncio.run(main()) == "done"


def test_a_disconnect_that_lands_as_the_block_ends_does_not_leak_out():
    async def main() -> str:
        client = Client()
        async with DisconnectWatch(client.receive):
            client.leave()
            await asyncio.sleep(0)  # the watch sees the message; its cancel is still pending
        await asyncio.sleep(0.01)
        return "done"

    assert asyncio.run(main()) == "done"
