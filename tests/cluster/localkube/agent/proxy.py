"""The service proxy: every NodePort Service answers on 127.0.0.1:<nodePort>, forwarding TCP
to its ready endpoints; the API server, which listens on loopback only, is forwarded to
the bridge address so pods reach it at KUBERNETES_SERVICE_HOST; and, inside the services
namespace, every ClusterIP:port answers pods (kube-proxy's old userspace mode), next to the
cluster DNS.

Runs on its own asyncio loop thread; the watch threads only ask it to re-sync.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
from collections.abc import Callable

from . import endpoints
from .dns import ClusterDNS
from .nssocket import bind_in_netns
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
    def __init__(self, services: Store, slices: Store, static: dict[tuple[str, int], tuple[str, int]],
                 service_netns: str | None = None, dns_ip: str | None = None) -> None:
        self.services = services
        self.slices = slices
        self.static = static
        self.service_netns = service_netns
        self.dns_ip = dns_ip
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
        if self.service_netns and self.dns_ip:
            self._submit(self._serve_dns())
        self.resync()

    async def _serve_dns(self) -> None:
        assert self.service_netns and self.dns_ip
        try:
            sock = bind_in_netns(self.service_netns, socket.SOCK_DGRAM, (self.dns_ip, 53))
            await self.loop.create_datagram_endpoint(lambda: ClusterDNS(self.services, self.slices), sock=sock)
            log.info("cluster DNS on %s:53 in %s", self.dns_ip, self.service_netns)
        except OSError as exc:
            log.error("cluster DNS cannot start: %s", exc)

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

    def _cluster_ports(self) -> set[int]:
        return {int(p["port"]) for svc in self.services.items()
                if svc["spec"].get("clusterIP") not in (None, "", "None")
                for p in svc["spec"].get("ports") or [] if p.get("protocol", "TCP") == "TCP"}

    def _cluster_targets(self, local: tuple[str, int]) -> list[tuple[str, int]]:
        """Endpoints of the Service whose ClusterIP:port a pod connected to."""
        ip, port = local[0], local[1]
        for svc in self.services.items():
            if svc["spec"].get("clusterIP") == ip:
                p = endpoints.service_port(svc, port)
                if p:
                    meta = svc["metadata"]
                    return endpoints.ready(self.slices.items(), meta["namespace"], meta["name"], p.get("name") or "")
        return []

    def _targets(self, ns: str, name: str, port_name: str) -> Targets:
        return lambda: endpoints.ready(self.slices.items(), ns, name, port_name)

    async def _reconcile(self) -> None:
        async with self._reconciling:
            await self._reconcile_locked()

    async def _reconcile_locked(self) -> None:
        desired = self._desired()
        for listen, (ident, server) in list(self._servers.items()):
            if ident == "cluster" or (isinstance(ident, tuple) and ident[0] == "static"):
                continue
            if desired.get(listen) != ident:
                server.close()
                del self._servers[listen]
                log.info("node port %s closed", listen[1])
        for listen, ident in desired.items():
            if listen not in self._servers:
                await self._listen(listen, ident, self._targets(*ident))
        if self.service_netns:
            for port in self._cluster_ports():
                if ("cluster", port) not in self._servers:
                    await self._listen_cluster(port)

    async def _listen_cluster(self, port: int) -> None:
        """One listener per port number for every ClusterIP (they are all local addresses of
        the services namespace); the accepted socket's own address says which Service."""
        assert self.service_netns

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._forward(r, w, self._cluster_targets(w.get_extra_info("sockname")))

        try:
            sock = bind_in_netns(self.service_netns, socket.SOCK_STREAM, ("0.0.0.0", port))
            server = await asyncio.start_server(handle, sock=sock)
        except OSError as exc:
            log.error("cannot listen on cluster port %s: %s", port, exc)
            return
        self._servers[("cluster", port)] = ("cluster", server)

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
            except (TimeoutError, OSError):
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
