"""The local servers programs talk to, started on first use and shared by the rows of one run.

A row's setup (catalogue.py) asks `Services` for a server; run_matrix stops
them all at the end. A program that needs a new kind of server gets a class
here and a method on `Services`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from e2e.matrix.result import CheckFailed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class S3Server:
    """moto's S3 server on 127.0.0.1 (pods share the node's network here)."""

    # moto does not check signatures, but answers anonymous requests with 403.
    _AUTH = (
        "AWS4-HMAC-SHA256 Credential=matrix/20240101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host, Signature=0"
    )

    def __init__(self, log: Path, timeout: float = 30.0) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        # Straight to 127.0.0.1, whatever http_proxy says.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._http.open(self.url + "/", timeout=2):
                    return
            except (OSError, urllib.error.URLError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-500:]
                raise CheckFailed(f"moto's S3 server did not start: {tail}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Authorization", self._AUTH)
        request.add_header("Content-Type", "application/octet-stream")
        with self._http.open(request, timeout=10) as response:
            data: bytes = response.read()
            return data

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


@dataclass
class Services:
    """Servers shared by the rows of one run, started on first use."""

    workdir: Path
    _s3: S3Server | None = None

    def s3(self) -> S3Server:
        if self._s3 is None:
            self._s3 = S3Server(self.workdir / "moto.log")
        return self._s3

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None
