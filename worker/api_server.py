"""The worker's own endpoints: /v1/models, health and readiness, metrics, the OpenAPI document,
and vLLM's /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelfleet.openai_types import ModelList
from modelfleet.openapi import openapi_document
from modelfleet.protocol import DetokenizeRequest, TokenizeRequest

from .api_common import parse
from .metrics import WorkerMetrics
from .service import ModelService


def server_router(service: ModelService, metrics: WorkerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return ModelList(data=service.model_cards()).dump()

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id)
        return next(c for c in service.model_cards() if c.id == model_id).dump()

    @router.get("/health")
    async def health() -> JSONResponse:
        failure = service.failure()
        if failure is not None:
            return JSONResponse({"status": "unhealthy", "reason": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/ready")
    async def ready() -> JSONResponse:
        failure = service.failure()
        if failure is not None:
            return JSONResponse({"status": "unhealthy", "reason": failure}, status_code=503)
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "models": service.names})

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    document = openapi_document(f"modelfleet worker: {service.name}")

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(document)

    @router.post("/tokenize")
    async def tokenize(request: Request):
        return service.tokenize(await parse(service, request, TokenizeRequest))

    @router.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse(service, request, DetokenizeRequest)
        return service.detokenize(req.tokens)

    return router
