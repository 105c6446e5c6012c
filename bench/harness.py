"""How a measurement is taken and summarised: interleaved rounds, samples, stats, goals.

Every scenario returns a list of `Measurement`s: the samples of one quantity
(in one unit), their median, p90, p99 and N, and optionally a goal with its
verdict. Comparisons are made against a baseline measured in the same run,
interleaved with it round by round, so that both see the same background
load: `interleaved` gives each round's order, `paired_ratios` and
`ratio_of_medians` compare the two.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def percentile(sorted_samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    n = len(sorted_samples)
    if n == 1:
        return sorted_samples[0]
    k = (n - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, n - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


def elapsed_ms(start: float, end: float | None = None) -> float:
    """Milliseconds between two time.perf_counter() readings (the second defaults to now)."""
    return ((time.perf_counter() if end is None else end) - start) * 1000


def interleaved(variants: Sequence[T], round_index: int) -> list[T]:
    """The order of the variants in one round: rotated by one each round.

    With two variants: A B, B A, A B, ...; no variant always runs first (on a
    cold cache, or right after the other's teardown).
    """
    shift = round_index % len(variants)
    return [*variants[shift:], *variants[:shift]]


def paired_ratios(samples: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-round ratios of paired samples (round i of each ran back to back).

    Steadier than either series alone: the two samples of a round share the
    same background load.
    """
    return [s / b for s, b in zip(samples, baseline, strict=True)]


def ratio_of_medians(samples: Sequence[float], baseline: Sequence[float]) -> float:
    return median(samples) / median(baseline)


@dataclass
class Measurement:
    """The samples of one quantity, as one row of the report.

    `id` is the measurement ID users pass to --only (P1, ...); `key` names
    the row uniquely (P1.floor); `passed` is None when there is no goal.
    """

    id: str
    key: str
    name: str
    unit: str
    samples: list[float]
    goal: str = ""
    passed: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, float | None]:
        if not self.samples:
            return {"median": None, "p90": None, "p99": None}
        s = sorted(self.samples)
        return {"median": percentile(s, 0.5), "p90": percentile(s, 0.9), "p99": percentile(s, 0.99)}

    @property
    def median(self) -> float:
        value = self.stats()["median"]
        if value is None:
            raise ValueError(f"{self.key} has no samples")
        return value

    @property
    def status(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "MISS")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            **self.stats(),
            "n": len(self.samples),
            "goal": self.goal,
            "status": self.status,
            "note": self.note,
            "extra": self.extra,
            "samples": [round(v, 6) for v in self.samples],
        }
