"""worker/embedder.py's batcher serves callers that start an event loop per call (a sync
wrapper around asyncio.run, a test), on MiniLM through sentence-transformers."""

import asyncio

import pytest
import torch

from modelfleet.demo import minilm_path
from modelfleet.worker.embedder import DynamicBatcher, SentenceEmbedder

TEXTS = ["a cat sat on the mat", "stock markets fell", "the weather is fine", "rust and python"]


@pytest.fixture(scope="module")
def embedder():
    from modelfleet.worker.loader import detect, load_sentence_transformer

    model = load_sentence_transformer(detect(minilm_path()), "cpu")
    embedder = SentenceEmbedder(model)
    # A long linger, so that a request that follows a batch surely waits for company on the
    # batcher's arrival event: the state that used to stay bound to the first loop.
    embedder.batcher = DynamicBatcher(embedder._run, linger=30.0, quiet=0.05)
    yield embedder, model
    embedder.executor.shutdown()


def test_two_successive_event_loops_both_get_their_embeddings(embedder):
    embedder, model = embedder
    expected = torch.tensor(model.encode(TEXTS))

    async def rounds():
        """A batch of four; one request, which lingers for company; a batch of four again."""
        out = [await asyncio.gather(*(embedder.embed([t]) for t in TEXTS))]
        out.append([await embedder.embed([TEXTS[0]])])
        out.append(await asyncio.gather(*(embedder.embed([t]) for t in TEXTS)))
        return out

    async def in_time():
        return await asyncio.wait_for(rounds(), 60)  # a batcher stuck on the first loop would hang here

    for _ in range(2):
        first, lone, last = asyncio.run(in_time())
        for results in (first, last):
            got = torch.stack([r.vectors[0] for r in results])
            assert torch.allclose(got, expected, atol=1e-4)
            assert all(r.tokens > 0 for r in results)
        assert torch.allclose(lone[0].vectors[0], expected[0], atol=1e-4)
