"""A tiny webhook receiver for the demo: accepts the `notify` step's POSTs on 127.0.0.1:8099.

It checks the bearer token (NOTIFY_TOKEN) so the demo shows secrets resolved at call time,
and appends each accepted body to the file named by RECEIVER_LOG, if set.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    """Answers POST /hooks/... with {"received": true}."""

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), 1_048_576)
        body = self.rfile.read(length)
        token = os.environ.get("NOTIFY_TOKEN", "")
        if self.headers.get("Authorization") != f"Bearer {token}":
            self._answer(401, {"error": "bad token"})
            return
        log = os.environ.get("RECEIVER_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(body.decode("utf-8", "replace") + "\n")
        self._answer(200, {"received": True, "path": self.path})

    def _answer(self, code: int, payload: dict[str, object]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the demo prints what matters."""


class Server(ThreadingHTTPServer):
    """The standard library's threading server with a listen backlog for bursts: its
    default of 5 refuses connections when dozens of executions notify at once."""

    request_queue_size = 128


def main() -> None:
    """Serve until killed."""
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
