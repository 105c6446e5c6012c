"""bench/run.py runs end to end and reports what it promises (not timing goals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmarks make real mounts")

STAT_KEYS = {"id", "key", "name", "unit", "median", "p90", "p99", "n", "goal", "status"}


def test_smoke_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--only", "P1,P2",
         "--json", str(results)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr

    header = next(line for line in run.stdout.splitlines() if line.startswith("| ID "))
    for column in ("median", "p90", "p99", "N", "goal", "result"):
        assert f" {column} " in header

    report = json.loads(results.read_text())
    assert report["mode"] == "smoke"
    assert report["only"] == ["P1", "P2"]
    assert not report["errors"]
    assert {"cpus", "kernel", "driver_python", "helper_python"} <= report["machine"].keys()
    assert report["cleanup"]["mounts_left"] == []
    assert report["cleanup"]["workdir_removed"]

    rows = {row["key"]: row for row in report["results"]}
    expected = {
        "P1.floor", "P1.zipapp_fd", "P1.zipapp_exit", "P1.native_fd", "P1.native_exit",
        "P2.publish_new", "P2.unpublish_new", "P2.publish_reused", "P2.unpublish_reused",
    }  # fmt: skip
    assert expected <= rows.keys()
    for key in expected:
        row = rows[key]
        assert row.keys() >= STAT_KEYS, key
        assert row["n"] >= 1, key
        assert row["median"] is not None and row["median"] > 0, key
        assert row["p90"] <= row["p99"], key
    assert rows["P1.zipapp_exit"]["status"] in ("PASS", "MISS")
    assert rows["P2.publish_new"]["status"] in ("PASS", "MISS")
    # Each row also appears in the printed table.
    assert sum(line.startswith("| P1 ") for line in run.stdout.splitlines()) >= 5
    assert sum(line.startswith("| P2 ") for line in run.stdout.splitlines()) >= 4


def test_pod_start_to_first_read_runs_in_quick_mode_and_reports_a_ratio(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    name = "pod_start_to_first_read"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only", name,
         "--json", str(results)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr

    report = json.loads(results.read_text())
    assert report["mode"] == "quick"
    assert report["only"] == [name]
    assert not report["errors"]
    assert report["cleanup"]["mounts_left"] == []

    rows = {row["key"]: row for row in report["results"]}
    pods = [rows[f"{name}.fuse"], rows[f"{name}.empty_dir"]]
    for row in pods:
        assert row.keys() >= STAT_KEYS, row["key"]
        assert row["n"] == report["sizes"]["pod_start_rounds"], row["key"]
        assert row["median"] > 0 and row["p90"] <= row["p99"], row["key"]
    ratio = rows[f"{name}.ratio"]
    assert ratio["goal"] == "≤ 1.2"
    assert ratio["status"] in ("PASS", "MISS")
    assert ratio["median"] == pytest.approx(pods[0]["median"] / pods[1]["median"])
    assert ratio["status"] == ("PASS" if ratio["median"] <= 1.2 else "MISS")
    # The consumer never had to retry: the startupProbe gated it.
    assert ratio["extra"]["failed_reads"] == []
    table = [line for line in run.stdout.splitlines() if line.startswith(f"| {name} ")]
    assert any("ratio of the medians A/B" in line for line in table)
