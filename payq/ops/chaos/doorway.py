"""A second address for one provider, that the chaos run can shut: connections refused.

Endpoints of one ledger group are URLs of the same account. The run gives the primary
provider a second endpoint through this forwarder (its own port on 127.0.0.1, bytes
passed both ways to the provider's port). ``shut()`` resets every open connection and
stops listening, so that new connections are refused before a byte of a request can
leave; ``open()`` listens again on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

__all__ = ["Doorway"]

_CHUNK = 65536


class Doorway:
    def __init__(self, port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.target = host, port, target_port
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.create_server((self.host, self.port), reuse_port=False)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def shut(self) -> None:
        """Stop listening (new connections refused) and reset every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: close sends a reset, as a dead host's network would.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # shut
            try:
                upstream = socket.create_connection((self.host, self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Bytes one way until either side ends; then both connections close at once, so
        a client that hangs up (a timeout) is gone for the provider too, as without the
        doorway (a half-closed upstream would keep its request in flight there)."""
        try:
            while data := source.recv(_CHUNK):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.difference_update((source, sink))
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
