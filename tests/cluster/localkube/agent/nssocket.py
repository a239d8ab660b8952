"""Sockets bound inside another network namespace, for the agent's own asyncio loop.

A socket keeps the namespace it was created in, and setns(2) switches only the calling
thread, so a short-lived thread enters the namespace, binds, and hands the socket back.
(os.setns arrives in Python 3.12; ctypes keeps 3.10 and 3.11 working.)
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def bind_in_netns(netns: str, kind: int, address: tuple[str, int]) -> socket.socket:
    """A non-blocking socket of `kind` (SOCK_STREAM listening, or SOCK_DGRAM) bound to
    `address` inside `netns`."""
    result: dict[str, object] = {}

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
            sock.setblocking(False)
            result["sock"] = sock
        except OSError as exc:
            result["error"] = exc

    t = threading.Thread(target=work, name=f"bind-in-{netns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]
