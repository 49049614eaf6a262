"""Serve a web bundle on this machine, cross-origin isolated, so the page gets WASM threads.

    python -m compactgpt.app.deploy.serve WEB_FOLDER [--port 8000] [--host 127.0.0.1]

Browsers give SharedArrayBuffer (which onnxruntime-web's threads need) only to pages served
with the COOP/COEP headers sent here; any static host that sends them works as well, and
without them the page runs on one thread.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import threading
from pathlib import Path

ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json", ".onnx": "application/octet-stream"}

    def end_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")  # a rebuilt bundle is never mixed with a cached one
        super().end_headers()

    def log_message(self, format, *args) -> None:  # quiet: a page load is dozens of requests
        pass


def start_server(folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server of `folder` running in a daemon thread; its URL is url_of(server). port 0 picks a
    free port. Call server.shutdown() to stop it."""
    handler = functools.partial(_Handler, directory=str(folder))
    server = http.server.ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def url_of(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m compactgpt.app.deploy.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a web bundle (compactgpt deploy --target web)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    args = p.parse_args(argv)
    if not (Path(args.folder) / "index.html").is_file():
        p.exit(2, f"error: {args.folder} has no index.html; build one with compactgpt deploy --target web\n")
    server = start_server(args.folder, args.host, args.port)
    print(f"serving {args.folder} at {url_of(server)} (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
