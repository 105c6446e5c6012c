"""The host side of bench/agent.py: start an agent, send it commands, stop it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

from bench.testbed import NOBODY, REPO, Env
from e2e import privileges


class AgentError(RuntimeError):
    pass


class Agent:
    """bench/agent.py in its own mount namespace; see its docstring."""

    def __init__(self, env: Env, name: str, **config: Any) -> None:
        self.name = name
        self.log_path = env.workdir / f"agent-{name}.log"
        scratch = env.dir(f"agent-{name}-scratch")
        self.config = {
            "scratch": str(scratch),
            "log": str(self.log_path),
            # Every program it starts runs as 65534 through this (setpriv);
            # see e2e.privileges for why setuid helpers must keep working.
            "as_user": privileges.as_user_with_setuid_helpers(NOBODY, NOBODY),
            **config,
        }
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None

    def command(self) -> list[str]:
        # -E -s -S is -I without -P: the agent imports bench.minifuse from the
        # repository (the working directory) and nothing from the venv.
        return [
            # The agent dies with the thread that started it.
            *privileges.dying_with_parent(),
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            sys.executable,
            "-E",
            "-s",
            "-S",
            "-m",
            "bench.agent",
            json.dumps(self.config),
        ]

    def __enter__(self) -> Agent:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
            )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready:
            self.proc.wait()
            raise AgentError(f"agent {self.name} did not start:\n{self.log_tail()}")
        return self

    def call(self, op: str, **kwargs: Any) -> Any:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise AgentError(f"agent {self.name} died:\n{self.log_tail()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AgentError(f"agent {self.name}: {op}: {reply['error']}\n{self.log_tail()}")
        return reply["result"]

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                proc.stdin.close()
            proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
