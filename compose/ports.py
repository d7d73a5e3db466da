"""Free loopback ports for a deployment whose services share one network namespace."""

from __future__ import annotations

import socket

__all__ = ["free_port_pairs"]


def free_port_pairs(count: int) -> list[int]:
    """Ports P with P and P+1 both free now (a swtpm listens on such a pair).

    The sockets are closed before returning, so another process may still take a port
    before the service binds it; callers start their services promptly.
    """
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(chosen) < count:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            second = socket.socket()
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                first.close()
                second.close()
                continue
            held += [first, second]
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    return chosen
