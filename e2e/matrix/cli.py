"""The `python -m e2e matrix` command: progress lines, the summary table, the outputs.

    python -m e2e matrix --zipapp build/fusermount3 [--examples build/fuse-examples]
        [--json out.json] [--markdown docs/compatibility.md] [--only NAME]...

Its options are parsed in e2e/__main__.py, with the other e2e commands.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from e2e.matrix.catalogue import select
from e2e.matrix.report import summary, to_json, to_markdown
from e2e.matrix.result import failed
from e2e.matrix.runner import run_matrix

REPO = Path(__file__).resolve().parent.parent.parent


def ensure_examples(examples: Path) -> None:
    """Build the example programs if one that a required row runs is missing.

    The script is idempotent; it builds libfuse's examples and
    e2e/fs/jacobsa_flatfs.
    """
    if any(impl.missing(examples) for impl in select() if not impl.optional):
        subprocess.run(
            ["bash", str(REPO / "scripts" / "build_fuse_examples.sh"), str(examples)],
            check=True, capture_output=True,
        )  # fmt: skip


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "e2e", "matrix", *argv])


def main(
    zipapp: Path,
    examples: Path,
    *,
    only: Sequence[str] | None = None,
    json_path: Path | None = None,
    markdown_path: Path | None = None,
    argv: Sequence[str] = (),
    out: Callable[[str], None] = print,
) -> int:
    """The `python -m e2e matrix` command: progress, summary, outputs; 1 if a row failed."""
    if markdown_path is not None and only:
        out("--markdown writes the whole matrix: leave out --only")
        return 2
    ensure_examples(examples)
    out("csi-async compatibility matrix: real FUSE programs in unprivileged pods, "
        "through the fd broker.\n")  # fmt: skip
    started = time.monotonic()
    results = run_matrix(zipapp, examples, only=only, report=out)
    elapsed = time.monotonic() - started
    summary(results, out, elapsed)
    command = command_line(argv)
    if json_path is not None:
        json_path.write_text(json.dumps(to_json(results, command, elapsed), indent=2) + "\n")
        out(f"  wrote {json_path}")
    if markdown_path is not None:
        markdown_path.write_text(to_markdown(results, command, elapsed))
        out(f"  wrote {markdown_path}")
    return 1 if failed(results) else 0
