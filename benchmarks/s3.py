"""A real S3 API for the tests and `make bench-remote`: moto's server on 127.0.0.1, and a proxy in front of it
that fails chosen requests the way object stores do (503 SlowDown, a connection cut mid-body, a stall).

Clients find it the standard way: AWS_ENDPOINT_URL and the AWS_* credentials in the environment (s3fs and
botocore read them; spawned worker processes and subprocesses inherit them). No project-specific key.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tubelet-test", "AWS_SECRET_ACCESS_KEY": "tubelet-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's S3 server in a process of its own on a free port of 127.0.0.1 (its own interpreter: serving never
    competes with the client for this process's GIL, as a real endpoint would not)."""

    def __init__(self, timeout: float = 30.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port} (is moto[server] "
                                       "installed? `make setup`)") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


# fault(method, path, n) -> None (forward), "503" (SlowDown), "403" (AccessDenied), "cut" (half the body, then
# close), "stall" (half the body, then the rest after stall_s); n counts the proxy's requests from 1
Fault = Callable[[str, str, int], Optional[str]]


class FaultyProxy:
    """HTTP proxy to `upstream` that injects `fault`'s failures; counts requests and faults by kind."""

    def __init__(self, upstream: str, fault: Fault):
        self.upstream = upstream.split("://", 1)[1]
        self.fault = fault
        self.stall_s = 30.0
        self.requests = 0
        self.bytes_sent = 0  # response bodies forwarded to the clients
        self.faults: Dict[str, int] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                with proxy._lock:
                    proxy.requests += 1
                    n = proxy.requests
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind = proxy.fault(self.command, self.path, n)
                if kind is not None:
                    with proxy._lock:
                        proxy.faults[kind] = proxy.faults.get(kind, 0) + 1
                if kind in ("503", "403"):
                    code, text = (b"SlowDown", b"Please reduce your request rate.") if kind == "503" else \
                        (b"AccessDenied", b"Access Denied")
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code + b"</Code><Message>"
                           + text + b"</Message></Error>")
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body or None,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the object's length
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                if kind == "cut":
                    self.send_header("Connection", "close")
                self.end_headers()
                if kind in ("cut", "stall") and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if kind == "cut":
                        self.close_connection = True
                        return
                    time.sleep(proxy.stall_s)  # a server that stops sending mid-body
                    self.wfile.write(data[len(data) // 2:])
                    return
                if self.command != "HEAD":
                    with proxy._lock:
                        proxy.bytes_sent += len(data)
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def object_get(method: str, path: str) -> bool:
    """A GET of an object (not a listing, not a bucket call)."""
    bare = path.split("?", 1)[0].strip("/")
    return method == "GET" and "/" in bare and "list-type" not in path


@contextmanager
def s3_env(endpoint: str) -> Iterator[None]:
    """The standard AWS variables pointing at `endpoint`, and fresh s3fs clients, for the block."""
    import s3fs

    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
