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
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
        "__main__", "cli", "client", "commfd", "getopt", "mountpoint", "output",
        "protocol", "starter", "wait", "watcher",
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
    # (FUSERMOUNT3_TEST_PYTHON, see test_proxy_cli.py).
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


def imported_modules(zipapp: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The modules one run of the zipapp imports, in order, from -X importtime."""
    commfd_pair = socket.socketpair()
    ours, theirs = commfd_pair
    try:
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-IS", str(zipapp), *args],
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
    return [
        line.rpartition("|")[2].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and not line.endswith("imported package")
    ]


def test_the_help_and_version_probes_load_only_the_entry_point_and_the_texts(
    zipapp: Path,
) -> None:
    # fuser runs "<helper> -h" before every mount.
    for probe in ("-h", "-V"):
        own = {m for m in imported_modules(zipapp, probe) if m.startswith(PACKAGE)}
        assert own == {PACKAGE, f"{PACKAGE}.__main__", f"{PACKAGE}.output"}, probe


def test_a_mount_loads_neither_the_other_modes_nor_what_only_they_use(
    zipapp: Path, tmp_path: Path
) -> None:
    # The broker is unreachable, so the run goes as far as a mount does
    # before the answer: the command line, the client and the protocol.
    env = {"FUSERMOUNT3PROXY_FDPASSING_SOCKPATH": str(tmp_path / "none.sock")}
    loaded = set(imported_modules(zipapp, "-o", "rw,fsname=x", str(tmp_path), env=env))
    assert {f"{PACKAGE}.cli", f"{PACKAGE}.client", f"{PACKAGE}.protocol"} <= loaded
    unused = {f"{PACKAGE}.{mode}" for mode in ("starter", "wait", "watcher")}
    unused |= {"subprocess", "threading", "signal", "fcntl", "random"}
    assert loaded & unused == set()


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
