"""The broker's limits as plain logic, in-process: BrokerLimits and FuseWaits.

No driver, no socket, no kernel mount: the "calls a daemon can make wait" are
functions that block on a threading.Event the test controls, so a thread that
is still stuck is a real thread, and every count is read at a known state. A
logic bug fails here in milliseconds; anything that would instead hang is cut
off by GUARD.

Each limit is drawn so that a pod exhausting its own share costs its
neighbours nothing (see the docstrings of limits.py and fuse_waits.py): most
tests below are one pod at its cap and another pod that must not notice.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from csi_async.broker.fuse_waits import NODE_SLOTS, PER_POD_SLOTS, FuseWaits, NoSlot, Outcome
from csi_async.broker.limits import (
    NODE_MOUNT_SLOTS,
    PER_POD_CONNECTIONS,
    PER_VOLUME_CONNECTIONS,
    BrokerLimits,
)

# Only a broken implementation waits this long: the cut-off for what would hang.
GUARD = 5.0
# A deadline a caller gives up after; the blocked threads below never meet it.
SHORT = 0.01


@dataclass
class Stuck:
    """A call that blocks until released, like a statfs on a hung daemon."""

    value: str = "late answer"
    error: BaseException | None = None
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def __call__(self) -> str:
        self.entered.set()
        try:
            assert self.release.wait(GUARD * 4), "never released"
            if self.error is not None:
                raise self.error
            return self.value
        finally:
            self.ended.set()


@pytest.fixture
def stuck_calls() -> Iterator[Callable[[], Stuck]]:
    """Stuck calls that are all released when the test ends, however it ends."""
    made: list[Stuck] = []

    def make() -> Stuck:
        made.append(Stuck())
        return made[-1]

    yield make
    for call in made:
        call.release.set()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a state the worker threads bring about (they report on the loop)."""
    with anyio.move_on_after(GUARD):
        while not predicate():
            await anyio.sleep(0.001)
    assert predicate(), f"not within {GUARD} s: {what}"


async def start_stuck(waits: FuseWaits, pod: str, call: Stuck, **kwargs: Any) -> None:
    """A call that the caller gives up on: its thread stays, counted, stuck in `call`."""
    with anyio.fail_after(GUARD):
        outcome = await waits.call(pod, call, SHORT, name="test", **kwargs)
    assert outcome == Outcome(finished=False)
    assert call.entered.wait(GUARD) and not call.ended.is_set()


def never_called() -> str:
    raise AssertionError("a call refused with NoSlot must not run")


# ---------------------------------------------------------------- BrokerLimits: connections


def test_defaults_are_the_documented_ones() -> None:
    limits = BrokerLimits()
    assert (limits.per_pod, limits.per_volume) == (PER_POD_CONNECTIONS, PER_VOLUME_CONNECTIONS)
    assert limits.node_wide.total_tokens == NODE_MOUNT_SLOTS
    waits = limits.fuse_waits
    assert (waits.per_pod, waits.node_wide) == (PER_POD_SLOTS, NODE_SLOTS) == (2, 16)


def test_two_nodes_never_share_a_budget_or_a_slot() -> None:
    # Mutable defaults through default_factory: one node's counts are its own.
    first, second = BrokerLimits(), BrokerLimits()
    assert first.node_wide is not second.node_wide
    assert first.fuse_waits is not second.fuse_waits
    assert first.open_connection("pod", 0) is None
    assert (first.connections_of("pod"), second.connections_of("pod")) == (1, 0)
    first.remember_gone(7, "/target")
    assert second.claim_gone("/target") == set()


def test_a_pod_gets_its_budget_across_volumes_and_not_one_more() -> None:
    limits = BrokerLimits(per_pod=3, per_volume=8)
    # The per-pod count is the pod's, whichever volume each connection is on.
    for open_on_that_volume in (0, 0, 1):
        assert limits.open_connection("hostile", open_on_that_volume) is None
    refusal = limits.open_connection("hostile", 0)
    assert refusal is not None and "this pod has too many connections" in refusal
    # A refusal is not counted: the pod holds exactly its budget.
    assert limits.connections_of("hostile") == 3


def test_a_pod_out_of_budget_leaves_its_neighbours_budget_whole() -> None:
    limits = BrokerLimits(per_pod=2, per_volume=8)
    for _ in range(2):
        assert limits.open_connection("hostile", 0) is None
    for _ in range(5):
        assert limits.open_connection("hostile", 0) is not None
    for open_on_that_volume in range(2):
        assert limits.open_connection("neighbour", open_on_that_volume) is None
    assert limits.connections_of("neighbour") == 2
    assert limits.connections_of("hostile") == 2


def test_the_volume_cap_refuses_before_the_pod_budget_is_touched() -> None:
    limits = BrokerLimits(per_pod=16, per_volume=2)
    refusal = limits.open_connection("pod", 2)
    assert refusal is not None and "this volume's broker" in refusal
    assert limits.connections_of("pod") == 0
    assert limits.open_connection("pod", 1) is None  # below the volume's cap
    assert limits.connections_of("pod") == 1


def test_closing_gives_the_budget_back_and_forgets_the_pod() -> None:
    limits = BrokerLimits(per_pod=2)
    for _ in range(2):
        assert limits.open_connection("pod", 0) is None
    assert limits.open_connection("pod", 0) is not None
    limits.close_connection("pod")
    assert limits.connections_of("pod") == 1
    assert limits.open_connection("pod", 0) is None
    limits.close_connection("pod")
    limits.close_connection("pod")
    assert limits.connections_of("pod") == 0
    # No entry is kept for a pod with nothing open: a node sees pods come and go.
    assert "pod" not in limits._by_pod


def test_a_close_without_an_open_never_raises_the_budget() -> None:
    limits = BrokerLimits(per_pod=1)
    limits.close_connection("pod")
    assert limits.connections_of("pod") == 0
    assert limits.open_connection("pod", 0) is None
    assert limits.open_connection("pod", 0) is not None  # still 1, not 2


# ---------------------------------------------------------------- BrokerLimits: node-wide slots


async def test_node_wide_slots_run_out_and_come_back_on_an_exception() -> None:
    # The slots bound the mount syscalls of every volume of the node; a
    # request that fails inside one must not keep it.
    limits = BrokerLimits(node_wide=anyio.CapacityLimiter(2))
    held = [object(), object()]
    for holder in held:
        limits.node_wide.acquire_on_behalf_of_nowait(holder)
    with pytest.raises(anyio.WouldBlock):
        limits.node_wide.acquire_on_behalf_of_nowait(object())
    limits.node_wide.release_on_behalf_of(held.pop())
    with pytest.raises(OSError, match="mount failed"):
        async with limits.node_wide:
            assert limits.node_wide.available_tokens == 0
            raise OSError("mount failed")
    assert limits.node_wide.available_tokens == 1
    limits.node_wide.release_on_behalf_of(held.pop())
    assert limits.node_wide.borrowed_tokens == 0


# ---------------------------------------------------------------- BrokerLimits: gone minors


def test_a_volumes_gone_minors_are_claimed_once_and_only_by_it() -> None:
    limits = BrokerLimits()
    limits.remember_gone(41, "/target/a")
    limits.remember_gone(42, "/target/a")
    limits.remember_gone(43, "/target/b")
    assert limits.claim_gone("/target/a") == {41, 42}
    assert limits.claim_gone("/target/a") == set()
    assert limits.claim_gone("/target/c") == set()
    assert limits.claim_gone("/target/b") == {43}


def test_a_reused_minor_no_longer_names_the_dead_superblock() -> None:
    # The kernel hands a freed anonymous device number to the next
    # superblock: once any new mount has it, it is nobody's dead mount.
    limits = BrokerLimits()
    limits.remember_gone(41, "/target/a")
    limits.minor_reused(41)
    limits.minor_reused(99)  # a minor nobody let go: nothing to forget
    assert limits.claim_gone("/target/a") == set()


def test_a_minor_let_go_again_belongs_to_its_latest_owner() -> None:
    # Volume a's old minor went to volume b's mount, which then died too.
    limits = BrokerLimits()
    limits.remember_gone(41, "/target/a")
    limits.minor_reused(41)
    limits.remember_gone(41, "/target/b")
    assert limits.claim_gone("/target/a") == set()
    assert limits.claim_gone("/target/b") == {41}


# ---------------------------------------------------------------- FuseWaits: one call


async def test_a_call_that_answers_returns_its_value_and_frees_its_slot() -> None:
    waits = FuseWaits(per_pod=1, node_wide=1)
    finished: list[bool] = []
    with anyio.fail_after(GUARD):
        outcome = await waits.call(
            "pod", lambda: 42, GUARD, name="test", on_finish=lambda: finished.append(True)
        )
    assert outcome == Outcome(True, 42)
    # The thread reported on the loop before the caller got the value.
    assert finished == [True]
    assert waits.running() == 0 and waits.running("pod") == 0
    assert waits.has_slot("pod")


async def test_a_call_without_a_deadline_waits_for_the_answer() -> None:
    waits = FuseWaits()
    with anyio.fail_after(GUARD):
        assert await waits.call("pod", lambda: "answer", None, name="test") == Outcome(
            True, "answer"
        )


async def test_a_call_that_fails_reraises_and_frees_its_slot() -> None:
    waits = FuseWaits(per_pod=1, node_wide=1)
    finished: list[bool] = []

    def fails() -> None:
        raise OSError(107, "Transport endpoint is not connected")

    with anyio.fail_after(GUARD), pytest.raises(OSError, match="not connected"):
        await waits.call("pod", fails, GUARD, name="test", on_finish=lambda: finished.append(True))
    assert finished == [True]
    assert waits.running() == 0
    assert waits.has_slot("pod")


async def test_a_stuck_call_is_given_up_on_but_keeps_its_slot_until_it_ends(
    stuck_calls: Callable[[], Stuck],
) -> None:
    waits = FuseWaits(per_pod=1, node_wide=4)
    stuck = stuck_calls()
    finished: list[int] = []
    await start_stuck(waits, "pod", stuck, on_finish=lambda: finished.append(threading.get_ident()))
    # Given up on, still running: counted against the pod and the node.
    assert (waits.running("pod"), waits.running()) == (1, 1)
    assert not waits.has_slot("pod")
    assert finished == []
    stuck.release.set()
    await eventually(lambda: waits.running() == 0, "the slot is freed once the thread ends")
    assert waits.has_slot("pod")
    # on_finish ran on the event loop's thread, not the worker's.
    assert finished == [threading.get_ident()]


async def test_a_late_failure_of_a_call_given_up_on_is_swallowed_quietly(
    stuck_calls: Callable[[], Stuck],
) -> None:
    # Nobody reads the result of a call given up on; asyncio must not log
    # "Future exception was never retrieved" for it either.
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        waits = FuseWaits()
        stuck = stuck_calls()
        stuck.error = OSError(107, "late")
        await start_stuck(waits, "pod", stuck)
        stuck.release.set()
        await eventually(lambda: waits.running() == 0, "the late failure reported back")
        gc.collect()
        await anyio.sleep(0)
        assert reported == []
    finally:
        loop.set_exception_handler(None)


async def test_a_cancelled_caller_stops_waiting_and_the_thread_stays_counted(
    stuck_calls: Callable[[], Stuck],
) -> None:
    waits = FuseWaits(per_pod=2, node_wide=4)
    stuck = stuck_calls()
    finished: list[bool] = []
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:

            async def caller() -> None:
                await waits.call(
                    "pod", stuck, None, name="test", on_finish=lambda: finished.append(True)
                )
                raise AssertionError("a call without a deadline returned while stuck")

            tg.start_soon(caller)
            assert await anyio.to_thread.run_sync(stuck.entered.wait, GUARD)
            tg.cancel_scope.cancel()
    assert not stuck.ended.is_set()
    assert waits.running("pod") == 1
    assert finished == []
    stuck.release.set()
    await eventually(lambda: waits.running() == 0, "the slot is freed once the thread ends")
    assert finished == [True]


async def test_the_loop_serves_others_while_a_call_waits_on_a_stuck_thread(
    stuck_calls: Callable[[], Stuck],
) -> None:
    # "No thread waits on another thread": while one pod's call waits for
    # its daemon, another pod's call runs and returns.
    waits = FuseWaits()
    stuck = stuck_calls()
    order: list[str] = []
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:

            async def hung_pod() -> None:
                await waits.call("hung", stuck, None, name="test")
                order.append("hung pod answered")

            tg.start_soon(hung_pod)
            assert await anyio.to_thread.run_sync(stuck.entered.wait, GUARD)
            assert await waits.call("other", lambda: 1, None, name="test") == Outcome(True, 1)
            order.append("other pod answered")
            stuck.release.set()
    assert order == ["other pod answered", "hung pod answered"]


async def test_each_call_runs_in_a_thread_named_for_its_job() -> None:
    # The name shows what a stuck thread waits for (top -H, the e2e tests).
    waits = FuseWaits()

    def own_comm() -> str:
        return Path("/proc/thread-self/comm").read_text().strip()

    with anyio.fail_after(GUARD):
        outcome = await waits.call("pod", own_comm, GUARD, name="liveness-probe")
    assert outcome == Outcome(True, "fuse-liveness-p")  # comm keeps 15 bytes


async def test_a_thread_that_cannot_start_gives_its_slot_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = FuseWaits(per_pod=1, node_wide=1)
    finished: list[bool] = []

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await waits.call(
            "pod", lambda: 1, GUARD, name="test", on_finish=lambda: finished.append(True)
        )
    with pytest.raises(RuntimeError, match="can't start new thread"):
        waits.run_detached("pod", lambda: 1, name="close")
    assert waits.running() == 0
    assert waits.has_slot("pod")
    assert finished == [True]
    monkeypatch.undo()
    with anyio.fail_after(GUARD):
        assert await waits.call("pod", lambda: 2, GUARD, name="test") == Outcome(True, 2)


def test_a_thread_that_ends_after_the_loop_closed_ends_quietly(
    stuck_calls: Callable[[], Stuck],
) -> None:
    # The driver is exiting: nobody is left to report to, and nothing may raise.
    waits = FuseWaits()
    stuck = stuck_calls()

    async def detach() -> None:
        waits.run_detached("pod", stuck, name="close-at-exit")

    asyncio.run(detach())
    assert stuck.entered.wait(GUARD)
    [thread] = [t for t in threading.enumerate() if t.name == "fuse-close-at-exit"]
    failures: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = failures.append
    try:
        stuck.release.set()
        thread.join(GUARD)
    finally:
        threading.excepthook = previous
    assert not thread.is_alive()
    assert failures == []


# ---------------------------------------------------------------- FuseWaits: caps and fairness


async def test_a_pod_at_its_cap_is_refused_at_once_and_nothing_runs(
    stuck_calls: Callable[[], Stuck],
) -> None:
    waits = FuseWaits(per_pod=2, node_wide=16)
    for _ in range(2):
        await start_stuck(waits, "hostile", stuck_calls())
    assert not waits.has_slot("hostile")
    # Refused before any thread starts: the function is never called, and
    # the caller is not made to wait for its deadline.
    with anyio.fail_after(GUARD), pytest.raises(NoSlot):
        await waits.call("hostile", never_called, 60.0, name="test")
    assert waits.running("hostile") == 2 and waits.running() == 2


async def test_a_pod_exhausting_its_share_cannot_take_a_neighbours(
    stuck_calls: Callable[[], Stuck],
) -> None:
    waits = FuseWaits(per_pod=2, node_wide=4)
    hostile = [stuck_calls() for _ in range(2)]
    for call in hostile:
        await start_stuck(waits, "hostile", call)
    # The neighbour has its whole share, stuck calls of its own included.
    assert waits.has_slot("neighbour")
    for _ in range(2):
        await start_stuck(waits, "neighbour", stuck_calls())
    assert not waits.has_slot("neighbour")
    # One hostile thread ends: the hostile pod may start one again; the
    # neighbour, at its own cap, gains nothing from it either.
    hostile[0].release.set()
    await eventually(lambda: waits.running("hostile") == 1, "one hostile thread ended")
    assert waits.has_slot("hostile")
    assert not waits.has_slot("neighbour")


async def test_the_node_cap_holds_across_pods_and_frees_as_threads_end(
    stuck_calls: Callable[[], Stuck],
) -> None:
    waits = FuseWaits(per_pod=2, node_wide=3)
    first = stuck_calls()
    await start_stuck(waits, "a", first)
    await start_stuck(waits, "a", stuck_calls())
    await start_stuck(waits, "b", stuck_calls())
    # Pod c has none of its own running, but the node has no slot left.
    assert waits.running() == 3
    assert not waits.has_slot("c")
    with anyio.fail_after(GUARD), pytest.raises(NoSlot):
        await waits.call("c", never_called, GUARD, name="test")
    first.release.set()
    await eventually(lambda: waits.running() == 2, "one thread of pod a ended")
    assert waits.has_slot("c")
    with anyio.fail_after(GUARD):
        assert await waits.call("c", lambda: "c", GUARD, name="test") == Outcome(True, "c")


async def test_detached_calls_past_a_pods_cap_cost_the_node_only_that_cap(
    stuck_calls: Callable[[], Stuck],
) -> None:
    # run_detached must run whatever the caps (the last close of a mount);
    # if every such thread counted against the node, one pod stuck on many
    # closes would close the node's slots for every other pod.
    waits = FuseWaits(per_pod=2, node_wide=3)
    closes = [stuck_calls() for _ in range(10)]
    for close in closes:
        waits.run_detached("hostile", close, name="close")
    assert waits.running("hostile") == 10
    assert not waits.has_slot("hostile")
    # The node is charged 2 for the hostile pod: one slot is left.
    assert waits.has_slot("neighbour")
    await start_stuck(waits, "neighbour", stuck_calls())
    assert not waits.has_slot("other")
    # While the hostile pod is still at or above its cap, its threads ending
    # frees nothing for the node...
    for close in closes[:8]:
        close.release.set()
    await eventually(lambda: waits.running("hostile") == 2, "8 closes ended")
    assert not waits.has_slot("other")
    # ...and below its cap, each one that ends frees a node slot.
    closes[8].release.set()
    await eventually(lambda: waits.running("hostile") == 1, "a 9th close ended")
    assert waits.has_slot("other") and waits.has_slot("hostile")
    closes[9].release.set()
    await eventually(lambda: waits.running("hostile") == 0, "every close ended")
    assert "hostile" not in waits._by_pod


async def test_a_detached_call_reports_when_it_really_ends(
    stuck_calls: Callable[[], Stuck],
) -> None:
    waits = FuseWaits(per_pod=1, node_wide=1)
    close = stuck_calls()
    finished: list[bool] = []
    waits.run_detached("pod", close, name="close", on_finish=lambda: finished.append(True))
    assert close.entered.wait(GUARD)
    assert not waits.has_slot("pod") and not waits.has_slot("other")
    assert finished == []
    close.release.set()
    await eventually(lambda: finished == [True], "on_finish once the close returned")
    assert waits.running() == 0 and waits.has_slot("other")


async def test_a_detached_call_that_fails_frees_its_slot_quietly() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        waits = FuseWaits(per_pod=1, node_wide=1)

        def fails() -> None:
            raise OSError(9, "Bad file descriptor")

        waits.run_detached("pod", fails, name="close")
        await eventually(lambda: waits.running() == 0, "the failed close reported back")
        gc.collect()
        await anyio.sleep(0)
        assert reported == []
        assert waits.has_slot("pod")
    finally:
        loop.set_exception_handler(None)
