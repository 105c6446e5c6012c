"""Calls that a pod's FUSE daemon can make wait, run where they cannot stall anyone.

A statfs on a FUSE mount is a request to its daemon; the last close of a
mount's fd may write back dirty pages through it. A hung or hostile daemon
never answers, and a thread stuck in such a call stays stuck until the daemon
answers, dies, or its connection is aborted. So each such call:

- runs in a thread of its own (the event loop only waits, with a deadline,
  for the thread to report back: no thread waits on another thread);
- takes a slot that stays taken until the thread really finishes, not just
  until the caller stopped waiting, so stuck threads are counted;
- is capped per pod and node-wide. A pod out of slots is told so at once,
  while another pod's slots stay free, and the driver's thread count stays
  below a constant whatever pods do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from csi_async.mount import syscalls as sc

T = TypeVar("T")

# One pod's hung daemon may hold this many threads; the node as a whole this many.
PER_POD_SLOTS = 2
NODE_SLOTS = 16


class NoSlot(Exception):
    """The pod (or the node) already has as many of these calls stuck as allowed."""


@dataclass(slots=True)
class Outcome(Generic[T]):
    """What came back within the deadline: finished with a value, or still running."""

    finished: bool
    value: T | None = None


@dataclass(slots=True)
class FuseWaits:
    per_pod: int = PER_POD_SLOTS
    node_wide: int = NODE_SLOTS
    # Threads running (finished or not from the caller's view), per pod UID and
    # in all; only touched on the event loop.
    _by_pod: dict[str, int] = field(default_factory=dict)
    _running: int = 0
    # What counts against node_wide: each pod's threads up to its own cap.
    # Threads that must run whatever the caps (run_detached) can take a pod
    # past its cap; counting those too would let one pod close the node's
    # slots for everyone else.
    _charged: int = 0

    def running(self, pod_uid: str | None = None) -> int:
        return self._running if pod_uid is None else self._by_pod.get(pod_uid, 0)

    def has_slot(self, pod_uid: str) -> bool:
        return self._charged < self.node_wide and self._by_pod.get(pod_uid, 0) < self.per_pod

    async def call(
        self,
        pod_uid: str,
        fn: Callable[[], T],
        timeout: float | None,
        *,
        name: str,
        on_finish: Callable[[], None] | None = None,
    ) -> Outcome[T]:
        """Run fn in its own thread and wait up to `timeout` seconds for it.

        Raises NoSlot without starting anything when the pod or the node is
        at its cap; re-raises fn's exception if it finished with one. A
        cancelled caller stops waiting; the thread runs on, counted, and
        on_finish runs on the event loop when it really ends.
        """
        if not self.has_slot(pod_uid):
            raise NoSlot(pod_uid)
        done = self._start(pod_uid, fn, name, on_finish)
        try:
            with anyio.move_on_after(timeout):
                return Outcome(True, await asyncio.shield(done))
        finally:
            if not done.done():
                # Nobody will read it; keep asyncio from warning about it.
                done.add_done_callback(_consume)
        return Outcome(False)

    def run_detached(
        self,
        pod_uid: str,
        fn: Callable[[], object],
        *,
        name: str,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        """Run fn in its own thread, counted against the pod, without waiting.

        For calls that must happen whatever the caps (the last close of a
        mount): it is the caller's job to stop making more of them when the
        pod has no slot left (see has_slot).
        """
        self._start(pod_uid, fn, name, on_finish).add_done_callback(_consume)

    def _start(
        self,
        pod_uid: str,
        fn: Callable[[], T],
        name: str,
        on_finish: Callable[[], None] | None,
    ) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        held = self._by_pod.get(pod_uid, 0)
        if held < self.per_pod:
            self._charged += 1
        self._by_pod[pod_uid] = held + 1
        self._running += 1

        def report(value: T | None, error: BaseException | None) -> None:
            # On the event loop, whenever the thread finishes.
            self._release(pod_uid)
            if on_finish is not None:
                on_finish()
            if done.done():
                return  # the caller stopped waiting long ago
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(value)  # type: ignore[arg-type]

        def run() -> None:
            # Shows the thread's job in /proc/<pid>/task/*/comm (top -H, tests).
            sc.set_thread_name(f"fuse-{name}")
            value: T | None = None
            error: BaseException | None = None
            try:
                value = fn()
            except BaseException as err:
                error = err
            try:
                loop.call_soon_threadsafe(report, value, error)
            except RuntimeError:
                pass  # the loop is closed: the driver is exiting

        thread = threading.Thread(target=run, name=f"fuse-{name}", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._release(pod_uid)
            if on_finish is not None:
                on_finish()
            raise
        return done

    def _release(self, pod_uid: str) -> None:
        self._running -= 1
        held = self._by_pod.get(pod_uid, 0) - 1
        if held < self.per_pod:
            self._charged -= 1
        if held > 0:
            self._by_pod[pod_uid] = held
        else:
            self._by_pod.pop(pod_uid, None)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
