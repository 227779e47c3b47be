"""Serving one explorer page on localhost (``mlsae-lens explore --serve``).

Only the page itself is answered, so no other file of the run directory is reachable.
"""

import http.server
import logging
from pathlib import Path
from typing import Any

from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)


def page_server(path: str | Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 that answers ``/`` and ``/NAME`` with the page at ``path``
    and 404 with anything else (so no other file of the run directory is reachable)."""
    path = Path(path).resolve()
    body = path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path.split("?")[0] not in ("/", f"/{path.name}"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug(format, *args)

    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        raise MLSAEError(f"cannot serve on 127.0.0.1:{port} ({exc}); pass another --port") from exc


def serve(path: str | Path, port: int = 8000) -> None:
    """Serve the page on http://127.0.0.1:PORT/ until Ctrl-C."""
    server = page_server(path, port)
    logger.info("serving %s at http://127.0.0.1:%d/ (Ctrl-C to stop)", path, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["page_server", "serve"]
