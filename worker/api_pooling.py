"""Embeddings, score and rerank: served on the raw ASGI path (modelfleet.http.JsonFastPath),
where 32 clients keep the model and the HTTP loop busy at once and FastAPI's layers (and its
jsonable_encoder, which walks every float of every vector) cost measurable throughput."""

from __future__ import annotations

from typing import Any

from modelfleet.http import JsonHandler
from modelfleet.protocol import (
    RERANK_PATHS,
    SCORE_PATHS,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
    parse_request,
)

from .service import ModelService


def pooling_routes(service: ModelService) -> dict[str, JsonHandler]:
    async def embeddings(body: bytes, rid: str) -> dict[str, Any]:
        req = parse_request(EmbeddingRequest, body)
        service.check_model(req.model, adapters=False)
        return await service.embed(req)

    async def score(body: bytes, rid: str) -> dict[str, Any]:
        req = parse_request(ScoreRequest, body)
        service.check_model(req.model, adapters=False)
        return await service.score(req)

    async def rerank(body: bytes, rid: str) -> dict[str, Any]:
        req = parse_request(RerankRequest, body)
        service.check_model(req.model, adapters=False)
        return await service.rerank(req)

    # vLLM's paths for score and rerank (SCORE_PATHS, RERANK_PATHS), scored in batches as embeddings are.
    return {"/v1/embeddings": embeddings, **dict.fromkeys(SCORE_PATHS, score), **dict.fromkeys(RERANK_PATHS, rerank)}
