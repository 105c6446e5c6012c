"""One minute of 50 pods mounting, reading and unmounting at once (e2e/soak.py).

`nox -s soak` runs the same for 10 minutes. run_soak raises, with its
summary, on any failed cycle or anything left behind: driver fds or threads
above the warm-up baseline, mounts below the kubelet root, sockets or
records in the state dir, pod directories or cgroups, stray processes.
"""

from __future__ import annotations

from pathlib import Path

from e2e.soak import ENDINGS, run_soak

DURATION = 60.0
PARALLEL = 50


def test_fifty_pods_for_a_minute_fail_nothing_and_leave_nothing(
    zipapp: Path, fuse_examples_on_host: Path
) -> None:
    report = run_soak(zipapp, fuse_examples_on_host, DURATION, PARALLEL)
    assert report.failures == [] and report.leftovers == []
    # Every pod got through at least one whole cycle, every way of ending
    # a mount was exercised, and the driver really was under load.
    assert report.cycles >= PARALLEL
    assert set(report.endings) == set(ENDINGS)
    assert report.peak_fds > report.baseline_fds + PARALLEL
    assert report.final_fds <= report.baseline_fds
    assert report.final_threads <= report.baseline_threads
