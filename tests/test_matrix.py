"""The FUSE compatibility matrix passes, and docs/compatibility.md is what it generates.

The whole matrix (e2e/matrix/: every FUSE program of catalogue.py in every
mode it supports, on one simulated node) runs once for this module,
in-process and with the same code as `python -m e2e matrix`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.matrix.catalogue import IMPLEMENTATIONS
from e2e.matrix.report import comparable, to_markdown
from e2e.matrix.result import FAIL, NOT_RUN, PASS, Result
from e2e.matrix.row import PROXY, STARTER, Implementation
from e2e.matrix.runner import run_matrix

DOC = Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"
REGENERATE = (
    ".venv/bin/python -m e2e matrix --zipapp build/fusermount3 --markdown docs/compatibility.md"
)


@pytest.fixture(scope="module")
def run(zipapp: Path, fuse_examples_on_host: Path) -> tuple[list[Result], str]:
    """Every result, and the progress lines (to explain a failure)."""
    progress: list[str] = []
    results = run_matrix(zipapp, fuse_examples_on_host, report=progress.append)
    return results, "\n".join(progress)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda impl: impl.name)
def test_every_row_passes_in_every_mode_it_supports(
    run: tuple[list[Result], str], impl: Implementation
) -> None:
    results, progress = run
    rows = [r for r in results if r.name == impl.name]
    if impl.optional and [r.status for r in rows] == [NOT_RUN]:
        # An optional program this machine cannot build (passthrough_hp on
        # Debian 12) must say why in the generated table; that is all.
        assert rows[0].reason
        return
    assert [r.mode for r in rows] == list(impl.modes)
    for r in rows:
        assert r.status == PASS, (
            f"{r.name} in {r.mode} mode failed at {r.failed_check}: {r.reason}\n{progress}"
        )
        expected = ["mount", "read", *(["write"] if impl.writable else []), "unmount", "kill"]
        assert list(r.timings) == expected
        assert r.killed_cleanup == ("starter" if r.mode == STARTER else "broker")


def test_docs_compatibility_md_is_up_to_date(run: tuple[list[Result], str]) -> None:
    results, _ = run
    committed = DOC.read_text()
    assert committed.startswith("<!-- GENERATED FILE")
    fresh = to_markdown(results, REGENERATE, 0.0)
    assert comparable(committed) == comparable(fresh), (
        f"{DOC} no longer matches the matrix; regenerate it: {REGENERATE}"
    )


def test_the_comparison_ignores_timings_versions_and_the_machine() -> None:
    def result(seconds: float, version: str, status: str = PASS) -> Result:
        return Result(
            "hello", f"libfuse3 {version}", version, PROXY, status,
            failed_check=None if status == PASS else "read", reason="boom",
            timings={"mount": seconds, "read": seconds}, notes=["a note"],
            killed_cleanup="broker",
        )  # fmt: skip

    one = to_markdown([result(0.1, "3.14.0")], "one command", 10.0)
    other = to_markdown([result(0.9, "3.16.2")], "another command", 99.0)
    assert one != other
    assert comparable(one) == comparable(other)
    assert comparable(one)[0][:4] == ("row", "hello", "libfuse3", "proxy")
    failing = to_markdown([result(0.1, "3.14.0", FAIL)], "one command", 10.0)
    assert comparable(one) != comparable(failing)


def test_the_catalogue_names_each_row_once_and_starter_rows_take_the_fd_mountpoint() -> None:
    # --only and select() look rows up by name; a starter-mode row must leave
    # "{mnt}" to the runner, which turns it into the starter's /dev/fd/N.
    names = [impl.name for impl in IMPLEMENTATIONS]
    assert len(names) == len(set(names)), names
    for impl in IMPLEMENTATIONS:
        if STARTER in impl.modes:
            assert any("{mnt}" in arg for arg in impl.argv), impl.name
