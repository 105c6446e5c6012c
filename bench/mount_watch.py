"""When FUSE mounts appear: a thread that polls mountinfo for watched mount points."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


class MountWatcher:
    """Polls mountinfo and records when FUSE mounts appear on watched paths."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.seen: dict[str, float] = {}
        self._watched: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="mount-watcher", daemon=True)

    def watch(self, path: str) -> None:
        with self._lock:
            self._watched.add(path)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            with open("/proc/self/mountinfo", "rb") as f:
                data = f.read()
            # Cheap on purpose (the table has thousands of lines in P4/P6 and
            # this shares two cores with the driver): FUSE lines only, and
            # only the mount point field of those.
            points = [
                os.fsdecode(line.split(b" ", 5)[4])
                for line in data.split(b"\n")
                if b" - fuse" in line
            ]
            with self._lock:
                for point in points:
                    if point in self._watched and point not in self.seen:
                        self.seen[point] = now
                        self._changed.notify_all()
            self._stop.wait(self.interval)

    def wait_for(self, paths: set[str], timeout: float, give_up: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not paths <= self.seen.keys():
                if time.monotonic() > deadline or give_up():
                    return False
                self._changed.wait(0.1)
        return True

    def __enter__(self) -> MountWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
