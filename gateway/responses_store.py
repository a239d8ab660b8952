"""Stored Responses: `store` and `previous_response_id` kept at the gateway, so workers stay stateless.

The gateway owns this state because it knows the caller's key and because every gateway replica
must find a response another replica stored; the workers (ours, and vLLM, whose own store is
per replica and in memory) get each turn as one self-contained request. A continued request's
`input` becomes the stored conversation (the earlier input items, then the stored response's
output items) followed by the new input, as OpenAI does; `instructions` are not carried over.

Two backends behind one interface: with Kubernetes discovery, one Secret per stored response in
the gateway's own namespace (a Secret, not a ConfigMap, because it holds user content; labels
carry the owner and the expiry, so a prune lists metadata only); with static discovery (one
gateway, `modelfleet serve`), a bounded LRU in memory. A record is gzipped JSON and both backends
refuse one past what a Secret holds (1 MiB), so a conversation hits the same limit everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request

from modelfleet import labels
from modelfleet.protocol import OpenAIError, SseEvents, load_json

from .auth import ApiKey, KeyStore

log = logging.getLogger(__name__)

DEFAULT_TTL = 24 * 3600.0  # seconds; see docs/api.md for why not OpenAI's 30 days
DEFAULT_MAX_STORED = 10_000
MAX_RECORD_BYTES = 1024 * 1024 - 16 * 1024  # a Secret's data is at most 1 MiB; room for its keys
PRUNE_INTERVAL = 60.0
TERMINAL = frozenset({"response.completed", "response.incomplete"})  # the events whose response is kept
# Unescaped, these bytes can only be a key of an event's JSON, never generated text in a string.
RESPONSE_KEY = re.compile(rb'"response":\s*\{')

LABEL_RESPONSE, LABEL_OWNER, LABEL_EXPIRES = labels.RESPONSE, labels.RESPONSE_OWNER, labels.RESPONSE_EXPIRES
ANNOTATION_ID = labels.RESPONSE_ID


def owner_of(key: ApiKey | None) -> str:
    """Who may see a stored response: a digest of the key's digest (a label may be read by
    anyone who can list Secrets; the key's own digest stays in the key Secrets), "open" when
    the gateway has no keys. A rotated key is a new owner."""
    if key is None:
        return "open"
    return hashlib.sha256(b"modelfleet-responses:" + key.sha256.encode()).hexdigest()[:40]


def not_found(rid: str, param: str | None = None) -> OpenAIError:
    """The same answer for missing, expired and someone else's: existence is not leaked."""
    return OpenAIError(f"Response with id '{rid}' not found.", status=404, param=param, code="response_not_found")


def unavailable_store(exc: BaseException) -> OpenAIError:
    log.warning("response store call failed: %s", exc)
    return OpenAIError("The response store is unavailable; retry shortly.", status=503, type="server_error",
                       code="store_unavailable", headers={"retry-after": "2"})


@dataclass
class Stored:
    id: str
    owner: str
    expires: float
    response: dict[str, Any]
    input: list[dict[str, Any]]

    def encode(self) -> bytes:
        record = {"id": self.id, "owner": self.owner, "expires": self.expires, "response": self.response,
                  "input": self.input}
        blob = gzip.compress(json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode(), 6)
        check_size(len(blob))
        return blob

    @classmethod
    def decode(cls, blob: bytes) -> Stored:
        return cls(**json.loads(gzip.decompress(blob)))


def check_size(size: int, param: str = "input") -> None:
    if size > MAX_RECORD_BYTES:
        raise OpenAIError(
            f"The conversation is too large to store ({size} bytes compressed; the limit is {MAX_RECORD_BYTES}, "
            "what one Kubernetes Secret holds). Start a new conversation, or send the history yourself "
            "with `store: false`.", param=param, code="conversation_too_large")


class ResponseStore(Protocol):
    """Where stored responses live. `load` and `delete` see only the owner's, unexpired ones."""

    ttl: float

    async def save(self, record: Stored) -> None: ...
    async def load(self, rid: str, owner: str) -> Stored | None: ...
    async def delete(self, rid: str, owner: str) -> bool: ...
    async def prune(self) -> int: ...


class MemoryStore:
    """One gateway's store: at most `max_stored` records, least recently used evicted first."""

    def __init__(self, ttl: float = DEFAULT_TTL, max_stored: int = DEFAULT_MAX_STORED) -> None:
        self.ttl = ttl
        self.max_stored = max_stored
        self.records: OrderedDict[str, tuple[str, float, bytes]] = OrderedDict()

    async def save(self, record: Stored) -> None:
        self.records[record.id] = (record.owner, record.expires, record.encode())
        self.records.move_to_end(record.id)
        while len(self.records) > self.max_stored:
            self.records.popitem(last=False)

    async def load(self, rid: str, owner: str) -> Stored | None:
        found = self.records.get(rid)
        if found is None or found[0] != owner:
            return None
        if found[1] <= time.time():
            del self.records[rid]
            return None
        self.records.move_to_end(rid)
        return Stored.decode(found[2])

    async def delete(self, rid: str, owner: str) -> bool:
        if await self.load(rid, owner) is None:
            return False
        del self.records[rid]
        return True

    async def prune(self) -> int:
        now = time.time()
        expired = [rid for rid, (_, expires, _) in self.records.items() if expires <= now]
        for rid in expired:
            del self.records[rid]
        return len(expired)


class KubernetesStore:
    """One Secret per stored response in `namespace`, so every gateway replica finds it. The
    API calls block (the official client is synchronous), hence the threads."""

    def __init__(self, namespace: str, ttl: float = DEFAULT_TTL, max_stored: int = DEFAULT_MAX_STORED,
                 api_client: Any = None) -> None:
        self.namespace = namespace
        self.ttl = ttl
        self.max_stored = max_stored
        self._api_client = api_client

    @property
    def api_client(self) -> Any:
        if self._api_client is None:
            from modelfleet.kubeconfig import api_client

            self._api_client = api_client()
        return self._api_client

    @staticmethod
    def secret_name(rid: str) -> str:
        """Response ids need not be DNS names (vLLM's have "_"): the Secret is named by a digest."""
        return "response-" + hashlib.sha256(rid.encode()).hexdigest()[:40]

    async def _call(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, self.api_client, self.namespace, *args)
        except Exception as exc:  # noqa: BLE001 - API errors, timeouts, connection resets: one 503
            raise unavailable_store(exc) from None

    async def save(self, record: Stored) -> None:
        from .kube import create_secret

        body = {
            "apiVersion": "v1", "kind": "Secret", "type": "modelfleet.dev/response",
            "metadata": {"name": self.secret_name(record.id), "annotations": {ANNOTATION_ID: record.id},
                         "labels": {LABEL_RESPONSE: "true", LABEL_OWNER: record.owner,
                                    LABEL_EXPIRES: str(int(record.expires))}},
            "data": {"record": base64.b64encode(record.encode()).decode()},
        }
        await self._call(create_secret, body)

    async def load(self, rid: str, owner: str) -> Stored | None:
        from .kube import read_secret

        secret = await self._call(read_secret, self.secret_name(rid))
        if secret is None:
            return None
        labels = secret.get("metadata", {}).get("labels") or {}
        if labels.get(LABEL_OWNER) != owner or int(labels.get(LABEL_EXPIRES, "0")) <= time.time():
            return None
        record = Stored.decode(base64.b64decode(secret["data"]["record"]))
        return record if record.id == rid else None

    async def delete(self, rid: str, owner: str) -> bool:
        from .kube import delete_secret

        if await self.load(rid, owner) is None:
            return False
        return await self._call(delete_secret, self.secret_name(rid))

    async def prune(self) -> int:
        """Deletes the expired, then the soonest to expire past `max_stored`. Every replica
        prunes; a Secret another one deleted first is simply gone."""
        from .kube import delete_secret, list_secret_metadata

        items = await self._call(list_secret_metadata, f"{LABEL_RESPONSE}=true")
        stamps = sorted((int((i["metadata"].get("labels") or {}).get(LABEL_EXPIRES, "0")), i["metadata"]["name"])
                        for i in items)
        now = time.time()
        doomed = [name for expires, name in stamps if expires <= now]
        live = [name for expires, name in stamps if expires > now]
        doomed += live[:max(0, len(live) - self.max_stored)]
        for name in doomed:
            await self._call(delete_secret, name)
        return len(doomed)


@dataclass
class Turn:
    """One stateful request: who asked, whether to keep the answer, and the whole conversation
    the answer follows (the stored part expanded)."""

    owner: str
    store: bool
    previous: str | None
    input: list[dict[str, Any]]


def input_items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if isinstance(value, list) and all(isinstance(i, dict) for i in value):
        return value
    raise OpenAIError("'input' must be a string or a list of input items.", param="input", code="invalid_value")


def mark(response: dict[str, Any], turn: Turn) -> None:
    """The fields OpenAI sets on a response object, which the (stateless) worker cannot know."""
    response["previous_response_id"] = turn.previous
    response["store"] = turn.store


class Conversations:
    """The request side: expands a continued request, captures the answer, serves GET/DELETE.
    `store` None means storing is off (`--responses-ttl 0`)."""

    def __init__(self, store: ResponseStore | None) -> None:
        self.store = store
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.store is not None:
            self.task = asyncio.create_task(self._prune_forever())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            try:
                if pruned := await self.store.prune():
                    log.info("pruned %d stored responses", pruned)
            except OpenAIError:
                pass  # logged by unavailable_store; the next round tries again

    async def begin(self, body: bytes, key: ApiKey | None) -> tuple[bytes, Turn | None]:
        """The body to forward (stateless: `store` false, no `previous_response_id`) and the
        turn to capture, or the original body and None when there is nothing to keep."""
        data = load_json(body)
        if not isinstance(data, dict):
            return body, None  # routing answers the error
        previous, store = data.get("previous_response_id"), data.get("store")
        store = True if store is None else store  # OpenAI's default
        if previous is None and store is False:
            return body, None
        if not isinstance(store, bool):
            raise OpenAIError("'store' must be a boolean.", param="store", code="invalid_type")
        if previous is not None and (not isinstance(previous, str) or not previous):
            raise OpenAIError("'previous_response_id' must be a response id.", param="previous_response_id",
                              code="invalid_value")
        if self.store is None:
            if previous is not None:
                raise OpenAIError("'previous_response_id' needs the gateway's response store, which is off "
                                  "(--responses-ttl 0); send the whole conversation as `input`.",
                                  param="previous_response_id", code="unsupported_parameter")
            data["store"] = False  # accepted and ignored, as a worker does
            return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(), None
        owner = owner_of(key)
        items = input_items(data.get("input"))
        if previous is not None:
            stored = await self.store.load(previous, owner)
            if stored is None:
                raise not_found(previous, "previous_response_id")
            items = stored.input + list(stored.response.get("output") or []) + items
            data["input"] = items
            data.pop("previous_response_id")
        if store:  # refuse before generating what could not be kept
            size = len(gzip.compress(json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode(), 6))
            check_size(size, "previous_response_id" if previous else "input")
        data["store"] = False
        forward = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        return forward, Turn(owner, store, previous, items)

    async def finish(self, response: dict[str, Any], turn: Turn) -> None:
        """Marks the final answer and keeps it when asked to."""
        mark(response, turn)
        if turn.store and isinstance(response.get("id"), str):
            expires = time.time() + self.store.ttl
            await self.store.save(Stored(response["id"], turn.owner, expires, response, turn.input))

    async def capture(self, relay, turn: Turn):
        """The relay to send instead of `relay`. A non-streamed answer is complete when its
        headers come, so it is read, kept and rewritten here, and a failure to keep it is the
        request's error; a stream is rewritten event by event as it is relayed."""
        if relay.status != 200:
            return relay
        if relay.streaming:
            return EventCapture(relay, turn, self)
        try:
            body = b"".join([chunk async for chunk in _chunks(relay)])
            try:
                response = json.loads(body)
            except ValueError:
                return Replay(relay, body)  # cut short upstream: relay what came, keep nothing
            await self.finish(response, turn)
        except BaseException:
            relay.close()
            raise
        return Replay(relay, json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode())

    async def find(self, rid: str, key: ApiKey | None) -> Stored:
        stored = await self.store.load(rid, owner_of(key)) if self.store is not None else None
        if stored is None:
            raise not_found(rid)
        return stored


async def _chunks(relay):
    while chunk := await relay.read():
        yield chunk


class Replay:
    """A relay whose (rewritten) body has already been read."""

    def __init__(self, relay, body: bytes) -> None:
        self.relay, self.body = relay, body
        self.status, self.headers, self.streaming = relay.status, relay.headers, relay.streaming

    async def read(self) -> bytes:
        body, self.body = self.body, b""
        return body

    def close(self) -> None:
        self.relay.close()


class EventCapture(Replay):
    """Relays a Responses stream whole event by whole event, marking each `response` it carries
    and keeping the final one before it is sent, so a client that saw `response.completed` can
    continue from it on any replica at once. If it cannot be kept, an `error` event takes its place."""

    def __init__(self, relay, turn: Turn, conversations: Conversations) -> None:
        super().__init__(relay, b"")
        self.turn, self.conversations = turn, conversations
        self.events = SseEvents()

    async def read(self) -> bytes:
        while True:
            chunk = await self.relay.read()
            if not chunk:
                return self.events.flush()
            events = self.events.feed(chunk)
            if events:
                return b"".join([await self.event(e) for e in events])

    async def event(self, event: bytes) -> bytes:
        if not RESPONSE_KEY.search(event):
            return event + b"\n\n"
        lines = event.split(b"\n")
        at = next((i for i, line in enumerate(lines) if line.startswith(b"data: ")), None)
        try:
            payload = json.loads(lines[at][6:]) if at is not None else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("response"), dict):
            return event + b"\n\n"
        try:
            if payload.get("type") in TERMINAL:
                await self.conversations.finish(payload["response"], self.turn)
            else:
                mark(payload["response"], self.turn)
        except OpenAIError as exc:
            failed = {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param,
                      "sequence_number": payload.get("sequence_number")}
            return b"event: error\ndata: " + json.dumps(failed).encode() + b"\n\n"
        lines[at] = b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        return b"\n".join(lines) + b"\n\n"


def install_routes(app: FastAPI, keys: KeyStore, conversations: Conversations) -> None:
    """GET and DELETE /v1/responses/{id} and its input items, for the key that stored it."""

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        return (await conversations.find(response_id, keys.authenticate(request.headers))).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        key = keys.authenticate(request.headers)
        if conversations.store is None or not await conversations.store.delete(response_id, owner_of(key)):
            raise not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, request: Request, limit: int = 20, order: str = "desc",
                               after: str | None = None):
        if not 1 <= limit <= 100:
            raise OpenAIError("'limit' must be between 1 and 100.", param="limit", code="invalid_value")
        if order not in ("asc", "desc"):
            raise OpenAIError("'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
        stored = await conversations.find(response_id, keys.authenticate(request.headers))
        items = [{"id": i.get("id") or f"msg_{hashlib.sha256(f'{response_id}/{n}'.encode()).hexdigest()[:32]}",
                  **i} for n, i in enumerate(stored.input)]
        items = items if order == "asc" else items[::-1]
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
