"""Developer tasks: `nox -l` lists them, `nox -s NAME` runs one, `nox` runs the defaults.

    tests      scripts/test.sh (bootstrap, build the zipapp and FUSE examples, pytest; root)
    lint       ruff check, ruff format --check, mypy
    validate   scripts/validate_manifests.py (manifests/ and examples/, offline)
    proto      scripts/gen_proto.sh (regenerate csi_async/_proto)
    kind       e2e/kind/run.sh (kind cluster, images, every example; needs docker and kind)
    fuzz       tests/test_fuzz_wire.py with 100000 examples against a live broker (root)
    soak       python -m e2e soak: 50 pods mount and unmount for 10 minutes (root)
    bench      python -m bench.run: latency, burst, memory and throughput table (root)

Every session runs in the project's .venv (scripts/bootstrap.sh creates it,
scripts/test.sh runs bootstrap): it holds the pinned dependencies, and the
tests also need Debian packages and root, which a nox-made virtualenv would
not bring. Extra arguments after `--` go to pytest, validate or run.sh.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "validate", "tests"]

VENV = ".venv/bin"


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The whole test suite, as CI runs it (real mounts: run as root)."""
    session.run("bash", "scripts/test.sh", *session.posargs, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Static checks: ruff (lint and formatting) and mypy (strict)."""
    session.run(f"{VENV}/ruff", "check", ".", external=True)
    session.run(f"{VENV}/ruff", "format", "--check", ".", external=True)
    session.run(f"{VENV}/mypy", external=True)


@nox.session(venv_backend="none")
def validate(session: nox.Session) -> None:
    """Kubernetes schema, Pod Security and FUSE-sidecar checks of manifests/ and examples/."""
    session.run(f"{VENV}/python", "scripts/validate_manifests.py", *session.posargs, external=True)


@nox.session(venv_backend="none")
def proto(session: nox.Session) -> None:
    """Regenerate the CSI message and service stubs from proto/."""
    session.run("bash", "scripts/gen_proto.sh", *session.posargs, external=True)


@nox.session(venv_backend="none")
def kind(session: nox.Session) -> None:
    """End to end on a kind cluster: driver DaemonSet, every example, cleanup, restarts."""
    session.run("bash", "e2e/kind/run.sh", *session.posargs, external=True)


@nox.session(venv_backend="none")
def fuzz(session: nox.Session) -> None:
    """The wire-protocol fuzz with 100000 examples instead of CI's 300 (root)."""
    session.run(
        f"{VENV}/python", "-m", "pytest", "tests/test_fuzz_wire.py", *session.posargs,
        env={"CSI_ASYNC_FUZZ_EXAMPLES": "100000"}, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def soak(session: nox.Session) -> None:
    """50 pods mount, read and unmount for 10 minutes; then nothing may be left (root).

    Extra arguments go to `python -m e2e soak`, e.g. `-- --duration 60`.
    """
    session.run(f"{VENV}/python", "scripts/build_zipapp.py", "-o", "build/fusermount3",
                external=True)  # fmt: skip
    session.run("bash", "scripts/build_fuse_examples.sh", external=True)
    session.run(
        f"{VENV}/python", "-m", "e2e", "soak", "--duration", "600", "--parallel", "50",
        "--zipapp", "build/fusermount3", *session.posargs, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """The benchmarks (python -m bench.run) with their table and JSON; `-- --quick` for short."""
    session.run(f"{VENV}/python", "scripts/build_zipapp.py", "-o", "build/fusermount3",
                external=True)  # fmt: skip
    session.run("bash", "scripts/build_fuse_examples.sh", external=True)
    session.run(f"{VENV}/python", "-m", "bench.run", *session.posargs, external=True)
