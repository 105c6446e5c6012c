"""Run the real driver (`csi-async serve`) as a child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import grpc

from csi_async._proto.csi import v1 as csi
from e2e.csi_client import CsiClient


class DriverProcess:
    """`csi-async serve` with its own endpoint, kubelet root and state dir."""

    def __init__(
        self,
        workdir: Path,
        kubelet_root: Path,
        *,
        node_id: str = "node-1",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        socket_path: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.kubelet_root = kubelet_root
        # Unix socket paths are limited to 107 bytes; callers with deep
        # work dirs put the socket elsewhere (e.g. KubeletRoot.csi_socket).
        self.socket_path = socket_path or workdir / "csi.sock"
        self.endpoint = f"unix://{self.socket_path}"
        self.state_dir = workdir / "state"
        self.device_plugin_dir = kubelet_root / "device-plugins"
        self.log_path = workdir / "driver.log"
        self.node_id = node_id
        self.extra_args = extra_args or []
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.client = CsiClient(self.endpoint)

    def start(self, timeout: float = 20.0) -> DriverProcess:
        args = [
            sys.executable, "-m", "csi_async", "serve",
            "--endpoint", self.endpoint,
            "--node-id", self.node_id,
            "--kubelet-root", str(self.kubelet_root),
            "--state-dir", str(self.state_dir),
            "--log-level", "debug",
            # Never the host's kubelet: the device plugin lives in this kubelet root.
            "--device-plugin-dir", str(self.device_plugin_dir),
            *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ if self.env is None else self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"driver exited early:\n{self.log_text()}")
            try:
                ready = self.client.call(
                    "/csi.v1.Identity/Probe", csi.ProbeRequest(), csi.ProbeResponse
                )
                if ready.ready:
                    return self
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"driver not ready in {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the driver and wait; returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self) -> list[dict[str, object]]:
        entries = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries

    def __enter__(self) -> DriverProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
