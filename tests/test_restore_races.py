"""A pod racing its meta-fuse socket name cannot keep the real driver from starting.

The real driver process (e2e.driver.DriverProcess) with a meta-fuse volume
whose socket lives in the pod's emptyDir, which the pod can write. A racer
thread (root on the host, standing in for the pod) keeps unlinking the name
and putting a socket, a FIFO or a directory there while the driver is
SIGKILLed and restarted again and again. Guards "restore skips any volume it
cannot set up and the driver always starts" and "OSErrors from pod-writable
places map to FAILED_PRECONDITION" (33c25b8).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_async._proto.csi import v1 as csi
from e2e.driver import DriverProcess
from fusermount3_proxy import protocol
from tests.helpers import publish_request

EMPTY_DIR = "fuse-fd-passing"
SOCKET_NAME = "fuse-csi-ephemeral.sock"
META_FUSE = {"fdPassingEmptyDirName": EMPTY_DIR, "fdPassingSocketName": SOCKET_NAME}
RESTARTS = 12
# In this round the racer parks and a directory holds the name for the whole
# start, so the skip (and what the log says about it) is seen in every run.
PARKED_ROUND = 5


@pytest.fixture
def meta_driver(tmp_path: Path) -> Iterator[DriverProcess]:
    """The real driver; peer check off, so the host can talk to its brokers."""
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    # The CSI socket's path must stay below sun_path's 108 bytes.
    endpoint_dir = Path(tempfile.mkdtemp(prefix="csi-rr-"))
    driver = DriverProcess(
        tmp_path, kubelet, extra_args=["--peer-check", "off"], socket_path=endpoint_dir / "c.sock"
    )
    try:
        yield driver.start()
    finally:
        driver.stop(signal.SIGKILL)
        shutil.rmtree(endpoint_dir, ignore_errors=True)


def make_empty_dir(kubelet: Path, pod_uid: str) -> Path:
    """The pod's emptyDir as kubelet creates it (mode 0777)."""
    path = kubelet / "pods" / pod_uid / "volumes" / "kubernetes.io~empty-dir" / EMPTY_DIR
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def new_log_entries(driver: DriverProcess, offset: int) -> list[dict[str, Any]]:
    """Whole JSON lines the driver logged after byte `offset` of its log."""
    with driver.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    entries = []
    for line in text.splitlines():
        if line.startswith("{") and line.endswith("}"):
            entries.append(json.loads(line))
    return entries


def log_size(driver: DriverProcess) -> int:
    return driver.log_path.stat().st_size if driver.log_path.exists() else 0


def probe_ready(driver: DriverProcess) -> bool:
    response = driver.client.call("/csi.v1.Identity/Probe", csi.ProbeRequest(), csi.ProbeResponse)
    return bool(response.ready)


def unmount_answer(directory: Path, name: str) -> dict[str, Any]:
    """An UNMOUNT on the broker socket `name` in `directory` (nothing is mounted)."""
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(f"/proc/self/fd/{dir_fd}/{name}")
            body = {"op": "unmount", "mountpoint": "/x", "lazy": False, "mount_id": None}
            sock.sendall(protocol.encode_frame(protocol.KIND_REQUEST, body))
            header = sock.recv(protocol.HEADER_SIZE, socket.MSG_WAITALL)
            length = protocol.decode_header(header, protocol.KIND_RESPONSE)
            answer = json.loads(sock.recv(length, socket.MSG_WAITALL))
    finally:
        os.close(dir_fd)
    assert isinstance(answer, dict)
    return answer


class Racer(threading.Thread):
    """Keeps replacing one name in a directory: a socket, a FIFO, a directory, nothing."""

    def __init__(self, directory: Path, name: str) -> None:
        super().__init__(name="socket-name-racer", daemon=True)
        self.directory = directory
        self.name = name
        self.stop = threading.Event()
        # While `hold` is set the racer parks (its name cleared) and says so in `parked`.
        self.hold = threading.Event()
        self.parked = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        dir_fd = os.open(self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while not self.stop.is_set():
                if self.hold.is_set():
                    self._clear(dir_fd)
                    self.parked.set()
                    while self.hold.is_set() and not self.stop.is_set():
                        self.stop.wait(0.01)
                    self.parked.clear()
                for make in (self._bind, self._fifo, self._mkdir):
                    self._clear(dir_fd)
                    make(dir_fd)
                    self._clear(dir_fd)
                self.rounds += 1
            self._clear(dir_fd)
        except BaseException as err:
            self.error = err
        finally:
            os.close(dir_fd)

    def _clear(self, dir_fd: int) -> None:
        try:
            os.unlink(self.name, dir_fd=dir_fd)
        except IsADirectoryError:
            try:
                os.rmdir(self.name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        except FileNotFoundError:
            pass

    def _bind(self, dir_fd: int) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.bind(f"/proc/self/fd/{dir_fd}/{self.name}")
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise

    def _fifo(self, dir_fd: int) -> None:
        try:
            os.mkfifo(self.name, dir_fd=dir_fd)
        except FileExistsError:
            pass

    def _mkdir(self, dir_fd: int) -> None:
        try:
            os.mkdir(self.name, dir_fd=dir_fd)
        except FileExistsError:
            pass


def test_restarts_under_a_socket_name_race_always_start_and_unpublish_cleans_up(
    meta_driver: DriverProcess,
) -> None:
    driver = meta_driver
    pod = str(uuid.uuid4())
    empty_dir = make_empty_dir(driver.kubelet_root, pod)
    request = publish_request(driver.kubelet_root, pod_uid=pod, attributes=META_FUSE)
    driver.client.node_publish(request)
    assert unmount_answer(empty_dir, SOCKET_NAME)["errno"] == errno.EINVAL

    racer = Racer(empty_dir, SOCKET_NAME)
    racer.start()
    outcomes: list[str] = []
    try:
        for round_ in range(RESTARTS):
            driver.stop(signal.SIGKILL)
            if round_ == PARKED_ROUND:
                racer.hold.set()
                assert racer.parked.wait(30), "the racer did not park"
                (empty_dir / SOCKET_NAME).mkdir()
            offset = log_size(driver)
            driver.start()  # raises if the driver exits or never becomes ready
            if round_ == PARKED_ROUND:
                (empty_dir / SOCKET_NAME).rmdir()
                racer.hold.clear()
            assert probe_ready(driver)
            entries = new_log_entries(driver, offset)
            serving = [e for e in entries if e.get("msg") == "serving"]
            assert len(serving) == 1, entries
            skipped = [
                e for e in entries if str(e.get("msg", "")).startswith("volume not restored")
            ]
            audited = [
                e for e in entries
                if e.get("logger") == "csi_async.audit" and e.get("decision") == "skipped"
            ]  # fmt: skip
            assert not [e for e in entries if e.get("msg") == "restoring a volume failed"], (
                "the race surfaced as an unexpected error, not a refusal"
            )
            if serving[0]["restored_volumes"] == 1:
                assert round_ != PARKED_ROUND, "restored over a directory on its socket name"
                assert not skipped and not audited, entries
                outcomes.append("restored")
                continue
            assert serving[0]["restored_volumes"] == 0, serving
            # The log names the volume that was left out, and why.
            assert len(skipped) == 1 and len(audited) == 1, entries
            for entry in (skipped[0], audited[0]):
                assert entry["target_path"] == request.target_path
                assert entry["volume_id"] == request.volume_id
            assert "cannot create the broker socket" in skipped[0]["msg"], skipped
            outcomes.append("skipped")
    finally:
        racer.stop.set()
        racer.join(30)
    assert racer.error is None, racer.error
    assert not racer.is_alive()
    assert racer.rounds > RESTARTS, "the racer hardly ran"
    assert len(outcomes) == RESTARTS and outcomes[PARKED_ROUND] == "skipped"

    # With the race over, the next start restores the volume and serves it.
    driver.stop(signal.SIGKILL)
    offset = log_size(driver)
    driver.start()
    serving = [e for e in new_log_entries(driver, offset) if e.get("msg") == "serving"]
    assert serving[0]["restored_volumes"] == 1, serving
    assert unmount_answer(empty_dir, SOCKET_NAME)["errno"] == errno.EINVAL

    driver.client.node_unpublish(request.volume_id, request.target_path)
    assert not Path(request.target_path).exists()
    assert os.listdir(empty_dir) == []
    assert list((driver.state_dir / "volumes").glob("*.json")) == []
    assert not (driver.state_dir / "sockets" / pod).exists()
    assert probe_ready(driver)


@pytest.mark.parametrize("squatter", ["directory", "fifo", "file"])
def test_a_non_socket_under_the_socket_name_fails_publish_with_failed_precondition(
    meta_driver: DriverProcess, squatter: str
) -> None:
    driver = meta_driver
    pod = str(uuid.uuid4())
    empty_dir = make_empty_dir(driver.kubelet_root, pod)
    planted = empty_dir / SOCKET_NAME
    if squatter == "directory":
        planted.mkdir()
        (planted / "kept").write_text("the pod's file")
    elif squatter == "fifo":
        os.mkfifo(planted)
    else:
        planted.write_text("the pod's file")
    request = publish_request(driver.kubelet_root, pod_uid=pod, attributes=META_FUSE)
    with pytest.raises(grpc.RpcError) as raised:
        driver.client.node_publish(request)
    error: Any = raised.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert error.details() == (
        f"cannot create the broker socket {SOCKET_NAME!r}: "
        f"{SOCKET_NAME!r} exists and is not a socket"
    )
    # Nothing of the volume is left, and nothing of the pod's was touched.
    assert not Path(request.target_path).exists()
    assert list((driver.state_dir / "volumes").glob("*.json")) == []
    assert os.listdir(empty_dir) == [SOCKET_NAME]
    if squatter == "directory":
        assert (planted / "kept").read_text() == "the pod's file"
    assert probe_ready(driver)
    # Once the pod clears the name, kubelet's retry succeeds.
    if squatter == "directory":
        shutil.rmtree(planted)
    else:
        planted.unlink()
    driver.client.node_publish(request)
    assert unmount_answer(empty_dir, SOCKET_NAME)["errno"] == errno.EINVAL
    driver.client.node_unpublish(request.volume_id, request.target_path)
    assert os.listdir(empty_dir) == []


def test_every_socket_name_that_validates_can_be_bound(meta_driver: DriverProcess) -> None:
    """fdPassingSocketName allows 100 characters; the broker must then bind that name.

    The socket is bound through /proc/self/fd/<dirfd>/<name>, and sun_path
    holds 107 bytes: with a two-digit dir fd, names from 91 characters fail
    with "AF_UNIX path too long" (fewer as the driver's fd numbers grow), a
    publish kubelet retries forever. A name the driver can never bind must
    be refused by validation (INVALID_ARGUMENT), or work.
    """
    driver = meta_driver
    pod = str(uuid.uuid4())
    empty_dir = make_empty_dir(driver.kubelet_root, pod)
    longest = "s" * 100  # csi/requests.py: _SOCKET_NAME allows 1 + 99 characters
    attributes = {"fdPassingEmptyDirName": EMPTY_DIR, "fdPassingSocketName": longest}
    request = publish_request(driver.kubelet_root, pod_uid=pod, attributes=attributes)
    try:
        driver.client.node_publish(request)
    except grpc.RpcError as raised:
        error: Any = raised
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        return
    assert os.listdir(empty_dir) == [longest]
    driver.client.node_unpublish(request.volume_id, request.target_path)
