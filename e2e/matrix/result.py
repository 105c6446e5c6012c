"""What one row yields in one mode, and which outcomes fail the matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# The checks in the order they run; a row stops at the first that fails.
CHECKS = ("mount", "read", "write", "unmount", "kill")

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
# A CannotWork program behaved as its reason says: it never reached the broker.
REFUSED = "cannot work"


class CheckFailed(Exception):
    """A check did not hold; the message is the short reason shown in the matrix."""


@dataclass
class Result:
    """The outcome of one row in one mode."""

    name: str
    library: str  # name and version
    version: str
    mode: str
    status: str  # PASS, FAIL or NOT_RUN
    failed_check: str | None = None
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # check -> seconds
    details: dict[str, str] = field(default_factory=dict)  # check -> what was seen
    notes: list[str] = field(default_factory=list)
    optional: bool = False
    # who removed the mount of the SIGKILLed program (the kill check)
    killed_cleanup: str = ""

    @property
    def total(self) -> float:
        return sum(self.timings.values())

    @property
    def cell(self) -> str:
        """The result as the matrix shows it."""
        if self.status == FAIL:
            return f"FAIL at {self.failed_check}: {self.reason}"
        if self.status == NOT_RUN:
            return f"not run: {self.reason}"
        if self.status == REFUSED:
            return f"cannot work: {self.reason}"
        checks = [c for c in CHECKS if c in self.timings]
        return f"pass ({', '.join(checks)})"


def failed(results: Sequence[Result]) -> list[Result]:
    """Results that make the matrix fail: failures, and required rows that did not run."""
    return [r for r in results if r.status == FAIL or (r.status == NOT_RUN and not r.optional)]
