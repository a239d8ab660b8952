"""vLLM's LoRA endpoints: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

As vLLM answers them: success is a 200 with a plain-text sentence, failure an OpenAI error body.
The work is in adapters.py; these only parse and answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from modelfleet.http import read_body
from modelfleet.protocol import Lenient, parse_request

from .adapters import LoraAdapters
from .service import ModelService


class LoadLoraAdapterRequest(Lenient):
    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False  # vLLM's: replace an adapter of that name


class UnloadLoraAdapterRequest(Lenient):
    lora_name: str | None = None


def lora_router(service: ModelService) -> APIRouter:
    router = APIRouter()

    def adapters() -> LoraAdapters:
        if service.lora is None:
            service.unsupported("LoRA adapters")
        return service.lora

    @router.post("/v1/load_lora_adapter")
    async def load(request: Request) -> PlainTextResponse:
        req = parse_request(LoadLoraAdapterRequest, await read_body(request.receive))
        return PlainTextResponse(await adapters().load(req.lora_name, req.lora_path, req.load_inplace))

    @router.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> PlainTextResponse:
        req = parse_request(UnloadLoraAdapterRequest, await read_body(request.receive))
        return PlainTextResponse(await adapters().unload(req.lora_name))

    return router
