"""The package layout as a rule: each room of csi_async imports only the rooms below it.

One mount runs down a line of rooms (docs/design.md): the CSI service
(csi/) checks a request, kubelet/ parses what kubelet put into it, the
volume registry (volumes/) sets the volume up, its broker (broker/) serves
the pod's FUSE program, policy/ decides what that program may have, and
mount/ makes the syscalls. An import may go down the line, never back up,
and no two modules may import each other, even through others. The wiring
(server.py, serving.py, cli.py, config.py, __main__.py) may import any room; no
room imports the wiring.

These tests read the source with ast: nothing is imported, so a broken
rule fails here in milliseconds, naming the import and the rule it breaks.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "csi_async"
DOCS = REPO / "docs"

# The shared definition of the broker's wire protocol: the only part of the
# zipapp (fusermount3_proxy) the driver may use.
PROTOCOL = "fusermount3_proxy.protocol"
ZIPAPP = "fusermount3_proxy"
# The rooms of the line; a module outside them is one of the top-level modules.
ROOMS = ("csi", "kubelet", "volumes", "broker", "policy", "mount", "deviceplugin", "_proto")
WIRING = frozenset({"server", "serving", "cli", "config", "__main__"})
NOT_SHIPPED = ("e2e", "bench", "tests")


@dataclass(frozen=True)
class Rule:
    may_import: frozenset[str]
    why: str


_EVERY_ROOM = frozenset({*ROOMS, "logs", "metrics", "csi_async", *WIRING, PROTOCOL})

RULES: dict[str, Rule] = {
    "mount": Rule(
        frozenset({"logs"}),
        "mount/ is mechanism only: the kernel calls, each raising OSError with the "
        "kernel's errno. It decides nothing, so it needs nothing above it",
    ),
    "policy": Rule(
        frozenset({"mount", PROTOCOL}),
        "policy/ decides what pods may do from data alone: the node's settings, the "
        "mechanism's types and the one definition of the wire protocol (its -o splitter)",
    ),
    "broker": Rule(
        frozenset({"policy", "mount", "logs", "metrics", PROTOCOL}),
        "broker/ serves one volume's socket with the target it was handed; it never "
        "reaches back into the registry (volumes/), kubelet's inputs or the CSI service",
    ),
    "kubelet": Rule(
        frozenset({"logs"}),
        "kubelet/ parses what kubelet sends, once: plain functions of their input, "
        "with no mechanism and no policy",
    ),
    "volumes": Rule(
        frozenset({"kubelet", "broker", "policy", "mount", "logs", "metrics", "_proto"}),
        "volumes/ is driven by the CSI service and never calls back up into it "
        "(restore is handed a validator instead)",
    ),
    "csi": Rule(
        frozenset({"kubelet", "volumes", "policy", "logs", "metrics", "_proto", "csi_async"}),
        "csi/ checks CSI's own rules and maps errors to gRPC codes; brokers and mounts "
        "are reached only through the registry (volumes/), option rules through policy/",
    ),
    "deviceplugin": Rule(
        frozenset({"logs", "_proto"}),
        "deviceplugin/ serves kubelet's device plugin API beside the line, not on it: it "
        "hands out /dev/fuse and mounts nothing, so it needs no volume, broker, policy or "
        "mechanism, and no room of the line needs it (only the wiring starts it)",
    ),
    "_proto": Rule(frozenset(), "_proto/ is generated from proto/ and stands alone"),
    "logs": Rule(frozenset(), "logs.py is a leaf every room may use"),
    "metrics": Rule(frozenset(), "metrics.py is a leaf every room may use"),
    "csi_async": Rule(frozenset(), "the package root holds only the version"),
    **{
        name: Rule(_EVERY_ROOM, f"{name} is wiring and may use every room")
        for name in sorted(WIRING)
    },
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> str | None:
    """The room (or top-level module) a module belongs to; None outside the project."""
    parts = module.split(".")
    if parts[0] == "csi_async":
        if len(parts) == 1:
            return "csi_async"
        return parts[1]
    if module == PROTOCOL or module.startswith(PROTOCOL + "."):
        return PROTOCOL
    if parts[0] in (ZIPAPP, *NOT_SHIPPED):
        return parts[0]
    return None


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        path = MODULES[self.importer].relative_to(REPO)
        return f"{path}:{self.line} imports {self.imported}"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".")
    if MODULES[importer].name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str) -> list[Import]:
    """Every import in a module's source, each naming the most specific module it loads."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                # `from csi_async.broker import sockets` loads a module, not a name.
                candidate = f"{base}.{alias.name}"
                is_module = (
                    candidate in MODULES
                    or (REPO / ZIPAPP)
                    .joinpath(*candidate.split(".")[1:])
                    .with_suffix(".py")
                    .exists()
                )
                found.append(Import(module, candidate if is_module else base, node.lineno))
    # `from x import a, b` is one import of x, reported once.
    return sorted(set(found), key=lambda imp: (imp.line, imp.imported))


IMPORTS: dict[str, list[Import]] = {module: imports_of(module) for module in MODULES}


def test_every_module_belongs_to_a_room_with_a_rule() -> None:
    unruled = sorted(
        f"{MODULES[m].relative_to(REPO)} (room {room_of(m)!r})"
        for m in MODULES
        if room_of(m) not in RULES
    )
    assert not unruled, (
        "these modules are in no room of tests/test_layout.py's RULES; add the room "
        f"with what it may import and why: {unruled}"
    )


def test_each_room_imports_only_the_rooms_below_it() -> None:
    broken: list[str] = []
    for module, imports in IMPORTS.items():
        room = room_of(module)
        rule = RULES.get(room or "")
        if rule is None:
            continue  # reported by the test above
        for imp in imports:
            target = room_of(imp.imported)
            if target is None or target == room:
                continue
            if target in NOT_SHIPPED:
                broken.append(f"{imp}: the product never imports {target}/, which is not shipped")
            elif target not in rule.may_import:
                allowed = ", ".join(sorted(rule.may_import)) or "nothing else"
                broken.append(f"{imp}: {rule.why} (it may import {allowed})")
    assert not broken, "imports against the layout:\n" + "\n".join(broken)


def _cycles() -> list[list[str]]:
    """Strongly connected components of the import graph with more than one module."""
    graph = {
        module: sorted({imp.imported for imp in imports if imp.imported in MODULES} - {module})
        for module, imports in IMPORTS.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_no_two_modules_import_each_other_even_through_others() -> None:
    cycles = _cycles()
    described = []
    for component in cycles:
        members = set(component)
        edges = [
            str(imp)
            for module in component
            for imp in IMPORTS[module]
            if imp.imported in members and imp.imported != module
        ]
        described.append(" / ".join(component) + ":\n    " + "\n    ".join(edges))
    assert not cycles, "import cycles (break one of these imports):\n" + "\n".join(described)


# The docs as a map of the code: every project file they name exists, and
# every name they say it holds is defined in it. Two shapes name code:
#   a path, `dir/file.py`, written as seen from one of BASES (`mount/fuse.py`
#     is csi_async's, `scenarios/pod_start.py` bench's); a path whose first
#     folder is in none of them (`asyncio/events.py`) is not ours;
#   a path with names, `file.py: name`, `Class.method` (the tables of
#     docs/security.md) or `tests/test_x.py::test_y`, `::test_z` (the rest of
#     the paragraph names more tests of that file). Here a bare `file.py` is
#     allowed too, seen from BASES like a path.
# A section that reports what was measured at an older commit keeps that
# commit's names (a profile's file:line is what it was then); it says so with
# AS_OF_MARKER, which covers the rest of the section it stands in.
DOC_PAGES = (REPO / "README.md", *sorted(DOCS.glob("*.md")))
BASES = (PACKAGE, REPO / ZIPAPP, *(REPO / name for name in NOT_SHIPPED), REPO / "scripts", REPO)
AS_OF_MARKER = re.compile(r"<!-- names as of commit [0-9a-f]{7,40}\b[^>]*-->")
_HEADING = re.compile(r"(#{1,6}) ")
_PY = r"(?<![\w/.-])(?:\.\./)*((?:[A-Za-z_][\w.-]*/)*[A-Za-z_][\w-]*\.py)(?![\w/])"
_PATH = re.compile(_PY)
_NAMES = re.compile(rf"`{_PY}(: |::)([A-Za-z_][\w.]*)`")
_MORE_NAMES = re.compile(r", `([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)`")
_MORE_TESTS = re.compile(r"`::([A-Za-z_]\w*)`")


@dataclass(frozen=True)
class DocReference:
    page: Path
    line: int
    path: str
    names: tuple[str, ...] = ()
    separator: str = ": "  # or "::" for tests

    def __str__(self) -> str:
        named = self.separator + ", ".join(self.names) if self.names else ""
        return f"{self.page.relative_to(REPO)}:{self.line}: {self.path}{named}"


def _lines_to_check(page: Path) -> list[tuple[int, str]]:
    """The page's lines, without the sections marked as naming an older commit's code."""
    kept: list[tuple[int, str]] = []
    level, skip_to_level, fenced = 0, None, False
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if skip_to_level is not None and level <= skip_to_level:
                skip_to_level = None
        if AS_OF_MARKER.search(line):
            skip_to_level = level
        if skip_to_level is None:
            kept.append((number, line))
    return kept


def _references(page: Path) -> list[DocReference]:
    found: list[DocReference] = []
    tests_of: str | None = None  # the file a paragraph's `::test_x` belong to
    for number, line in _lines_to_check(page):
        if not line.strip():
            tests_of = None
        with_names = list(_NAMES.finditer(line))
        found += [
            DocReference(page, number, m[1])
            for m in _PATH.finditer(line)
            if "/" in m[1] and not any(n.start(1) == m.start(1) for n in with_names)
        ]
        for m in with_names:
            names = [m[3]]
            if m[2] == "::":
                tests_of = m[1]
            else:
                rest = line[m.end() :]
                while more := _MORE_NAMES.match(rest):
                    names.append(more[1])
                    rest = rest[more.end() :]
            found.append(DocReference(page, number, m[1], tuple(names), m[2]))
        if tests_of is not None:
            found += [
                DocReference(page, number, tests_of, (m[1],), "::")
                for m in _MORE_TESTS.finditer(line)
            ]
    return found


def _is_ours(path: str) -> bool:
    first = path.split("/", 1)[0]
    return "/" not in path or any((base / first).is_dir() for base in BASES)


def _defined_names(path: Path) -> frozenset[str]:
    """What a module defines: its functions, classes and assignments, and those
    of its classes, both as `Class.name` and as the bare name."""
    names: set[str] = set()

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            targets: list[ast.expr] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.update({prefix + node.name, node.name})
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.If | ast.Try):
                visit([*node.body, *node.orelse, *getattr(node, "finalbody", [])], prefix)
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names.update({prefix + name.id, name.id})

    visit(ast.parse(path.read_text(), filename=str(path)).body, "")
    return frozenset(names)


def _broken(ref: DocReference) -> str | None:
    """Why a reference no longer holds, or None if it does."""
    files = [base / ref.path for base in BASES if (base / ref.path).is_file()]
    if not files:
        return f"{ref}: no such file"
    if not ref.names:
        return None
    for file in files:
        missing = [name for name in ref.names if name not in _defined_names(file)]
        if not missing:
            return None
    where = ", ".join(str(file.relative_to(REPO)) for file in files)
    return f"{ref}: {', '.join(missing)} not defined in {where}"


def test_the_docs_name_only_files_and_definitions_that_exist() -> None:
    refs = [ref for page in DOC_PAGES for ref in _references(page) if _is_ours(ref.path)]
    design = [ref for ref in refs if ref.page.name == "design.md"]
    assert design, "docs/design.md names no module at all"
    assert any(ref.names for ref in refs), "the docs name no definition at all"
    broken = [why for ref in refs if (why := _broken(ref)) is not None]
    assert not broken, (
        "the docs name code that is not there (doc:line: reference), fix the doc or, for "
        "what was measured at an older commit, mark its section with "
        "<!-- names as of commit SHA -->:\n" + "\n".join(broken)
    )


@pytest.mark.parametrize("room", [r for r in ROOMS if r != "_proto"])
def test_every_room_is_walked_in_the_design(room: str) -> None:
    # A newcomer reads docs/design.md's drawing first: each room is on it.
    design = (DOCS / "design.md").read_text()
    assert f"csi_async/{room}/" in design, f"docs/design.md never shows csi_async/{room}/"
