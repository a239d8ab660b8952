"""The embeddings batcher: what goes into each forward pass, and what a lone client waits."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from modelfleet.worker.embedder import DynamicBatcher


class Recorder:
    """A stand-in forward pass that records batch sizes and takes `cost` seconds."""

    def __init__(self, cost: float = 0.01) -> None:
        self.sizes: list[int] = []
        self.cost = cost

    async def __call__(self, items):
        self.sizes.append(len(items))
        await asyncio.sleep(self.cost)
        return [torch.tensor([float(len(str(i)))]) for i in items], [1] * len(items)


def test_results_go_back_to_their_own_requests():
    async def scenario():
        batcher = DynamicBatcher(Recorder())
        results = await asyncio.gather(*(batcher.submit(["x" * n]) for n in (1, 2, 3)))
        return [r.vectors[0].item() for r in results]

    assert asyncio.run(scenario()) == [1.0, 2.0, 3.0]


def test_a_lone_client_never_waits_for_company():
    async def scenario():
        recorder = Recorder(cost=0.0)
        batcher = DynamicBatcher(recorder, linger=0.5, quiet=0.5)
        waits = []
        for _ in range(5):
            started = time.perf_counter()
            await batcher.submit(["a"])
            waits.append(time.perf_counter() - started)
        return recorder.sizes, max(waits)

    sizes, worst = asyncio.run(scenario())
    assert sizes == [1] * 5
    assert worst < 0.1  # far below linger and quiet: a batch of 1 is followed by no wait


def closed_loop_batch_sizes(clients: int, rounds: int = 6) -> list[int]:
    """Closed loop: each client sends again shortly after its answer, the answers reaching the
    clients a little apart, as an HTTP server writes them one after another."""

    async def scenario():
        recorder = Recorder(cost=0.02)
        batcher = DynamicBatcher(recorder, linger=0.05, quiet=0.01, half_min=8)

        async def client(i: int) -> None:
            for _ in range(rounds):
                await batcher.submit([f"c{i}"])
                await asyncio.sleep(0.0005 * i)

        await asyncio.gather(*(client(i) for i in range(clients)))
        return recorder.sizes

    return asyncio.run(scenario())


def test_a_few_clients_answering_a_batch_are_gathered_into_the_next_one():
    # Without lingering the next batch would start on the first of them: 1, then 7.
    assert closed_loop_batch_sizes(8) == [8] * 6


def test_many_clients_settle_into_two_half_batches_that_take_turns():
    sizes = closed_loop_batch_sizes(32)
    assert sum(sizes) == 32 * 6
    assert sizes[0] == 32
    assert all(size >= 8 for size in sizes), sizes  # never a batch of 1 split off
    assert len(sizes) >= 10, sizes  # halves, so one computes while the other's clients return


def test_an_error_reaches_every_request_of_its_batch_and_the_batcher_goes_on():
    calls = 0

    async def flaky(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("bad batch")
        return [torch.zeros(1) for _ in items], [1] * len(items)

    async def scenario():
        batcher = DynamicBatcher(flaky)
        first = await asyncio.gather(*(batcher.submit(["a"]) for _ in range(3)), return_exceptions=True)
        second = await batcher.submit(["b"])
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) for r in first)
    assert second.tokens == 1


@pytest.mark.parametrize("max_items", [2, 5])
def test_a_batch_never_exceeds_max_items(max_items):
    async def scenario():
        recorder = Recorder(cost=0.0)
        batcher = DynamicBatcher(recorder, max_items=max_items)
        await asyncio.gather(*(batcher.submit(["a"]) for _ in range(11)))
        return recorder.sizes

    sizes = asyncio.run(scenario())
    assert sum(sizes) == 11
    assert max(sizes) <= max_items


def test_one_request_larger_than_a_batch_runs_in_several_forward_passes_in_order():
    """A single request of 150 inputs (the API allows 2,048) never becomes one forward pass past
    max_items, and its vectors come back in its own order."""
    async def scenario():
        recorder = Recorder(cost=0.0)
        batcher = DynamicBatcher(recorder, max_items=64)
        result = await batcher.submit(["x" * (1 + i % 7) for i in range(150)])
        return recorder.sizes, [v.item() for v in result.vectors], result.tokens

    sizes, values, tokens = asyncio.run(scenario())
    assert sizes == [64, 64, 22]
    assert values == [float(1 + i % 7) for i in range(150)] and tokens == 150
