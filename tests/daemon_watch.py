"""Waiting, from outside the driver, until the broker's daemon watch is done.

The broker watches the processes behind each mount it made (the peer that
ran fusermount3 and the peer's parent) through pidfds, and probes the mount
when one of them exits; a probe that meets a dead connection detaches the
mount. A test that kills a daemon the broker could not watch (one that
daemonized) to leave a dead mount behind must first let those probes end:
one still to come would find the daemon killed and detach the mount itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from e2e.node import Node


def driver_pidfds(node: Node) -> int:
    """How many processes the driver watches (the pidfds it holds)."""
    assert node.driver.process is not None
    fds = f"/proc/{node.driver.process.pid}/fd"
    links = []
    for fd in os.listdir(fds):
        try:
            links.append(os.readlink(f"{fds}/{fd}"))
        except FileNotFoundError:
            continue  # closed meanwhile
    return links.count("anon_inode:[pidfd]")


def wait_until_the_watch_is_done(
    node: Node, socket_binds: dict[str, Path], fuse_program: Path, timeout: float = 30.0
) -> None:
    """Return once the broker has seen every watched process exit and probed the mount.

    Call it once those processes have exited and the daemon serves. First
    the broker holds no pidfd any more: it has seen every exit, and each
    one's probe holds or waits for the volume's lock. Then a MOUNT made
    while the daemon lives waits for the lock behind them, and once it is
    refused as busy no probe is left to come.
    """
    deadline = time.monotonic() + timeout
    while driver_pidfds(node):
        assert time.monotonic() < deadline, "the broker never saw the watched processes exit"
        time.sleep(0.02)
    # The mountpoint a program names is advisory: the broker mounts on the
    # volume's target, so this container need not bind the volume.
    busy = node.sandbox(socket_binds).run(
        [str(fuse_program), "-f", "/tmp"], capture_output=True, timeout=timeout
    )
    assert busy.returncode != 0, "a second mount of a live volume was allowed"
    assert "already mounted" in busy.stderr.decode(errors="replace"), busy.stderr
