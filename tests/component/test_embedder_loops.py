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


def test_packed_linears_give_the_librarys_embeddings():
    """The loader puts MiniLM's linear layers on oneDNN-packed weights (`--no-prepack-weights`
    leaves them as loaded); the embeddings are still those of the library's own `encode` on the model as loaded, within 1e-5 cosine."""
    from modelfleet.worker.fastlinear import PackedLinear
    from modelfleet.worker.loader import detect, load_sentence_transformer

    reference = load_sentence_transformer(detect(minilm_path()), "cpu", prepack_weights=False)
    expected = torch.tensor(reference.encode(TEXTS))
    embedder = SentenceEmbedder(load_sentence_transformer(detect(minilm_path()), "cpu"))
    try:
        assert any(isinstance(m, PackedLinear) for m in embedder.model.modules())
        assert not any(isinstance(m, PackedLinear) for m in reference.modules())

        async def embed_all():
            return await asyncio.gather(embedder.embed(TEXTS[:1]), embedder.embed(TEXTS[1:]))

        lone, rest = asyncio.run(embed_all())
        got = torch.stack(lone.vectors + rest.vectors)
        cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
        assert (1 - cosine).abs().max() < 1e-5
    finally:
        embedder.executor.shutdown()


def test_a_lone_request_after_a_lone_request_runs_at_once():
    """A client alone on the worker sends its next request as soon as its answer arrives: the
    batcher must run it at once rather than linger for company that is not coming. With a
    linger and quiet time of an hour, any wait for company would show as a stuck request."""
    batches: list[list[str]] = []

    async def run_batch(items):
        batches.append(list(items))
        return [torch.zeros(2) for _ in items], [1] * len(items)

    batcher = DynamicBatcher(run_batch, linger=3600.0, quiet=3600.0)

    async def one_client():
        for text in TEXTS:
            result = await batcher.submit([text])
            assert result.tokens == 1
        return batcher.queue()

    queue = asyncio.run(asyncio.wait_for(one_client(), 60))
    assert batches == [[t] for t in TEXTS]
    assert queue.last_size == 1 and not queue.pending
