"""csi-async benchmarks: mount latency, CSI RPC latency, bursts, memory, data plane, pod start.

    .venv/bin/python -m bench.run [--quick | --smoke] [--only P1,P2] [--json FILE] [--profile]

Run from the repository's root, as root, on a Linux node with FUSE (the same
prerequisites as scripts/test.sh). This module is only the command line: it
picks the scenarios (bench/scenarios/, one module per scenario), runs each on
its own simulated node (bench/testbed.py), prints the table (median, p90,
p99, N and the goal per measurement; bench/report.py) and writes the same as
JSON. See docs/performance.md for the method behind each measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import report
from bench.harness import Measurement
from bench.machine import loadavg, machine_info, raise_nofile
from bench.scenarios import MEASUREMENTS, SCENARIOS, Scenario
from bench.sizes import FULL, QUICK, SMOKE, field_names
from bench.testbed import REPO, Env, build_artifacts, fuse_mounts_below

RESULTS_DIR = REPO / "bench" / "results"
PROG = "python -m bench.run"


def parse_only(value: str) -> list[str] | None:
    """Measurement IDs (P1, ...) or scenario names (pod_burst, ...) as IDs; None if unknown."""
    canonical = {m.lower(): [m] for m in MEASUREMENTS}
    canonical |= {s.name.lower(): list(s.ids) for s in SCENARIOS}
    ids: list[str] = []
    for item in (p.strip() for p in value.split(",")):
        if not item:
            continue
        if item.lower() not in canonical:
            return None
        ids += [i for i in canonical[item.lower()] if i not in ids]
    return ids


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller N everywhere (~2 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny N, for the test suite")
    scenarios = "; ".join(f"{s.name} ({', '.join(s.ids)})" for s in SCENARIOS)
    parser.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help="comma-separated measurements or scenarios to run, of "
        f"{', '.join(MEASUREMENTS)} or {scenarios} (default: all)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default: bench/results/<date>.json)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record the driver with py-spy during each measurement "
        "(timings then include its overhead)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs for debugging")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=N",
        help="override one size of the chosen mode, e.g. --set p46_volumes=300 "
        f"(fields: {', '.join(field_names())})",
    )
    args = parser.parse_args(argv)
    only = parse_only(args.only)
    if only is None:
        known = [p for p in args.only.split(",") if parse_only(p) is None]
        parser.error(
            f"unknown measurement(s): {', '.join(p.strip() for p in known)} "
            f"(known: {', '.join(MEASUREMENTS)}, or a scenario: "
            f"{', '.join(s.name for s in SCENARIOS)})"
        )
    args.only = only
    overrides: dict[str, int] = {}
    names = set(field_names())
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in names or not value.isdigit() or int(value) < 1:
            parser.error(f"--set {item}: expected FIELD=N with FIELD one of {sorted(names)}")
        overrides[name] = int(value)
    args.overrides = overrides
    return args


def run_scenario(scenario: Scenario, ids: set[str], env: Env) -> list[Measurement]:
    """One scenario, with the load average before and after it on every row."""
    started = time.perf_counter()
    load_before = loadavg()
    rows = scenario.run(env, ids)
    load = {
        "before": load_before,
        "after": loadavg(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for row in rows:
        row.extra.setdefault("loadavg_1m", load)
    print(f"{load['seconds']} s (load average {load_before} -> {load['after']})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        sys.stderr.write(f"{PROG}: --profile needs py-spy: .venv/bin/pip install py-spy\n")
        return 2
    if os.geteuid() != 0:
        sys.stderr.write(f"{PROG}: run as root (it makes real FUSE mounts)\n")
        return 2
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    sizes = dataclasses.replace(sizes, **args.overrides)
    started = time.time()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    json_path = args.json or RESULTS_DIR / f"{stamp}.json"
    nofile = raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="csi-async-bench-"))
    workdir.chmod(0o755)
    profile_dir = None
    if args.profile:
        profile_dir = json_path.parent / f"{json_path.stem}-profiles"
        profile_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Measurement] = []
    errors: dict[str, str] = {}
    env = Env(workdir, build_artifacts(workdir), sizes, profile_dir)
    machine = machine_info()
    print(
        f"csi-async bench ({sizes.mode}): {machine['cpus']} CPUs {machine['cpu_model']}, "
        f"kernel {machine['kernel']}, Python {machine['driver_python']} (driver) / "
        f"{machine['helper_python']} (helper), RLIMIT_NOFILE {nofile[0]}",
        flush=True,
    )
    try:
        for scenario in SCENARIOS:
            ids = set(scenario.ids) & set(args.only)
            if not ids:
                continue
            label = "+".join(sorted(ids))
            print(f"{label} ...", end=" ", flush=True)
            t = time.perf_counter()
            try:
                rows += run_scenario(scenario, ids, env)
            except Exception as err:
                errors[label] = (
                    f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                )
                print(f"failed after {time.perf_counter() - t:.1f} s", flush=True)
                traceback.print_exc()
    finally:
        own = fuse_mounts_below(workdir, *env.kubelet_roots)
        if not own and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    cleanup = {
        "mounts_left": own,
        "workdir_removed": not workdir.exists(),
        "kubelet_roots_removed": not any(r.exists() for r in env.kubelet_roots),
    }
    table = report.render_table(rows, errors)
    print()
    print(table)
    for text in (report.render_notes(rows), report.render_profiles(env.profiles)):
        if text:
            print(text)
    duration_s = round(time.time() - started, 1)
    report.write_json(
        json_path,
        {
            "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
            "duration_s": duration_s,
            "mode": sizes.mode,
            "sizes": sizes.__dict__,
            "only": args.only,
            "machine": machine,
            "rlimit_nofile": list(nofile),
            "results": [row.to_json() for row in rows],
            "errors": errors,
            "profiles": env.profiles,
            "cleanup": cleanup,
            "table": table,
        },
    )
    print(f"\nresults: {json_path}   ({duration_s} s)")
    if own:
        print(f"WARNING: mounts left behind: {own}", file=sys.stderr)
    return 1 if errors or own else 0


if __name__ == "__main__":
    sys.exit(main())
