"""A local HTTP server that behaves like a slow object store: a delay per request, and faults on demand.

Serves a folder on 127.0.0.1 (never another address) from a thread; used by benchmarks/remote_data.py and
tests/test_shards.py. Requests are counted per path; names in `stall` get half their bytes and then nothing
until the server closes.
"""
from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SlowServer:
    """`with SlowServer(folder, delay_s=0.02) as server:` serves folder at server.url (http://127.0.0.1:PORT)."""

    def __init__(self, folder: str | Path, delay_s: float = 0.0, stall: tuple = ()):
        self.folder, self.delay_s, self.stall = Path(folder), delay_s, set(stall)
        self.requests: Counter = Counter()
        self.closing = threading.Event()
        handler = functools.partial(_Handler, self, directory=str(self.folder))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "SlowServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()  # releases stalled responses
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, server: SlowServer, *args, **kwargs):
        self.slow = server
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        name = self.path.lstrip("/").split("?")[0]
        self.slow.requests[name] += 1
        time.sleep(self.slow.delay_s)  # the round trip of an object store
        if name not in self.slow.stall:
            return super().do_GET()
        data = (self.slow.folder / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.slow.closing.wait(60)  # a stalled transfer: the client's read timeout must end it

    def log_message(self, *args) -> None:
        pass
