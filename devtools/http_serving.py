"""What the local HTTP servers (the Sonos stand-in, the local API) share: a quiet server,
its request handler's HTTP manners, its background thread, and start/stop as a `with` block."""

from __future__ import annotations

import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self


class Running:
    """``with thing:`` starts it and stops it however the block ends (``start`` returns ``self``)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.stop()


class KeepAliveHandler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 like a real API, a bare ``Server`` header, and no stderr access log."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's
    # delayed ACK of the headers (about 40 ms on Linux), on every keep-alive answer.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.server_version  # without the default's " Python/3.x"

    def log_message(self, format: str, *args: Any) -> None:
        return  # the default writes raw request lines, queries included, to stderr


class QuietThreadingServer(ThreadingHTTPServer):
    """A threading HTTP server whose request errors are named, never printed with a traceback."""

    daemon_threads = True
    request_queue_size = 128  # the default 5 resets connections when benchmarks open dozens at once
    label: ClassVar[str] = "server"  # how its error lines begin

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback whose message could quote request data; name the error only.
        exc_type = sys.exc_info()[0]
        if exc_type is not None and issubclass(exc_type, ConnectionError):
            return
        name = exc_type.__name__ if exc_type is not None else "unknown error"
        print(f"{self.label}: internal error ({name})", file=sys.stderr)


def serve_in_thread(server: ThreadingHTTPServer, *, name: str, poll_interval: float) -> threading.Thread:
    """Serve from a daemon thread; ``poll_interval`` is how soon ``shut_down`` is noticed."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll_interval}, name=name, daemon=True
    )
    thread.start()
    return thread


def shut_down(server: ThreadingHTTPServer, thread: threading.Thread | None) -> None:
    """Stop serving, close the listening socket and wait for the serving thread."""
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join()
