"""The zipapp's module layout: stdlib only, no import cycle, lazy where it is latency-bound.

fusermount3_proxy is copied into FUSE images and run by libfuse on every
mount, so its imports are part of its contract: nothing outside the standard
library (csi_async least of all: the driver imports the protocol from here,
never the other way round), no module that needs another to have finished
importing first, and on the paths that run on every mount no module they do
not use. The first checks read the sources (ast), the last run the built
zipapp under -X importtime.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from fusermount3_proxy import protocol

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "fusermount3_proxy"
PACKAGE_DIR = REPO / PACKAGE
BUILD_SCRIPT = REPO / "scripts" / "build_zipapp.py"
# The oldest Python a supported FUSE image ships.
OLDEST_PYTHON = (3, 10)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    if parts == ("__init__",):
        return PACKAGE
    return ".".join((PACKAGE, *parts))


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(name: str) -> list[str]:
    """Every module name one module imports, at module level or deferred in a function.

    "from fusermount3_proxy import client" names the submodule client, not the
    package; a relative import is resolved against the module's package.
    """
    path = MODULES[name]
    tree = ast.parse(path.read_bytes(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append(submodule if submodule in MODULES else base)
    return found


def own_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the package itself included)."""
    return {
        name: {target for target in imports_of(name) if target in MODULES and target != name}
        for name in MODULES
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node) :], node]
        if node in done:
            return None
        stack.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        stack.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle is not None:
            return cycle
    return None


def test_the_package_has_the_modules_the_layout_names() -> None:
    # Each of these is one concern: folding two back together, or adding a
    # module, should change this list on purpose, not by accident.
    expected = {
        "__main__", "cli", "client", "codec", "commfd", "getopt", "mountpoint", "names",
        "output", "protocol", "starter", "wait", "watcher",
    }  # fmt: skip
    assert {name.rpartition(".")[2] for name in MODULES if name != PACKAGE} == expected


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_import_is_of_the_stdlib_or_of_the_package(name: str) -> None:
    foreign = [
        target
        for target in imports_of(name)
        if target.partition(".")[0] not in sys.stdlib_module_names
        and target.partition(".")[0] != PACKAGE
    ]
    assert foreign == [], f"{name} imports outside the standard library"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_imports_the_driver(name: str) -> None:
    # Said on its own because it is the one a refactor of csi_async is most
    # likely to add, and it would work in the repository and fail in an image.
    assert not [t for t in imports_of(name) if t.partition(".")[0] == "csi_async"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_import_names_a_module_that_exists(name: str) -> None:
    missing = [
        target
        for target in imports_of(name)
        if target.partition(".")[0] == PACKAGE and target not in MODULES
    ]
    assert missing == []


def test_the_package_imports_have_no_cycle() -> None:
    # Deferred imports count: a cycle closed inside a function still means
    # neither module can be read, or moved, without the other.
    assert find_cycle(own_graph()) is None


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_parses_as_the_oldest_supported_python(name: str) -> None:
    # Syntax only (match statements are fine, "except*" or "type X = ..." are
    # not); the stdlib calls are checked by running the CLI tests on 3.10
    # (FUSERMOUNT3_TEST_PYTHON, see test_proxy_cli.py; scripts/test.sh does).
    path = MODULES[name]
    ast.parse(path.read_bytes(), str(path), feature_version=OLDEST_PYTHON)


# --- what the built zipapp imports -------------------------------------------


@pytest.fixture(scope="module")
def zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("bin") / "fusermount3"
    subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "-o", str(output),
         "--interpreter", f"{sys.executable} -IS"],
        check=True, capture_output=True,
    )  # fmt: skip
    return output


def shebang_command(zipapp: Path, *python_args: str) -> list[str]:
    """What the kernel runs for the zipapp's "#!" line, with python_args after the interpreter."""
    line = zipapp.read_bytes().split(b"\n", 1)[0].removeprefix(b"#!").decode()
    interpreter, _, argument = line.partition(" ")
    return [interpreter, *python_args, *([argument] if argument else []), str(zipapp)]


def importtime_names(stderr: str) -> list[str]:
    return [
        line.rpartition("|")[2].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and not line.endswith("imported package")
    ]


def imported_modules(
    zipapp: Path, *args: str, env: dict[str, str] | None = None, commfd: int | None = None
) -> list[str]:
    """The modules one run of the zipapp, exec'd as libfuse does it, imports, in order."""
    commfd_pair = socket.socketpair()
    ours, theirs = commfd_pair
    try:
        result = subprocess.run(
            [*shebang_command(zipapp, "-X", "importtime"), *args],
            env={"_FUSE_COMMFD": str(theirs.fileno()), **(env or {})},
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        ours.close()
        theirs.close()
    return importtime_names(result.stderr)


@pytest.fixture(scope="module")
def floor_modules() -> set[str]:
    """What a bare `python -I -S -c pass` imports: every run pays for these anyway."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-I", "-S", "-c", "pass"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return set(importtime_names(result.stderr))


class MountingBroker:
    """Answers one mount request with ok and an fd of /dev/null, as the broker would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._listener.settimeout(30)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn, open(os.devnull, "rb") as fuse:
            conn.settimeout(30)
            header = conn.recv(protocol.HEADER_SIZE, socket.MSG_WAITALL)
            length = protocol.decode_header(header, protocol.KIND_REQUEST)
            conn.recv(length, socket.MSG_WAITALL)
            response = {"ok": True, "errno": 0, "message": "", "mount_id": 7}
            frame = protocol.encode_frame(protocol.KIND_RESPONSE, response)
            socket.send_fds(conn, [frame], [fuse.fileno()])

    def close(self) -> None:
        self._thread.join(30)
        self._listener.close()


def test_the_help_and_version_probes_load_only_the_entry_point_and_the_texts(
    zipapp: Path,
) -> None:
    # fuser runs "<helper> -h" before every mount.
    for probe in ("-h", "-V"):
        own = {m for m in imported_modules(zipapp, probe) if m.startswith(PACKAGE)}
        assert own == {PACKAGE, *(f"{PACKAGE}.{m}" for m in ("__main__", "names", "output"))}, probe


# The mount path, up to the fd handed over: the command line and its parts
# (names.py: which helper's command line), the client and the codec. Nothing
# else of the package: not the other modes, nor protocol.py (json and typing
# come with it).
MOUNT_PATH = {PACKAGE, *(f"{PACKAGE}.{name}" for name in (
    "__main__", "cli", "commfd", "getopt", "mountpoint", "names", "output", "client", "codec",
))}  # fmt: skip
# What the mount path may import beyond the bare interpreter's modules: two
# C modules (_socket is builtin in Debian's Python, an extension elsewhere).
# Not os, socket, json, struct, array, typing, __future__ or runpy: each
# costs start-up time the helper's goal (1.5 ms over the bare interpreter,
# the broker's share included) has no room for.
MOUNT_PATH_STDLIB = {"_socket", "errno"}


def test_a_mount_loads_the_mount_path_and_two_c_modules_beyond_the_bare_interpreter(
    zipapp: Path, tmp_path: Path, floor_modules: set[str]
) -> None:
    broker = MountingBroker(tmp_path / "broker.sock")
    try:
        env = {"FUSERMOUNT3PROXY_FDPASSING_SOCKPATH": broker.path}
        loaded = set(imported_modules(zipapp, "-o", "rw,fsname=x", str(tmp_path), env=env))
    finally:
        broker.close()
    assert {m for m in loaded if m.startswith(PACKAGE)} == MOUNT_PATH
    assert loaded - floor_modules - MOUNT_PATH <= MOUNT_PATH_STDLIB


def test_a_refused_mount_loads_no_more_than_a_mount(
    zipapp: Path, tmp_path: Path, floor_modules: set[str]
) -> None:
    # The broker is unreachable: the error path formats a message, and that
    # must not pull in anything a mount does not.
    env = {"FUSERMOUNT3PROXY_FDPASSING_SOCKPATH": str(tmp_path / "none.sock")}
    loaded = set(imported_modules(zipapp, "-o", "rw,fsname=x", str(tmp_path), env=env))
    assert loaded - floor_modules <= MOUNT_PATH | MOUNT_PATH_STDLIB


def test_the_wait_and_start_modes_load_neither_the_command_line_nor_each_other(
    zipapp: Path, tmp_path: Path
) -> None:
    env = {"FUSERMOUNT3PROXY_FDPASSING_SOCKPATH": str(tmp_path / "none.sock")}
    paths = {
        "wait": ["--wait", str(tmp_path), "--timeout", "0"],
        "starter": ["--start", "--", "true", "/dev/fd/N"],
    }
    for mode, args in paths.items():
        own = {m for m in imported_modules(zipapp, *args, env=env) if m.startswith(PACKAGE)}
        others = {"cli", "getopt", "watcher", "starter", "wait"} - {mode}
        assert own.isdisjoint({f"{PACKAGE}.{name}" for name in others}), mode


# --- how the archive starts -------------------------------------------------


def load_build_script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("build_zipapp", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shebang_runs_the_entry_point_through_dash_c_and_not_runpy(zipapp: Path) -> None:
    line = zipapp.read_bytes().split(b"\n", 1)[0].decode()
    build = load_build_script()
    assert line == f"#!{sys.executable} -ISc{build.BOOTSTRAP}"
    # runpy is how Python runs an archive named on its command line.
    loaded = imported_modules(zipapp, "-V")
    assert "runpy" not in loaded
    assert "importlib.util" not in loaded


def test_the_archive_still_runs_when_python_is_given_it(zipapp: Path, tmp_path: Path) -> None:
    # "python3 fusermount3 ..." finds the archive's __main__.py (through runpy):
    # same output and exit status as the exec'd helper, relative path included.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "fusermount3").write_bytes(zipapp.read_bytes())
    (tmp_path / "bin" / "fusermount3").chmod(0o755)
    for argv in (
        [sys.executable, "-IS", "bin/fusermount3", "-h"],
        ["bin/fusermount3", "-h"],
        ["./bin/fusermount3", "-h"],
    ):
        result = subprocess.run(
            argv, cwd=tmp_path, env={}, capture_output=True, text=True, timeout=30, check=False
        )
        name = argv[-2]
        assert (result.returncode, result.stderr) == (1, ""), argv
        assert result.stdout.startswith(f"{name}: [options] mountpoint\n"), argv


@pytest.mark.parametrize(
    ("interpreter", "bootstrapped"),
    [
        ("/usr/bin/python3 -IS", True),
        ("/usr/bin/python3", True),
        ("/usr/bin/python3 -I", True),
        # Not one cluster of flags that -c can follow: the plain shebang.
        ("/usr/bin/env python3", False),
        ("/usr/bin/python3 -X importtime", False),
        ("/usr/bin/python3 -IW error", False),
        ("/usr/bin/python3 -Im", False),
        # Longer than the kernel reads of a "#!" line, once the command is added.
        ("/opt/" + "p" * 200 + "/bin/python3 -IS", False),
    ],
)
def test_the_shebang_takes_the_bootstrap_only_where_the_kernel_and_python_pass_it(
    interpreter: str, bootstrapped: bool
) -> None:
    build = load_build_script()
    line = build.shebang_line(interpreter)
    if bootstrapped:
        path, _, flags = interpreter.partition(" ")
        assert line == f"{path} {flags or '-'}c{build.BOOTSTRAP}"
        assert len(f"#!{line}\n") <= build.SHEBANG_LIMIT
    else:
        assert line == interpreter
