"""The gateway's watched Kubernetes state: one keyed store per resource, kept by one informer.

A `Store` holds a resource's objects by (namespace, name) and applies the three kinds of change
an informer delivers (a whole listing, an object put, an object deleted); its one callback is
told which keys changed, so every consumer (ModelDeployments, EndpointSlices, key Secrets,
gateway peers) reads the store instead of switching on watch events itself.

An `Informer` keeps one store current: it lists, watches from the listing's resourceVersion with
the official client's `kubernetes.watch.Watch` (which frames the stream, follows bookmarks and
raises `ApiException(410)` for an expired watch), lists again at once on 410 and backs off on
any other error (an API server restart). The client is synchronous, so each informer is a daemon
thread that hands changes to the event loop, where the store and its consumers live. The store
and the loop are ours because the client's `Watch` stops at the stream: it keeps no cache and
never relists, `kubernetes_asyncio` is not a dependency, and kopf's watchers serve an
operator's handlers, not a proxy's cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
WATCH_SECONDS = 120  # each watch request ends after this; the next resumes from the last version


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", "default"), meta.get("name", "")


class Store:
    """key -> object for one resource; `on_change(keys)` runs after every change with the keys
    that were put or deleted (all old and new keys after a listing)."""

    def __init__(self, on_change: Callable[[set[Key]], None] | None = None) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.on_change = on_change

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        """A whole listing: what it lacks is gone."""
        old = self.objects
        self.objects = {key_of(obj): obj for obj in items}
        self._changed(set(old) | set(self.objects))

    def put(self, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        self.objects[key] = obj
        self._changed({key})

    def delete(self, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        self.objects.pop(key, None)
        self._changed({key})

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        """The one event switch: "SYNC" (a listing, {"items": [...]}), "ADDED", "MODIFIED" or
        "DELETED" (one object)."""
        if kind == "SYNC":
            self.replace(obj.get("items") or [])
        elif kind == "DELETED":
            self.delete(obj)
        else:
            self.put(obj)

    def values(self) -> Iterable[dict[str, Any]]:
        return self.objects.values()

    def _changed(self, keys: set[Key]) -> None:
        if self.on_change is not None:
            self.on_change(keys)


class Informer:
    """List + watch one resource into `store`, on a thread; changes reach the store on `loop`."""

    def __init__(self, name: str, store: Store, list_fn: Callable[..., Any], loop: asyncio.AbstractEventLoop,
                 **kwargs: Any) -> None:
        self.name = name
        self.store = store
        self.list_fn = list_fn
        self.loop = loop
        self.kwargs = kwargs
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _send(self, kind: str, obj: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.store.apply, kind, obj)
        except RuntimeError:
            self.stopping.set()  # the loop is gone

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        while not self.stopping.is_set():
            try:
                listing = json.loads(self.list_fn(_preload_content=False, **self.kwargs).data)
                self._send("SYNC", listing)
                self.synced.set()
                version = listing["metadata"]["resourceVersion"]
                backoff = 0.5
                while not self.stopping.is_set():
                    # return_type "object": events carry plain dicts (no model classes), and the
                    # Watch still tracks resourceVersion from objects and bookmarks and raises
                    # ApiException(410) on an expired watch. (deserialize=False, the other way to
                    # plain dicts, turns every ERROR event into a KeyError in kubernetes 37.)
                    w = watch.Watch(return_type="object")
                    for event in w.stream(self.list_fn, resource_version=version, timeout_seconds=WATCH_SECONDS,
                                          allow_watch_bookmarks=True, **self.kwargs):
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._send(event["type"], event["raw_object"])
                        if self.stopping.is_set():
                            w.stop()
                            break
                    version = w.resource_version or version
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s watch expired; listing again", self.name)
                    continue
                log.warning("%s watch failed (%s); retrying in %.1fs", self.name, exc.status, backoff)
            except Exception as exc:  # noqa: BLE001 - connection resets, API server restarts
                log.warning("%s watch failed (%s); retrying in %.1fs", self.name, exc, backoff)
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 10.0)


def wait_synced(informers: list[Informer], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in informers)
