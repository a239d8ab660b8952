"""The worker's HTTP surface, assembled from one module per endpoint family:

api_chat (chat, edits), api_responses, api_completions, api_pooling (embeddings, score, rerank on
the raw ASGI fast path), api_server (models, health, metrics, tokenizer) and api_lora (vLLM's
LoRA adapter loading). Each parses its
request, calls ModelService and answers with a typed body (modelfleet.openai_types) or an SSE stream.
"""

from __future__ import annotations

from fastapi import APIRouter

from modelfleet.http import JsonHandler

from .api_chat import chat_router
from .api_completions import completions_router
from .api_lora import lora_router
from .api_pooling import pooling_routes
from .api_responses import responses_router
from .api_server import server_router
from .metrics import WorkerMetrics
from .service import ModelService


def build_router(service: ModelService, metrics: WorkerMetrics) -> APIRouter:
    router = APIRouter()
    for family in (server_router(service, metrics), chat_router(service), responses_router(service),
                   completions_router(service), lora_router(service)):
        router.include_router(family)
    return router


def fast_routes(service: ModelService) -> dict[str, JsonHandler]:
    """Endpoints served on the raw ASGI path (modelfleet.http.JsonFastPath)."""
    return pooling_routes(service)
