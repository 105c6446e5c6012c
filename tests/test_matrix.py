"""The FUSE compatibility matrix passes, and docs/compatibility.md is what it generates.

The whole matrix (e2e/matrix/: every FUSE program of catalogue.py in every
mode it supports, on one simulated node, and every program that cannot
work, which must exit without reaching the broker) runs once for this
module, in-process and with the same code as `python -m e2e matrix`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.matrix.catalogue import CANNOT_WORK, IMPLEMENTATIONS, row_names, select
from e2e.matrix.report import CANNOT_WORK_HEADING, comparable, to_markdown
from e2e.matrix.result import FAIL, NOT_RUN, PASS, REFUSED, Result
from e2e.matrix.row import PROXY, STARTER, CannotWork, Implementation
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


@pytest.mark.parametrize("item", CANNOT_WORK, ids=lambda item: item.name)
def test_every_program_that_cannot_work_exits_without_reaching_the_broker(
    run: tuple[list[Result], str], item: CannotWork
) -> None:
    results, progress = run
    rows = [r for r in results if r.name == item.name]
    assert len(rows) == 1, progress
    assert rows[0].status == REFUSED, (
        f"{item.name}: {rows[0].status} at {rows[0].failed_check}: {rows[0].reason}\n{progress}"
    )
    assert "without asking the broker" in rows[0].details["refused"]


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
    names = row_names()
    assert len(names) == len(set(names)), names
    assert [impl.name for impl in select(["hello", CANNOT_WORK[0].name])] == ["hello"]
    with pytest.raises(ValueError, match="unknown rows"):
        select(["no-such-program"])
    for impl in IMPLEMENTATIONS:
        if STARTER in impl.modes:
            assert any("{mnt}" in arg for arg in impl.argv), impl.name


def test_programs_that_cannot_work_get_their_own_section_and_no_results_row() -> None:
    refused = Result(CANNOT_WORK[0].name, "-", "1.0", PROXY, REFUSED, reason="it never asks")
    markdown = to_markdown([refused], "one command", 1.0)
    facts = comparable(markdown)
    assert not [fact for fact in facts if fact[0] == "row"]
    assert (CANNOT_WORK_HEADING, f"- **{refused.name}**: cannot work: it never asks.") in facts
    newer = Result(refused.name, "-", "2.0", PROXY, REFUSED, reason="it never asks")
    assert comparable(to_markdown([newer], "another command", 9.0)) == facts
