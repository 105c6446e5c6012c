"""What a run prints and writes: the table, the notes and profiles, the JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.harness import Measurement

# Bumped when the JSON's layout changes.
SCHEMA = 1


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("MB/s",) or abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(rows: list[Measurement], errors: dict[str, str]) -> str:
    """A Markdown table: one line per measurement, then one per scenario that failed."""
    header = ["ID", "measurement", "unit", "median", "p90", "p99", "N", "goal", "result"]
    lines = []
    for row in rows:
        st = row.stats()
        lines.append(
            [
                row.id,
                row.name,
                row.unit,
                fmt(st["median"], row.unit),
                fmt(st["p90"], row.unit),
                fmt(st["p99"], row.unit),
                str(len(row.samples)),
                row.goal,
                row.status,
            ]
        )
    for pid, message in errors.items():
        lines.append([pid, f"ERROR: {message}", "", "", "", "", "", "", "ERROR"])
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    numeric = {3, 4, 5, 6}

    def render(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
                for i, c in enumerate(cells)
            )
            + " |"
        )

    out = [render(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines]
    return "\n".join(out)


def render_notes(rows: list[Measurement]) -> str:
    """The rows' notes, one line each."""
    return "\n".join(f"  {row.key}: {row.note}" for row in rows if row.note)


def render_profiles(profiles: dict[str, dict[str, Any]]) -> str:
    """--profile's summaries: the zipapp's imports, the driver's busiest frames."""
    out: list[str] = []
    for label, summary in profiles.items():
        if "self_ms_beyond_floor" in summary:
            out.append(
                f"\n{label}: {summary['modules_beyond_floor']} modules beyond the bare "
                f"interpreter's, {summary['self_ms_beyond_floor']} ms self time under "
                f"-X importtime ({summary['zipapp_own_self_ms']} ms in fusermount3_proxy.*, "
                "compiled from source by zipimport); top (ms self / cumulative):"
            )
            for name, self_ms, cumulative_ms in summary["self_ms"][:12]:
                out.append(f"  {self_ms:6.2f} {cumulative_ms:7.2f}  {name}")
            continue
        out.append(
            f"\npy-spy, driver, {label}: {summary['busy_samples']} busy samples "
            f"(+{summary['idle_samples']} waiting); top frames by self / by inclusive share:"
        )
        for name, _n, pct in summary["self"][:6]:
            out.append(f"  self {pct:5.1f}%  {name}")
        for name, _n, pct in summary["inclusive"][:8]:
            out.append(f"  incl {pct:5.1f}%  {name}")
    return "\n".join(out)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, **report}, indent=1, ensure_ascii=False) + "\n")
