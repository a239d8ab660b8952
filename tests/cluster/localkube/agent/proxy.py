"""The service proxy: every NodePort Service answers on 127.0.0.1:<nodePort>, forwarding TCP
to its ready endpoints; and the API server, which listens on loopback only, is forwarded to
the bridge address so pods reach it at KUBERNETES_SERVICE_HOST.

Runs on its own asyncio loop thread; the watch threads only ask it to re-sync.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable

from . import endpoints
from .store import Store

log = logging.getLogger(__name__)

Targets = Callable[[], list[tuple[str, int]]]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class ServiceProxy:
    def __init__(self, services: Store, slices: Store, static: dict[tuple[str, int], tuple[str, int]]) -> None:
        self.services = services
        self.slices = slices
        self.static = static
        self.loop = asyncio.new_event_loop()
        self._servers: dict[tuple[str, int], tuple[object, asyncio.AbstractServer]] = {}
        self._rr = itertools.count()
        self._reconciling = asyncio.Lock()  # one reconcile at a time: never bind a port twice
        self._thread = threading.Thread(target=self.loop.run_forever, name="service-proxy", daemon=True)

    def start(self) -> None:
        self._thread.start()
        for listen, target in self.static.items():
            self._submit(self._listen(listen, ("static", target), lambda t=target: [t]))
        self.services.add_handler(lambda *_: self.resync())
        self.resync()

    def _submit(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def resync(self) -> None:
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._reconcile()))

    def _desired(self) -> dict[tuple[str, int], tuple[str, str, str]]:
        out = {}
        for svc in self.services.items():
            if svc["spec"].get("type") not in ("NodePort", "LoadBalancer"):
                continue
            for p in svc["spec"].get("ports") or []:
                if p.get("nodePort") and p.get("protocol", "TCP") == "TCP":
                    key = (svc["metadata"]["namespace"], svc["metadata"]["name"], p.get("name") or "")
                    out[("127.0.0.1", int(p["nodePort"]))] = key
        return out

    def _targets(self, ns: str, name: str, port_name: str) -> Targets:
        return lambda: endpoints.ready(self.slices.items(), ns, name, port_name)

    async def _reconcile(self) -> None:
        async with self._reconciling:
            await self._reconcile_locked()

    async def _reconcile_locked(self) -> None:
        desired = self._desired()
        for listen, (ident, server) in list(self._servers.items()):
            if ident == "static" or (isinstance(ident, tuple) and ident[0] == "static"):
                continue
            if desired.get(listen) != ident:
                server.close()
                del self._servers[listen]
                log.info("node port %s closed", listen[1])
        for listen, ident in desired.items():
            if listen not in self._servers:
                await self._listen(listen, ident, self._targets(*ident))

    async def _listen(self, listen: tuple[str, int], ident: object, targets: Targets) -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._forward(r, w, targets())

        try:
            server = await asyncio.start_server(handle, listen[0], listen[1], reuse_address=True)
        except OSError as exc:
            log.error("cannot listen on %s:%s for %s: %s", listen[0], listen[1], ident, exc)
            return
        self._servers[listen] = (ident, server)
        log.info("listening on %s:%s for %s", listen[0], listen[1], ident)

    async def _forward(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter, targets: list[tuple[str, int]]) -> None:
        if targets:
            start = next(self._rr) % len(targets)
            targets = targets[start:] + targets[:start]
        for host, port in targets:
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
            except (OSError, asyncio.TimeoutError):
                continue
            try:
                await asyncio.gather(_pipe(cr, uw), _pipe(ur, cw))
            finally:
                uw.close()
                cw.close()
            return
        cw.close()  # no ready endpoint: refuse, as kube-proxy's reject rule does

    def stop(self) -> None:
        def close() -> None:
            for _, server in self._servers.values():
                server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(close)
