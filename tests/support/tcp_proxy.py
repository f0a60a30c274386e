"""A loopback TCP forwarder whose link can be cut: a network partition between the service and a server.

Killing a server loses its data and SIGSTOP only delays what was sent (the kernel keeps
it buffered, the server runs it on SIGCONT). A partition is neither: whatever crosses
it is lost, and the server keeps what it had. While :meth:`TcpProxy.partitioned`, the
proxy still accepts connections but drops every byte both ways, so clients see timeouts;
when it heals, the connections of the partition are reset and new ones reach the server.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BUFFER_BYTES = 65536
SELECT_TIMEOUT_SECONDS = 0.05


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``.

    Example::

        with TcpProxy(6379) as proxy:                 # point the client at proxy.port
            with proxy.partitioned():
                ...                                   # the client's calls time out
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(SELECT_TIMEOUT_SECONDS)
        self._stopping = threading.Event()
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def start(self) -> TcpProxy:
        thread = threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._close_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @contextmanager
    def partitioned(self) -> Iterator[None]:
        """Nothing crosses inside the block; afterwards the cut connections are reset."""
        self._cut.set()
        try:
            yield
        finally:
            self._close_all()
            self._cut.clear()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream: socket.socket | None = None
            if not self._cut.is_set():
                try:
                    upstream = socket.create_connection(("127.0.0.1", self._target_port), timeout=1)
                except OSError:
                    client.close()  # the server is down: refuse, as it would
                    continue
            with self._lock:
                self._pairs.append((client, upstream))
            thread = threading.Thread(target=self._pump, args=(client, upstream), name="tcp-proxy-pump", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, client: socket.socket, upstream: socket.socket | None) -> None:
        selector = selectors.DefaultSelector()
        peers = {client: upstream}
        if upstream is not None:
            peers[upstream] = client
        for sock in peers:
            sock.settimeout(None)
            selector.register(sock, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(SELECT_TIMEOUT_SECONDS):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    data = ready.recv(BUFFER_BYTES)
                    if not data:
                        return
                    peer = peers[ready]
                    if peer is not None and not self._cut.is_set():
                        peer.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            for sock in peers:
                with contextlib.suppress(OSError):
                    sock.close()

    def _close_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()
