"""Gunicorn's response writer, changed to put the status line and headers on the wire with the first body bytes.

Why: gunicorn writes the head and the body in two ``sendall`` calls. A worker killed between them (SIGKILL,
the OOM killer, a node losing the pod) leaves nginx a head it has already passed on and a body that never
comes, so the client reads a cut-off answer instead of the clean 503 it gets for a request that was not
answered yet. One write makes a small answer (every JSON answer) arrive whole or not at all. A streamed
page still sends its head with its first part, as before.
"""

from __future__ import annotations

from gunicorn.http import wsgi


class OneWriteResponse(wsgi.Response):
    """A ``gunicorn.http.wsgi.Response`` that holds its head until the first body bytes (or the end)."""

    _head: bytes | None = None

    def send_headers(self) -> None:
        """Build the head as gunicorn does, but keep it for the next write."""
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self._head = ("".join(lines) + "\r\n").encode("latin-1")
        self.headers_sent = True

    def flush_head(self, data: bytes = b"") -> None:
        """Write the held head (if any) and ``data`` (already framed) in one ``sendall``."""
        head, self._head = self._head or b"", None
        if head or data:
            self.sock.sendall(head + data)

    def _emit_body(self, data: bytes) -> None:
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        self.flush_head(data)

    def sendfile(self, respiter) -> bool:
        # gunicorn's sendfile writes to the socket itself after send_headers: the head must be out first.
        self.send_headers()
        self.flush_head()
        return super().sendfile(respiter)

    def close(self) -> None:
        if not self.headers_sent:
            self.send_headers()
        if self.chunked:
            self.flush_head(b"0\r\n\r\n")  # the last chunk, with the head if nothing else was written
        else:
            self.flush_head()


def install() -> None:
    """Make gunicorn build every HTTP/1 response with ``OneWriteResponse`` (call in the master, before fork)."""
    wsgi.Response = OneWriteResponse
