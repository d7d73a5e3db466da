"""TEST ONLY: hands a DEK to trainer processes over a Unix socket (see socket_entry.py).

The real path is the broker (attested release of sealed shares). For tests of the trainer
alone, the test process derives the DEK from real shares and serves it to each torchrun
process over a Unix socket, so the key never travels through env vars, argv or files.
Wire format: the server sends the 32 key bytes; later it may send one byte b"R" to revoke.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from sealed.secrets import SecretBuffer


class KeyServer:
    def __init__(self, path: Path, dek: SecretBuffer) -> None:
        self.path = path
        self._dek = dek
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.served = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._dek.view() as key:
                conn.sendall(key)
            with self._lock:
                self._conns.append(conn)
                self.served += 1

    def revoke_all(self) -> int:
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.sendall(b"R")
            return len(self._conns)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
