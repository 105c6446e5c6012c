"""The matrix's outputs: the summary table, the JSON, and docs/compatibility.md, and its check.

to_markdown renders docs/compatibility.md; comparable extracts what the
committed document and a fresh run must agree on (tests/test_matrix.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from e2e.matrix.catalogue import CANNOT_WORK, IMPLEMENTATIONS
from e2e.matrix.result import CHECKS, FAIL, NOT_RUN, PASS, REFUSED, Result, failed
from e2e.matrix.row import DATA, PROXY, READER_UID


def machine() -> dict[str, str]:
    """What the matrix ran on."""
    os_name = platform.system()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.partition("=")[2].strip('"')
    with contextlib.suppress(OSError):
        os_name += f" ({Path('/etc/debian_version').read_text().strip()})"
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    return {
        "os": os_name,
        "kernel": f"Linux {platform.release()} {platform.machine()}",
        "cpus": str(os.cpu_count() or "?"),
        "memory": memory,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }


def to_json(results: Sequence[Result], command: str, elapsed: float) -> dict[str, Any]:
    return {
        "command": command,
        "machine": machine(),
        "elapsed_seconds": round(elapsed, 3),
        "libraries": {impl.library.name: list(impl.library.notes) for impl in IMPLEMENTATIONS},
        "results": [asdict(r) | {"total": r.total} for r in results],
    }


def summary(results: Sequence[Result], out: Callable[[str], None], elapsed: float) -> None:
    """The table printed at the end of a run, with timings in ms."""
    headers = ["filesystem", "mode", "version", "library", *CHECKS, "total", "result"]
    rows = []
    for r in results:
        times = [f"{r.timings[c] * 1000:.0f}" if c in r.timings else "-" for c in CHECKS]
        outcome = r.status if r.status != FAIL else f"FAIL at {r.failed_check}"
        rows.append([r.name, r.mode, r.version, r.library, *times, f"{r.total * 1000:.0f}",
                     outcome])  # fmt: skip
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    numeric = {headers.index(c) for c in (*CHECKS, "total")}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out("\nSummary (times in ms)")
    out("  " + line(headers))
    for row in rows:
        out("  " + line(row))
    passed = sum(r.status in (PASS, REFUSED) for r in results)
    skipped = sum(r.status == NOT_RUN for r in results)
    out(f"\n  {passed} of {len(results)} passed, {len(failed(results))} failed, "
        f"{skipped} not run, in {elapsed:.1f} s")  # fmt: skip


def command_line(name: str) -> str:
    """A row's proxy-mode command line as a pod spec would write it.

    The mountpoint is the volume's path in the container; libfuse's examples
    and e2e/fs's scripts are shown by name; a value the row's setup supplies
    stays a placeholder, e.g. {bucket}.
    """
    (impl,) = [i for i in IMPLEMENTATIONS if i.name == name]
    words = [
        word.replace("{mnt}", DATA).replace("{examples}/", "").replace("{fs}/", "")
        for word in impl.argv
    ]
    return " ".join(words)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


MARKDOWN_TITLE = "# FUSE compatibility matrix"
RESULTS_HEADING = "## Results"
CANNOT_WORK_HEADING = "## Programs that cannot work"
COMMAND_LINES_HEADING = "## Command lines with and without the device plugin"
RESULTS_HEADER = (
    "| Filesystem | Version | FUSE library | Mode | Result | Mount removed after SIGKILL by "
    "| Notes |"
)


def to_markdown(results: Sequence[Result], command: str, elapsed: float) -> str:
    info = machine()
    libraries: dict[str, tuple[str, ...]] = {}
    library_of = {impl.name: impl.library for impl in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS:
        libraries.setdefault(impl.library.name, impl.library.notes)
    cannot_work = {item.name for item in CANNOT_WORK}
    ran = [r for r in results if r.status != NOT_RUN and r.name not in cannot_work]
    refused = [r for r in results if r.name in cannot_work and r.status != NOT_RUN]
    not_run = [r for r in results if r.status == NOT_RUN]
    lines = [
        "<!-- GENERATED FILE: do not edit by hand. Regenerate it with the command below;",
        "     tests/test_matrix.py fails when it no longer matches e2e/matrix/catalogue.py. -->",
        MARKDOWN_TITLE,
        "",
        f"Generated by `{command}` on {info['date']}, on {info['os']}, {info['kernel']}, "
        f"{info['cpus']} CPUs, {info['memory']} of memory, Python {info['python']}; the "
        f"whole run took {elapsed:.0f} s. The rows are declared in `e2e/matrix/catalogue.py`.",
        "",
        "Each program runs unmodified, as uid 65534 with no capabilities, in a sandboxed "
        '"pod" of a simulated node whose `/usr/bin/fusermount3` (and `fusermount`, and '
        "mergerfs's `mergerfs-fusermount`) is the csi-async zipapp, in native mode (the "
        "broker socket at the zipapp's default path). "
        "**proxy** mode runs the program as usual; **starter** mode runs "
        "`fusermount3 --start -- PROGRAM ... /dev/fd/N`. In proxy mode the program's "
        "container has exactly the device node that csi-async's device plugin answers "
        "Allocate with (`/dev/fuse`, given to the pod's user as containerd's "
        "`device_ownership_from_security_context` does); in starter mode it has no "
        "`/dev/fuse` at all. The checks, in order:",
        "",
        "- **mount**: the program mounts the volume (through the broker, `nosuid,nodev`, "
        "owned by uid 65534);",
        f"- **read**: a second container of the pod, as uid {READER_UID}, reads a known file "
        "through mount propagation;",
        "- **write** (writable filesystems): that container writes a file, reads it back, "
        "and the file reaches the backing store (directory, bucket, cipher directory; an "
        "archive once the program has unmounted);",
        "- **unmount**: `fusermount3 -u` in the pod removes the mount and the program exits;",
        "- **kill**: a fresh instance is killed with SIGKILL and its mount goes away anyway: "
        "the broker watches the daemon's process and detaches its dead mount; in starter "
        "mode the starter, which outlives the program, unmounts first; with `auto_unmount` "
        "the zipapp's watcher would.",
        "",
        RESULTS_HEADING,
        "",
        RESULTS_HEADER,
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ran:
        lines.append(
            f"| {_cell(r.name)} | {_cell(r.version)} | {_cell(r.library)} | {r.mode} | "
            f"{_cell(r.cell)} | {r.killed_cleanup or '-'} | {_cell('; '.join(r.notes))} |"
        )
    lines += ["", "## Notes by FUSE library", ""]
    for name, notes in libraries.items():
        lines.append(f"- **{name}**: {'; '.join(notes)}.")
    proxy_rows = [r for r in ran if r.mode == PROXY]
    lines += ["", COMMAND_LINES_HEADING, "",
              "With the device plugin (the FUSE container asks for "
              "`resources.limits: {fuse.csi-async.dev/fuse: 1}`), each program runs the "
              "command line of its proxy row, unchanged: the matrix runs it so. Without the "
              "plugin a pod has no /dev/fuse, and programs whose library opens it first need "
              "a change:", "",
              "| Filesystem | FUSE library | command line (proxy row) "
              "| without the device plugin |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for r in proxy_rows:
        lines.append(
            f"| {_cell(r.name)} | {_cell(library_of[r.name].name)} | "
            f"`{_cell(command_line(r.name))}` | {_cell(library_of[r.name].without_device_plugin)} |"
        )
    if refused:
        lines += ["", CANNOT_WORK_HEADING, "",
                  "The matrix runs each of these too, as a pod would, and checks that it exits "
                  "without mounting and without a request to the broker.", ""]  # fmt: skip
        for r in refused:
            lines.append(f"- **{r.name}** ({r.version}): {_cell(r.cell)}.")
    if not_run:
        lines += ["", "## Not run here", ""]
        for r in not_run:
            lines.append(f"- **{r.name}** ({r.library.split()[0]}): {r.reason}.")
    lines += ["", "## Timings (ms)", "", f"| Filesystem | Mode | {' | '.join(CHECKS)} | total |",
              "| --- | --- |" + " ---: |" * (len(CHECKS) + 1)]  # fmt: skip
    for r in ran:
        times = [f"{r.timings[c] * 1000:.0f}" if c in r.timings else "-" for c in CHECKS]
        lines.append(f"| {r.name} | {r.mode} | {' | '.join(times)} | {r.total * 1000:.0f} |")
    return "\n".join(lines) + "\n"


def _is_fact_line(section: str, line: str) -> bool:
    if section == COMMAND_LINES_HEADING:
        return line.startswith("| ") and "---" not in line
    return section in ("## Notes by FUSE library", "## Not run here") and line.startswith("- ")


def comparable(markdown: str) -> list[tuple[str, ...]]:
    """What must match between the committed document and a fresh run.

    The rows, modes, library names, results and notes, and the library,
    cannot-work and not-run sections; not the versions, the timings or the
    machine.
    """
    facts: list[tuple[str, ...]] = []
    section = ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line
            continue
        if section == RESULTS_HEADING and line.startswith("| ") and line != RESULTS_HEADER:
            if line.startswith("| ---"):
                continue
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            name, _version, library, mode, result, killed, notes = cells
            facts.append(("row", name, library.split()[0], mode, result, killed, notes))
        elif section == CANNOT_WORK_HEADING and line.startswith("- "):
            # Not the version in parentheses.
            facts.append((section, re.sub(r" \([^)]*\):", ":", line, count=1)))
        elif _is_fact_line(section, line):
            facts.append((section, line))
    return facts
