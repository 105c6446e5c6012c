"""The mount option allowlist (pure policy; the kernel side is in test_broker_*)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_async.mount import syscalls as sc
from csi_async.mount.fuse import FuseMountSpec
from csi_async.policy.node import NodePolicy
from csi_async.policy.options import OptionRefused, check_options, plan_mount
from fusermount3_proxy.protocol import split_options


def plan(
    program: str = "",
    volume: str = "",
    read_only: bool = False,
    persistent: bool = False,
    allow_other: bool = True,
) -> FuseMountSpec:
    return plan_mount(
        volume_options=split_options(volume),
        program_options=split_options(program),
        volume_read_only=read_only,
        persistent=persistent,
        user_id=1000,
        group_id=1000,
        default_source="data",
        policy=NodePolicy(allow_other=allow_other),
    )


def test_libfuse_defaults_mount_with_broker_chosen_ids_and_flags() -> None:
    spec = plan("rw,nosuid,nodev,subtype=hello")
    assert spec.fstype == "fuse.hello"
    assert spec.source == "hello"
    assert (spec.user_id, spec.group_id) == (1000, 1000)
    assert spec.flags == ("allow_other",)
    assert not spec.read_only


def test_default_permissions_is_passed_on_only_when_asked_for() -> None:
    # fusermount3 never adds it: daemons that check permissions themselves
    # would see every write refused by the kernel.
    assert "default_permissions" not in plan("rw").flags
    assert plan("rw,default_permissions").flags == ("allow_other", "default_permissions")
    assert plan(volume="default_permissions").flags == ("allow_other", "default_permissions")
    assert plan("default_permissions", allow_other=False).flags == ("default_permissions",)


def test_allow_other_comes_from_the_node_policy_alone() -> None:
    assert plan("allow_other").flags == ("allow_other",)
    assert plan("", allow_other=False).flags == ()
    with pytest.raises(OptionRefused) as info:
        plan("allow_other", allow_other=False)
    assert info.value.errno == errno.EPERM


def test_fsname_becomes_the_source_with_escaped_commas() -> None:
    assert plan(r"fsname=host:/a\,b,subtype=sshfs").source == "host:/a,b"


@pytest.mark.parametrize("dropped", ["fd=7", "rootmode=40000", "user_id=0", "group_id=0",
                                     "nonempty", "large_read", "x-systemd.automount"])  # fmt: skip
def test_ids_and_fd_from_the_client_are_dropped_silently(dropped: str) -> None:
    spec = plan(f"rw,{dropped}")
    assert spec.user_id == 1000
    assert all(key not in ("fd", "rootmode", "user_id", "group_id") for key, _ in spec.strings)


@pytest.mark.parametrize(
    ("option", "err"),
    [("suid", errno.EPERM), ("dev", errno.EPERM), ("blkdev", errno.EPERM),
     ("allow_root", errno.EPERM), ("context=system_u:object_r:tmp_t:s0", errno.EPERM),
     ("blksize=4096", errno.EPERM), ("bogus", errno.EINVAL), ("max_read=12x", errno.EINVAL),
     ("subtype=a/b", errno.EINVAL), ("ro=1", errno.EINVAL), ("=x", errno.EINVAL)],
)  # fmt: skip
def test_forbidden_and_unknown_options_are_refused_with_a_reason(option: str, err: int) -> None:
    with pytest.raises(OptionRefused) as info:
        plan(f"rw,{option}")
    assert info.value.errno == err
    assert option.partition("=")[0] in info.value.message


def test_a_read_only_volume_stays_read_only_whatever_the_program_says() -> None:
    assert plan("ro").read_only
    assert plan("rw", read_only=True).read_only
    assert not plan("ro,rw").read_only  # last one wins, as with fusermount3


def test_mount_flags_map_to_mount_attributes() -> None:
    spec = plan("noexec,noatime,nodiratime,nosymfollow")
    assert spec.mount_attrs & sc.MOUNT_ATTR_NOEXEC
    assert spec.mount_attrs & sc.MOUNT_ATTR_NOATIME
    assert spec.mount_attrs & sc.MOUNT_ATTR_NODIRATIME
    assert spec.mount_attrs & sc.MOUNT_ATTR_NOSYMFOLLOW
    assert not plan("noexec,exec").mount_attrs & sc.MOUNT_ATTR_NOEXEC


def test_volume_options_come_first_and_the_program_refines_them() -> None:
    assert plan(program="exec", volume="noexec").mount_attrs & sc.MOUNT_ATTR_NOEXEC == 0
    assert "sync" in plan(volume="sync").flags


def test_allow_other_follows_the_node_policy() -> None:
    assert "allow_other" not in plan("rw", allow_other=False).flags
    with pytest.raises(OptionRefused):
        plan("allow_other", allow_other=False)


def test_a_persistent_volume_may_grant_allow_other_where_pods_may_not() -> None:
    # The node refuses allow_other from pods: an inline volume's mountOptions
    # and the program's -o alike.
    for volume, program in (("allow_other", ""), ("", "allow_other")):
        with pytest.raises(OptionRefused) as info:
            plan(program, volume, allow_other=False)
        assert info.value.errno == errno.EPERM
    with pytest.raises(OptionRefused):
        check_options(["allow_other"], NodePolicy(allow_other=False), administrator=False)
    # The administrator's PV may ask for it; the program may then repeat it.
    spec = plan(program="allow_other", volume="allow_other", persistent=True, allow_other=False)
    assert spec.flags[:1] == ("allow_other",)
    assert "default_permissions" not in spec.flags  # only when asked for, as ever
    check_options(["allow_other"], NodePolicy(allow_other=False), administrator=True)
    # Unless the operator took it off the persistent-only list too.
    with pytest.raises(OptionRefused):
        plan_mount(
            volume_options=["allow_other"], program_options=[], volume_read_only=False,
            persistent=True, user_id=1, group_id=1, default_source="d",
            policy=NodePolicy(allow_other=False, persistent_volume_options=frozenset()),
        )  # fmt: skip


@pytest.mark.parametrize("option", ["suid", "dev", "allow_root", "blkdev", "bogus"])
def test_a_persistent_volume_cannot_use_what_is_refused_everywhere(option: str) -> None:
    with pytest.raises(OptionRefused):
        plan(volume=option, persistent=True)


def test_a_persistent_volume_s_options_win_over_the_program_s() -> None:
    # Inline, one author wrote both: the program refines the volume.
    assert plan(program="exec", volume="noexec").mount_attrs & sc.MOUNT_ATTR_NOEXEC == 0
    # A PV's options are the administrator's: the pod's program cannot undo them.
    pv = plan(program="exec,rw,fsname=mine", volume="noexec,ro,fsname=admin", persistent=True)
    assert pv.mount_attrs & sc.MOUNT_ATTR_NOEXEC
    assert pv.read_only
    assert pv.source == "admin"
    # What the PV leaves unset stays the program's to choose.
    assert plan(program="nosymfollow", volume="noexec", persistent=True).mount_attrs & (
        sc.MOUNT_ATTR_NOSYMFOLLOW
    )


def test_a_persistent_volume_s_rw_does_not_undo_the_program_s_ro() -> None:
    # "PV wins" restricts the program's mount; it never widens it to writable.
    assert plan(program="ro", volume="rw", persistent=True).read_only
    assert not plan(program="", volume="rw", persistent=True).read_only
    assert not plan(program="rw", volume="rw", persistent=True).read_only


@given(st.lists(st.text(max_size=40), max_size=12))
def test_no_option_list_can_reach_a_reserved_key(tokens: list[str]) -> None:
    try:
        spec = plan_mount(
            volume_options=[], program_options=tokens, volume_read_only=False,
            persistent=False, user_id=5, group_id=6, default_source="d", policy=NodePolicy(),
        )  # fmt: skip
    except OptionRefused:
        return
    assert (spec.user_id, spec.group_id) == (5, 6)
    reserved = {"fd", "rootmode", "user_id", "group_id", "blksize", "source", "subtype"}
    assert not reserved & {key for key, _ in spec.strings}
    assert not reserved & set(spec.flags)
    assert all("\0" not in v and "," not in v for _, v in spec.strings)
