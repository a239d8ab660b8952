"""A list-and-watch cache of one resource kind, kept as plain dicts (the API's own camelCase
shape, so pod specs read like the YAML that made them).

Why not the client's informers: the Python client has none; this is the 80 lines we need.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Handler = Callable[[str, Obj], None]


def key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


class Store:
    """Calls every handler with ("ADDED"|"MODIFIED"|"DELETED", object) for each change,
    including the changes a re-list finds after a broken watch."""

    def __init__(self, name: str, list_fn: Callable[..., Any], handlers: list[Handler] | None = None) -> None:
        self.name = name
        self._list_fn = list_fn
        self._handlers = list(handlers or [])
        self._items: dict[tuple[str, str], Obj] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def items(self) -> list[Obj]:
        with self._lock:
            return list(self._items.values())

    def get(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._items.get((namespace, name))

    def _emit(self, kind: str, obj: Obj) -> None:
        with self._lock:
            if kind == "DELETED":
                self._items.pop(key(obj), None)
            else:
                self._items[key(obj)] = obj
        for handler in self._handlers:
            try:
                handler(kind, obj)
            except Exception:  # a handler bug must not stop the watch
                log.exception("%s handler failed", self.name)

    def _relist(self) -> str:
        import json

        resp = self._list_fn(_preload_content=False)
        body = json.loads(resp.data)
        fresh = {key(o): o for o in body.get("items", [])}
        with self._lock:
            gone = [o for k, o in self._items.items() if k not in fresh]
        for obj in gone:
            self._emit("DELETED", obj)
        for obj in fresh.values():
            self._emit("ADDED", obj)
        return body["metadata"]["resourceVersion"]

    def run(self, stop: threading.Event) -> None:
        """List, then watch from the last version seen; re-list only after an error."""
        rv: str | None = None
        while not stop.is_set():
            try:
                if rv is None:
                    rv = self._relist()
                    self.synced.set()
                w = watch.Watch()
                for ev in w.stream(self._list_fn, resource_version=rv, timeout_seconds=60,
                                   allow_watch_bookmarks=True):
                    if stop.is_set():
                        w.stop()
                        break
                    if ev["type"] == "ERROR":
                        rv = None
                        break
                    rv = ev["raw_object"]["metadata"]["resourceVersion"]
                    if ev["type"] != "BOOKMARK":
                        self._emit(ev["type"], ev["raw_object"])
            except ApiException as exc:
                rv = None
                if exc.status != 410:
                    log.warning("%s watch: %s", self.name, exc.reason)
                    stop.wait(1)
            except Exception as exc:  # connection reset, API server restart
                rv = None
                log.warning("%s watch: %s", self.name, exc)
                stop.wait(1)

    def start(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name=f"watch-{self.name}", daemon=True)
        t.start()
        return t


def wait_synced(stores: list[Store], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for s in stores:
        s.synced.wait(max(0.0, deadline - time.monotonic()))
