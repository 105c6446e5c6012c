"""The benchmark scenarios, one module each, named for what it measures.

Each module has `IDS`, the measurement IDs its rows carry (what --only
takes), and `run(env, ids) -> list[Measurement]`, which measures the IDs
asked for (a module with two IDs shares one run between them). They run in
the order below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.harness import Measurement
from bench.scenarios import (
    helper_mount_latency,
    many_volumes,
    pod_burst,
    pod_start,
    publish_unpublish,
    read_throughput,
)
from bench.testbed import Env


@dataclass(frozen=True)
class Scenario:
    name: str
    ids: tuple[str, ...]
    run: Callable[[Env, set[str]], list[Measurement]]


SCENARIOS = tuple(
    Scenario(module.__name__.rsplit(".", 1)[1], module.IDS, module.run)
    for module in (
        helper_mount_latency,
        publish_unpublish,
        pod_burst,
        many_volumes,
        read_throughput,
        pod_start,
    )
)
# Every measurement ID: P1 to P6, then the named ones.
MEASUREMENTS = tuple(
    sorted((i for s in SCENARIOS for i in s.ids), key=lambda i: (not i[1:].isdigit(), i))
)
