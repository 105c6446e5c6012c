"""How big each scenario runs: the full run, --quick, --smoke (the test suite's).

One flat record, so that `--set FIELD=N` names a field the same way in every
mode; each field's prefix is the measurement ID it sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    mode: str
    # P1, scenarios/helper_mount_latency.py: timed mounts per helper, warm-up mounts
    p1_n: int
    p1_warmup: int
    # P2, scenarios/publish_unpublish.py: publish+unpublish pairs per kind of channel
    p2_n: int
    # P3, scenarios/pod_burst.py: pods started at once
    p3_burst: int
    # P4 and P6, scenarios/many_volumes.py: volumes, programs starting at a time
    p46_volumes: int
    p46_in_flight: int
    # P5, scenarios/read_throughput.py: file size, timed rounds
    p5_mib: int
    p5_reps: int
    # pod_start_to_first_read, scenarios/pod_start.py: timed rounds (one pod A
    # and one pod B each), warm-up rounds
    pod_start_rounds: int
    pod_start_warmup: int


FULL = Sizes(
    "full",
    p1_n=200,
    p1_warmup=10,
    p2_n=300,
    p3_burst=200,
    p46_volumes=1000,
    p46_in_flight=16,
    p5_mib=512,
    p5_reps=16,
    pod_start_rounds=20,
    pod_start_warmup=1,
)
QUICK = Sizes(
    "quick",
    p1_n=60,
    p1_warmup=5,
    p2_n=100,
    p3_burst=100,
    p46_volumes=200,
    p46_in_flight=16,
    p5_mib=256,
    p5_reps=6,
    pod_start_rounds=6,
    pod_start_warmup=1,
)
SMOKE = Sizes(
    "smoke",
    p1_n=5,
    p1_warmup=1,
    p2_n=5,
    p3_burst=5,
    p46_volumes=5,
    p46_in_flight=4,
    p5_mib=16,
    p5_reps=1,
    pod_start_rounds=2,
    pod_start_warmup=0,
)


def field_names() -> list[str]:
    """The fields `--set` may override (all but the mode)."""
    return [f.name for f in dataclasses.fields(Sizes) if f.name != "mode"]
