"""The message a MOUNT gets while the volume's FUSE mount is still served (in-process).

The real requests, through the broker, are in test_fuse_mounts.py; these
pin down how the two mountpoints are compared.
"""

from __future__ import annotations

import pytest

from csi_async.broker.second_mount import second_mount_message


@pytest.mark.parametrize("requested", ["/run/data", "/run/data/", "/run//data"])
def test_the_same_mountpoint_is_told_the_filesystem_is_already_there(requested: str) -> None:
    message = second_mount_message(requested, "/run/data")
    assert message.startswith(f"{requested} is already mounted: ")
    assert message.endswith(f"fusermount3 -u {requested}")


@pytest.mark.parametrize("requested", ["/run/data/host", "/run/data/a/b/"])
def test_a_mountpoint_below_the_mount_is_told_nothing_mounts_below_it(requested: str) -> None:
    message = second_mount_message(requested, "/run/data")
    assert message.startswith(f"{requested} is inside the volume's FUSE filesystem, ")
    assert "already mounted at /run/data" in message
    assert "of its own" in message


@pytest.mark.parametrize("requested", ["/run/database", "/tmp/afuse-x/host", "/dev/fd/N"])
def test_any_other_mountpoint_is_told_it_lands_on_the_same_volume(requested: str) -> None:
    # /run/database only shares a prefix with /run/data: not below it.
    message = second_mount_message(requested, "/run/data")
    assert message.startswith("the volume is already mounted (at /run/data) ")
    assert f"{requested} would land on the same volume" in message
    assert "of its own" in message


@pytest.mark.parametrize("current", [None, "/dev/fd/N"])
def test_an_unknown_first_mountpoint_gets_the_general_message(current: str | None) -> None:
    # None: adopted after a driver restart; /dev/fd/N: made by the starter.
    message = second_mount_message("/run/data", current)
    assert message.startswith("the volume is already mounted and its FUSE daemon is still running")
    assert "(this request named /run/data)" in message


def test_a_long_path_from_the_pod_is_shortened_and_the_advice_kept() -> None:
    requested = "/run/data/" + "x" * 4000
    message = second_mount_message(requested, "/run/data")
    assert len(message) < 600
    assert "..." in message
    assert message.endswith("of its own")
