"""Cluster DNS for pods: A records for `<service>.<namespace>.svc.cluster.local` (the
ClusterIP, or the ready pod IPs of a headless Service), NXDOMAIN for everything else.

Nothing is forwarded upstream: a pod must never reach a name server off this machine.
Why not CoreDNS: it is one more Go build and Deployment for a few dozen lines of answers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

from . import endpoints
from .store import Store

log = logging.getLogger(__name__)

DOMAIN = "svc.cluster.local"
A, AAAA, IN = 1, 28, 1
NOERROR, FORMERR, NXDOMAIN = 0, 1, 3


def parse_question(msg: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, name, qtype, end offset of the question) of a one-question query."""
    ident, flags, qd = struct.unpack("!HHH", msg[:6])
    if qd != 1:
        raise ValueError("one question per query")
    labels, i = [], 12
    while msg[i]:
        n = msg[i]
        labels.append(msg[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    qtype, _qclass = struct.unpack("!HH", msg[i + 1:i + 5])
    return ident, flags, ".".join(labels).lower(), qtype, i + 5


def answer(msg: bytes, resolve: Callable[[str], list[str] | None]) -> bytes:
    """The whole response to `msg`; `resolve(name)` gives IPv4 addresses or None (unknown)."""
    try:
        ident, flags, name, qtype, end = parse_question(msg)
    except (ValueError, IndexError, struct.error):
        return msg[:2] + struct.pack("!HHHHH", 0x8000 | FORMERR, 0, 0, 0, 0)
    ips = resolve(name)
    rcode = NXDOMAIN if ips is None else NOERROR
    records = [socket.inet_aton(ip) for ip in ips or []] if qtype == A else []
    header = struct.pack("!HHHHHH", ident, 0x8400 | (flags & 0x0100) | rcode, 1, len(records), 0, 0)
    body = b"".join(struct.pack("!HHHIH", 0xC00C, A, IN, 5, 4) + r for r in records)
    return header + msg[12:end] + body


class ClusterDNS(asyncio.DatagramProtocol):
    def __init__(self, services: Store, slices: Store) -> None:
        self.services, self.slices = services, slices
        self.transport: asyncio.DatagramTransport | None = None

    def resolve(self, name: str) -> list[str] | None:
        if not name.endswith("." + DOMAIN):
            return None
        parts = name[: -len(DOMAIN) - 1].split(".")
        if len(parts) != 2:
            return None
        svc = self.services.get(parts[1], parts[0])
        if svc is None:
            return None
        ip = svc["spec"].get("clusterIP")
        if ip and ip != "None":
            return [ip]
        return sorted({addr for addr, _ in endpoints.ready(self.slices.items(), parts[1], parts[0], None)}
                      | {addr for p in svc["spec"].get("ports") or []
                         for addr, _ in endpoints.ready(self.slices.items(), parts[1], parts[0], p.get("name"))})

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(answer(data, self.resolve), addr)
