"""Small socket helpers shared by the worker, the gateway and `modelfleet serve`."""

from __future__ import annotations

import socket
import threading


class PortInUseError(Exception):
    pass


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, bound now, so that a busy port is reported before any slow start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


_handed_out: set[int] = set()
_handing_out = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, not one this process handed out before: callers bind it later (a
    worker process binds it seconds after), and the kernel offers the same free port again
    about once in 14,000 calls, which put two of one `serve`'s workers on one port. (Once the
    ephemeral range has been handed out whole, ports repeat rather than none is found.)"""
    with _handing_out:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                break
        _handed_out.add(port)
        return port
