"""`python -m bench.run` runs every scenario end to end and reports what it promises.

Not timing goals: each scenario module (bench/scenarios/) runs once at tiny
N, and its rows must have samples, stats and a verdict where there is a goal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.agent_client import Agent
from bench.run import parse_only
from bench.scenarios import MEASUREMENTS, SCENARIOS
from bench.sizes import SMOKE
from bench.testbed import Env

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmarks make real mounts")

STAT_KEYS = {"id", "key", "name", "unit", "median", "p90", "p99", "n", "goal", "status"}


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The documented command, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def check_rows(report: dict[str, Any], keys: set[str]) -> dict[str, dict[str, Any]]:
    rows = {row["key"]: row for row in report["results"]}
    assert keys <= rows.keys()
    for key in keys:
        row = rows[key]
        assert row.keys() >= STAT_KEYS, key
        assert row["n"] >= 1, key
        assert row["median"] is not None and row["median"] > 0, key
        assert row["p90"] <= row["p99"], key
    return rows


def test_smoke_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = run_bench("--smoke", "--only", "P1,P2", "--json", str(results), timeout=300)
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

    expected = {
        "P1.floor", "P1.zipapp_fd", "P1.zipapp_exit", "P1.native_fd", "P1.native_exit",
        "P2.publish_new", "P2.unpublish_new", "P2.publish_reused", "P2.unpublish_reused",
    }  # fmt: skip
    rows = check_rows(report, expected)
    assert rows["P1.zipapp_exit"]["status"] in ("PASS", "MISS")
    assert rows["P2.publish_new"]["status"] in ("PASS", "MISS")
    # Each row also appears in the printed table.
    assert sum(line.startswith("| P1 ") for line in run.stdout.splitlines()) >= 5
    assert sum(line.startswith("| P2 ") for line in run.stdout.splitlines()) >= 4


def test_pod_start_to_first_read_runs_in_quick_mode_and_reports_a_ratio(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    name = "pod_start_to_first_read"
    run = run_bench("--quick", "--only", name, "--json", str(results), timeout=600)
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


def test_burst_many_volumes_and_throughput_run_in_smoke_mode(tmp_path: Path) -> None:
    """pod_burst (P3), many_volumes (P4, P6) and read_throughput (P5), named by module."""
    results = tmp_path / "results.json"
    only = "pod_burst,many_volumes,read_throughput"
    run = run_bench("--smoke", "--only", only, "--json", str(results), timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr

    report = json.loads(results.read_text())
    assert report["only"] == ["P3", "P4", "P6", "P5"]
    assert not report["errors"]
    assert report["cleanup"]["mounts_left"] == []
    rows = check_rows(
        report,
        {"P3.wall", "P3.to_mounted", "P3.publish", "P4.idle", "P4.published", "P4.live",
         "P4.hwm", "P6.mount", "P6.read", "P5.broker", "P5.native", "P5.ratio"},
    )  # fmt: skip
    # Every program mounted and served: the verdicts that are not timings.
    assert rows["P3.wall"]["status"] == "PASS", rows["P3.wall"]["extra"]
    assert rows["P6.mount"]["status"] == "PASS", rows["P6.mount"]["extra"]
    assert rows["P6.mount"]["n"] == report["sizes"]["p46_volumes"]
    assert rows["P5.ratio"]["status"] in ("PASS", "MISS")


def test_only_takes_measurement_ids_and_scenario_names() -> None:
    assert parse_only("p1, P2") == ["P1", "P2"]
    assert parse_only("many_volumes,P4") == ["P4", "P6"]
    assert parse_only("pod_start") == ["pod_start_to_first_read"]
    assert parse_only("P7") is None
    every = parse_only(",".join(s.name for s in SCENARIOS))
    assert every is not None and sorted(every) == sorted(MEASUREMENTS)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_agent_programs_run_as_nobody_without_groups_or_capabilities(tmp_path: Path) -> None:
    """What the agent starts (hello, passthrough, readers) runs as 65534 with nothing else,
    but may still run the setuid fusermount3 (the native baseline): no no_new_privs, and
    the bounding set is left alone."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = Env(workdir, Path("/nonexistent"), SMOKE, None)
    with Agent(env, "privileges") as agent:
        pid = agent.call("spawn", key="sleep", argv=["sleep", "1000"])["pid"]
        deadline = time.monotonic() + 10
        # Until setpriv has exec'd the program.
        while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        status = proc_status(pid)
        agent.call("kill_all")
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "0"
    assert int(status["CapBnd"], 16) == int(proc_status(os.getpid())["CapBnd"], 16)
