"""The volume table (VolumeManager) in-process: publish is atomic, restore never fails.

A real VolumeManager on a tmp kubelet root and state dir, serving its
brokers in this test's task group. FUSE volumes need no mount here (the
mount is made only when a pod asks); socketFor volumes are real read-only
bind mounts, removed by the unpublish each test ends with.

Each test names the fix of 33c25b8 it guards.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from csi_async.broker import sockets
from csi_async.broker.limits import BrokerLimits
from csi_async.broker.listener import VolumeBroker
from csi_async.csi.requests import validate_publish
from csi_async.kubelet.target_path import parse_target_path
from csi_async.mount.mountinfo import mounts_at
from csi_async.policy.node import NodePolicy
from csi_async.volumes.errors import PublishFailed
from csi_async.volumes.registry import VolumeManager
from csi_async.volumes.spec import PublishSpec
from csi_async.volumes.state import StateStore, VolumeRecord
from tests.helpers import publish_request

POLICY = NodePolicy(require_pod_cgroup=False)
EMPTY_DIR = "fuse-fd-passing"
META_SOCKET = "fuse-csi-ephemeral.sock"
META_FUSE = {"fdPassingEmptyDirName": EMPTY_DIR, "fdPassingSocketName": META_SOCKET}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def audit_lines() -> Iterator[list[logging.LogRecord]]:
    """Records written to the audit logger, wherever else its handlers point."""
    audit = logging.getLogger("csi_async.audit")
    collect = _Collect()
    audit.addHandler(collect)
    level = audit.level
    audit.setLevel(logging.INFO)
    try:
        yield collect.records
    finally:
        audit.removeHandler(collect)
        audit.setLevel(level)


def audit_of(records: list[logging.LogRecord], decision: str) -> list[dict[str, Any]]:
    found = []
    for record in records:
        fields = getattr(record, "fields", None)
        if record.name != "csi_async.audit" or not isinstance(fields, dict):
            continue
        if fields.get("decision") == decision:
            found.append(fields)
    return found


@asynccontextmanager
async def manager(kubelet_root: Path, state_dir: Path) -> AsyncIterator[VolumeManager]:
    """A VolumeManager as the driver runs it; what is left published is unpublished."""
    async with anyio.create_task_group() as tg:
        volumes = VolumeManager(
            kubelet_root=kubelet_root,
            state_dir=state_dir,
            policy=POLICY,
            limits=BrokerLimits(),
            task_group=tg,
        )
        try:
            yield volumes
        finally:
            with anyio.CancelScope(shield=True):
                for published in volumes.published().values():
                    await volumes.unpublish(published.spec.target, published.spec.volume_id)
                await volumes.close()
            tg.cancel_scope.cancel()


def spec_and_record(
    kubelet_root: Path,
    *,
    pod_uid: str,
    name: str = "data",
    attributes: dict[str, str] | None = None,
    make_parent: bool = True,
) -> tuple[PublishSpec, VolumeRecord]:
    request = publish_request(
        kubelet_root, pod_uid=pod_uid, name=name, attributes=attributes, make_parent=make_parent
    )
    return validate_publish(request, str(kubelet_root), POLICY), VolumeRecord.of(request)


def native_socket(state_dir: Path, pod_uid: str, name: str = "data") -> Path:
    return state_dir / "sockets" / pod_uid / name / "fuse.sock"


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def records_on_disk(state_dir: Path) -> list[str]:
    return sorted(record.target_path for record in StateStore(state_dir).load()[0])


def validator(kubelet_root: Path) -> Any:
    return lambda record: validate_publish(record.request(), str(kubelet_root), POLICY)


# ---------------------------------------------------------------- publish


@pytest.mark.parametrize("kind", ["native", "meta-fuse", "socketFor"])
@pytest.mark.asyncio
async def test_a_publish_whose_record_cannot_be_saved_leaves_nothing_and_can_be_retried(
    kind: str, kubelet_root: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards "a publish is acknowledged only after its record is saved".
    # Before, the volume entered the table first: the failed publish left a
    # live broker behind, and kubelet's retry was answered OK at once while
    # no record existed (so a driver restart forgot the volume).
    pod = str(uuid.uuid4())
    empty_dir = kubelet_root / "pods" / pod / "volumes" / "kubernetes.io~empty-dir" / EMPTY_DIR
    if kind == "meta-fuse":
        empty_dir.mkdir(parents=True)
        spec, record = spec_and_record(kubelet_root, pod_uid=pod, attributes=META_FUSE)
        broker_socket = empty_dir / META_SOCKET
    elif kind == "socketFor":
        spec, record = spec_and_record(
            kubelet_root, pod_uid=pod, name="data-broker", attributes={"socketFor": "data"}
        )
        broker_socket = None
    else:
        spec, record = spec_and_record(kubelet_root, pod_uid=pod)
        broker_socket = native_socket(state_dir, pod)
    target = Path(spec.target.absolute)
    original_save = StateStore.save

    def disk_full(self: StateStore, record: VolumeRecord) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StateStore, "save", disk_full)
    async with manager(kubelet_root, state_dir) as volumes:
        with pytest.raises(OSError) as raised:
            await volumes.publish(spec, record)
        assert raised.value.errno == errno.ENOSPC
        assert volumes.published() == {}
        assert not mounts_at(spec.target.absolute)
        assert not target.exists(), "the target directory was left behind"
        assert target.parent.is_dir()  # kubelet's directory is not ours to remove
        if broker_socket is not None:
            assert not is_socket(broker_socket), "the broker socket was left behind"
        assert not (state_dir / "sockets" / pod).exists()
        assert records_on_disk(state_dir) == []

        monkeypatch.setattr(StateStore, "save", original_save)
        await volumes.publish(spec, record)
        assert list(volumes.published()) == [spec.target.absolute]
        assert target.is_dir()
        if broker_socket is not None:
            assert is_socket(broker_socket)
        else:
            assert mounts_at(spec.target.absolute)
        assert records_on_disk(state_dir) == [spec.target.absolute]
        # A repeated publish with the same arguments is idempotent.
        await volumes.publish(spec, record)
        await volumes.unpublish(spec.target, spec.volume_id)
        assert not target.exists()
        assert not (state_dir / "sockets" / pod).exists()
        assert records_on_disk(state_dir) == []


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(sockets.SocketRaced(errno.EADDRINUSE, "kept being replaced"), id="raced"),
        pytest.param(OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)), id="in-use"),
        pytest.param(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)), id="swapped"),
        pytest.param(PermissionError(errno.EACCES, os.strerror(errno.EACCES)), id="denied"),
    ],
)
@pytest.mark.asyncio
async def test_an_oserror_from_the_pods_emptydir_fails_publish_as_a_precondition(
    failure: OSError, kubelet_root: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards "OSErrors from pod-writable places map to FAILED_PRECONDITION"
    # (PublishFailed). Before, only FileExistsError did; a pod racing its
    # socket name in its emptyDir made NodePublishVolume fail INTERNAL.
    pod = str(uuid.uuid4())
    empty_dir = kubelet_root / "pods" / pod / "volumes" / "kubernetes.io~empty-dir" / EMPTY_DIR
    empty_dir.mkdir(parents=True)
    spec, record = spec_and_record(kubelet_root, pod_uid=pod, attributes=META_FUSE)

    def listen_in(dir_fd: int, name: str) -> sockets.BoundSocket:
        raise failure

    monkeypatch.setattr(sockets, "listen_in", listen_in)
    async with manager(kubelet_root, state_dir) as volumes:
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(PublishFailed, match=f"cannot create the broker socket '{META_SOCKET}'"):
            await volumes.publish(spec, record)
        assert len(os.listdir("/proc/self/fd")) == fds, "the emptyDir's fd leaked"
        assert volumes.published() == {}
        assert not Path(spec.target.absolute).exists()
        assert records_on_disk(state_dir) == []


# ---------------------------------------------------------------- restore


@pytest.mark.asyncio
async def test_restore_skips_every_volume_it_cannot_set_up_and_never_raises(
    kubelet_root: Path,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    audit_lines: list[logging.LogRecord],
) -> None:
    # Guards "restore skips any volume it cannot set up and the driver always
    # starts". Before, an OSError from the socket's bind (a pod racing its
    # socket name) escaped restore and the driver could not start; a missing
    # parent dropped the record instead of leaving it for unpublish.
    store = StateStore(state_dir)
    good = [spec_and_record(kubelet_root, pod_uid=str(uuid.uuid4())) for _ in range(2)]
    vanished = spec_and_record(kubelet_root, pod_uid=str(uuid.uuid4()), make_parent=False)
    in_use = spec_and_record(kubelet_root, pod_uid=str(uuid.uuid4()))
    buggy = spec_and_record(kubelet_root, pod_uid=str(uuid.uuid4()))
    for _, record in [*good, vanished, in_use, buggy]:
        store.save(record)
    (store.directory / ("0" * 32 + ".json")).write_text('{"version": 1, "volume_id": ')
    assert not Path(vanished[0].target.absolute).parent.exists()

    real_listen_in = sockets.listen_in
    real_serve = VolumeBroker.serve

    def listen_in(dir_fd: int, name: str) -> sockets.BoundSocket:
        if in_use[0].target.pod_uid in os.readlink(f"/proc/self/fd/{dir_fd}"):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        return real_listen_in(dir_fd, name)

    async def serve(self: VolumeBroker, **kwargs: Any) -> None:
        # Fails after the socket is bound: restore must undo the socket too.
        if self.target.pod_uid == buggy[0].target.pod_uid:
            raise RuntimeError("a bug in setting up one volume")
        await real_serve(self, **kwargs)

    monkeypatch.setattr(sockets, "listen_in", listen_in)
    monkeypatch.setattr(VolumeBroker, "serve", serve)
    async with manager(kubelet_root, state_dir) as volumes:
        restored = await volumes.restore(validator(kubelet_root))
        assert restored == 2
        assert sorted(volumes.published()) == sorted(spec.target.absolute for spec, _ in good)
        for spec, _ in good:
            assert is_socket(native_socket(state_dir, spec.target.pod_uid))
        skipped = {
            line["target_path"]: line["detail"]
            for line in audit_of(audit_lines, "skipped")
            if "record" not in line  # the unreadable record: no target to name
        }
        assert set(skipped) == {
            vanished[0].target.absolute,
            in_use[0].target.absolute,
            buggy[0].target.absolute,
        }, skipped
        assert "does not exist" in skipped[vanished[0].target.absolute]
        # A pod-caused OSError is a refusal with a reason, not an internal error.
        assert skipped[in_use[0].target.absolute] == (
            "volume not restored: cannot create the broker socket 'fuse.sock': "
            "Address already in use"
        )
        assert "RuntimeError: a bug" in skipped[buggy[0].target.absolute]
        for spec, _ in (in_use, buggy):
            # The failed set-up undid itself: no target dir, no socket.
            assert not Path(spec.target.absolute).exists()
            assert not is_socket(native_socket(state_dir, spec.target.pod_uid))
        # Skipped, not dropped: their records stay for kubelet's unpublish.
        assert len(records_on_disk(state_dir)) == 5
        for spec, _ in (vanished, in_use, buggy):
            await volumes.unpublish(spec.target, spec.volume_id)
        assert records_on_disk(state_dir) == sorted(spec.target.absolute for spec, _ in good)


@pytest.mark.asyncio
async def test_restore_drops_a_record_that_no_longer_validates(
    kubelet_root: Path, state_dir: Path, audit_lines: list[logging.LogRecord]
) -> None:
    store = StateStore(state_dir)
    spec, record = spec_and_record(kubelet_root, pod_uid=str(uuid.uuid4()))
    tampered = record.model_copy(update={"volume_context": {**record.volume_context, "x": "y"}})
    store.save(tampered)
    async with manager(kubelet_root, state_dir) as volumes:
        assert await volumes.restore(validator(kubelet_root)) == 0
        assert volumes.published() == {}
    dropped = audit_of(audit_lines, "dropped")
    assert [line["target_path"] for line in dropped] == [spec.target.absolute]
    assert records_on_disk(state_dir) == []


@pytest.mark.asyncio
async def test_restore_reports_an_unreadable_record_in_the_audit_stream(
    kubelet_root: Path,
    state_dir: Path,
    audit_lines: list[logging.LogRecord],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A volume whose record cannot even be read is not restored either: the
    # operator's audit stream (--audit-log may be a file of its own) must
    # say so, like it does for every other volume restore leaves out.
    store = StateStore(state_dir)
    good = spec_and_record(kubelet_root, pod_uid=str(uuid.uuid4()))
    store.save(good[1])
    corrupt = store.directory / ("f" * 32 + ".json")
    corrupt.write_bytes(b"\x00not json")
    async with manager(kubelet_root, state_dir) as volumes:
        assert await volumes.restore(validator(kubelet_root)) == 1
    assert any(
        r.name == "csi_async.state" and r.levelno >= logging.ERROR and corrupt.name in r.message
        for r in caplog.records
    ), "the unreadable record was not logged"
    assert corrupt.exists(), "an unreadable record is left for an operator"
    reported = [
        line for line in audit_of(audit_lines, "skipped") if corrupt.name in json.dumps(line)
    ]
    assert reported, "no audit line says a recorded volume was left out"


# ---------------------------------------------------------------- socketFor of a meta-fuse volume


@pytest.mark.parametrize(
    "socket_volume_first", [True, False], ids=["socketFor-first", "fuse-first"]
)
@pytest.mark.asyncio
async def test_a_socket_for_volume_of_a_meta_fuse_volume_leaves_no_socket_dir(
    kubelet_root: Path, state_dir: Path, socket_volume_first: bool
) -> None:
    # Guards "a socketFor volume of a meta-fuse volume no longer leaks its
    # native dir": the meta-fuse volume never uses <state>/sockets/<pod>/,
    # so it must not count as the socketFor volume's other half.
    pod = str(uuid.uuid4())
    empty_dir = kubelet_root / "pods" / pod / "volumes" / "kubernetes.io~empty-dir" / EMPTY_DIR
    empty_dir.mkdir(parents=True)
    empty_dir.chmod(0o777)
    fuse_spec, fuse_record = spec_and_record(kubelet_root, pod_uid=pod, attributes=META_FUSE)
    socket_spec, socket_record = spec_and_record(
        kubelet_root, pod_uid=pod, name="data-broker", attributes={"socketFor": "data"}
    )
    async with manager(kubelet_root, state_dir) as volumes:
        await volumes.publish(fuse_spec, fuse_record)
        await volumes.publish(socket_spec, socket_record)
        assert is_socket(empty_dir / META_SOCKET)
        assert mounts_at(socket_spec.target.absolute), "the socket dir is not bound"
        assert (state_dir / "sockets" / pod / "data").is_dir()
        order = [socket_spec, fuse_spec] if socket_volume_first else [fuse_spec, socket_spec]
        for spec in order:
            await volumes.unpublish(spec.target, spec.volume_id)
        assert volumes.published() == {}
    assert not (state_dir / "sockets" / pod).exists(), os.listdir(state_dir / "sockets" / pod)
    assert not (empty_dir / META_SOCKET).exists()
    for spec in (fuse_spec, socket_spec):
        assert not mounts_at(spec.target.absolute)
        assert not Path(spec.target.absolute).exists()
    assert records_on_disk(state_dir) == []


@pytest.mark.asyncio
async def test_a_native_pair_shares_its_socket_dir_until_both_are_gone(
    kubelet_root: Path, state_dir: Path
) -> None:
    # The other side of the same rule: a native FUSE volume and its socketFor
    # volume share the directory, which goes with the second of them.
    pod = str(uuid.uuid4())
    fuse_spec, fuse_record = spec_and_record(kubelet_root, pod_uid=pod)
    socket_spec, socket_record = spec_and_record(
        kubelet_root, pod_uid=pod, name="data-broker", attributes={"socketFor": "data"}
    )
    async with manager(kubelet_root, state_dir) as volumes:
        await volumes.publish(socket_spec, socket_record)
        await volumes.publish(fuse_spec, fuse_record)
        seen_by_pod = Path(socket_spec.target.absolute) / "fuse.sock"
        assert is_socket(seen_by_pod)
        await volumes.unpublish(socket_spec.target, socket_spec.volume_id)
        assert is_socket(native_socket(state_dir, pod)), "removed while its FUSE volume lives"
        await volumes.unpublish(fuse_spec.target, fuse_spec.volume_id)
    assert not (state_dir / "sockets" / pod).exists()


def test_target_paths_in_this_module_parse(kubelet_root: Path) -> None:
    # The helpers build kubelet's exact layout (a typo would make every
    # test above exercise validation failures instead).
    request = publish_request(kubelet_root, pod_uid=str(uuid.uuid4()))
    assert parse_target_path(str(kubelet_root), request.target_path).volume_name == "data"


# ---------------------------------------------------------------- issue #13: speed


async def _trash_emptied(state_dir: Path, timeout: float = 10.0) -> None:
    trash = state_dir / "removed"
    with anyio.fail_after(timeout):
        while os.listdir(trash):
            await anyio.sleep(0.01)


@pytest.mark.asyncio
async def test_unused_native_socket_dirs_leave_at_once_and_are_removed_in_the_background(
    kubelet_root: Path, state_dir: Path
) -> None:
    # The last unpublish of a native pair renames the socket dir (and the
    # pod's, when it was the pod's last) out of sockets/ into the trash, as
    # every unpublish does with its volume record, instead of waiting for
    # rmdirs and unlinks; a background pass empties the trash. A pod with a
    # second FUSE volume keeps its pod dir until that one goes too.
    pod = str(uuid.uuid4())
    pair = [
        spec_and_record(kubelet_root, pod_uid=pod),
        spec_and_record(
            kubelet_root, pod_uid=pod, name="data-broker", attributes={"socketFor": "data"}
        ),
    ]
    other = spec_and_record(kubelet_root, pod_uid=pod, name="more")
    async with manager(kubelet_root, state_dir) as volumes:
        for spec, record in [*pair, other]:
            await volumes.publish(spec, record)
        for spec, _ in pair:
            await volumes.unpublish(spec.target, spec.volume_id)
        assert not (state_dir / "sockets" / pod / "data").exists()
        assert is_socket(native_socket(state_dir, pod, "more")), "another volume's dir was moved"
        await volumes.unpublish(other[0].target, other[0].volume_id)
        assert not (state_dir / "sockets" / pod).exists()
        assert records_on_disk(state_dir) == []
        await _trash_emptied(state_dir)
        # The same pod publishing again gets fresh directories.
        await volumes.publish(*pair[0])
        assert is_socket(native_socket(state_dir, pod))
    # Retired by the last unpublish as the driver stopped: the next start
    # removes it.
    async with manager(kubelet_root, state_dir) as volumes:
        await volumes.restore(validator(kubelet_root))
        await _trash_emptied(state_dir)


@pytest.mark.asyncio
async def test_native_socket_dirs_get_their_modes_however_many_levels_are_missing(
    kubelet_root: Path, state_dir: Path
) -> None:
    # The socket dir is made with the fewest mkdirs that work (the deepest
    # first); the upper levels are made when missing, with their modes.
    pods = [str(uuid.uuid4()) for _ in range(2)]
    async with manager(kubelet_root, state_dir) as volumes:
        for pod in pods:  # no sockets/ yet, then no pod dir yet
            await volumes.publish(*spec_and_record(kubelet_root, pod_uid=pod))
            await volumes.publish(
                *spec_and_record(
                    kubelet_root, pod_uid=pod, name="data-broker", attributes={"socketFor": "data"}
                )
            )  # the dir exists already
            assert is_socket(native_socket(state_dir, pod))
        for path, mode in [
            (state_dir / "sockets", 0o711),
            (state_dir / "sockets" / pods[1], 0o711),
            (state_dir / "sockets" / pods[1] / "data", 0o755),
        ]:
            assert stat.S_IMODE(os.stat(path).st_mode) == mode, path


@pytest.mark.asyncio
async def test_publish_and_unpublish_read_no_mountinfo_on_the_common_path(
    kubelet_root: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mountinfo grows with the node (two mounts per FUSE volume) and was
    # read several times per call: the kernel answers for the target instead.
    from csi_async.volumes import targets

    def no_mountinfo(path: str, table: object = None) -> list[object]:
        raise AssertionError(f"mountinfo read for {path}")

    monkeypatch.setattr(targets, "mounts_at", no_mountinfo)
    pod = str(uuid.uuid4())
    specs = [
        spec_and_record(kubelet_root, pod_uid=pod),
        spec_and_record(
            kubelet_root, pod_uid=pod, name="data-broker", attributes={"socketFor": "data"}
        ),
    ]
    async with manager(kubelet_root, state_dir) as volumes:
        for spec, record in specs:
            await volumes.publish(spec, record)
        for spec, _ in specs:
            await volumes.unpublish(spec.target, spec.volume_id)
            assert not Path(spec.target.absolute).exists()
