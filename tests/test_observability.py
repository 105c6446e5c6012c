"""Metrics and audit lines, as docs/operations.md documents them.

A real driver with --metrics-address and --audit-log; a pod mounts libfuse's
hello through the zipapp, gets refused once by policy (SELinux context) and
once by the peer check (a process outside the pod), unmounts, then has its
daemon killed (the broker detaches the dead mount). /metrics is scraped
between the steps and the audit file is checked line by line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.kubelet import CsiError, Pod
from e2e.node import NATIVE_SOCKET_DIR, Node
from fusermount3_proxy import protocol

DATA = "/run/data"
HELLO_TEXT = "Hello World!\n"
CONTEXT = "context=system_u:object_r:tmp_t:s0"
EPERM, EACCES = 1, 13
TIME_FORMAT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
AUDIT_FIELDS = {
    "time", "level", "logger", "msg", "op", "decision", "errno", "detail", "effective",
    "volume_id", "target_path", "pod_uid", "pod_namespace", "pod_name",
    "peer_pid", "peer_uid", "peer_gid", "peer_pod_uid", "duration_ms",
}  # fmt: skip
EFFECTIVE_FIELDS = {
    "fstype", "source", "read_only", "flags", "mount_attrs", "user_id", "group_id",
}  # fmt: skip

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Metrics:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.scrape().get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """The sum over every label set that includes `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.scrape().items() if n == name and wanted <= ls)

    def wait_for(self, name: str, expected: float, timeout: float = 10.0, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        while (value := self.value(name, **labels)) != expected:
            assert time.monotonic() < deadline, f"{name}{labels} = {value}, expected {expected}"
            time.sleep(0.05)


@pytest.fixture
def observed(
    tmp_path: Path, zipapp: Path, fuse_examples_on_host: Path
) -> Iterator[tuple[Node, Metrics, Path]]:
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    args = ["--metrics-address", f"127.0.0.1:{port}", "--audit-log", str(audit)]
    binds = {"/run/examples": fuse_examples_on_host}
    with Node(tmp_path, zipapp, shared_binds=binds, driver_args=args) as node:
        yield node, Metrics(port), audit


def audit_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_audit(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    """The audit is written after the answer is sent: wait for the line."""
    deadline = time.monotonic() + timeout
    while len(lines := audit_lines(path)) < count:
        assert time.monotonic() < deadline, f"{len(lines)} audit lines, expected {count}"
        time.sleep(0.05)
    return lines


def raw_mount_from_the_host(socket_dir: Path, options: list[str]) -> dict[str, object]:
    """A mount request from this test process, which runs in no pod."""
    body = {"op": "mount", "options": options, "mountpoint": DATA, "auto_unmount": False}
    directory = os.open(socket_dir, os.O_PATH | os.O_CLOEXEC)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        try:
            sock.connect(f"/proc/self/fd/{directory}/fuse.sock")
        finally:
            os.close(directory)
        sock.sendall(protocol.encode_frame(protocol.KIND_REQUEST, body))
        header = sock.recv(protocol.HEADER_SIZE, socket.MSG_WAITALL)
        length = protocol.decode_header(header, protocol.KIND_RESPONSE)
        return dict(json.loads(sock.recv(length, socket.MSG_WAITALL)))


def test_metrics_and_audit_lines_follow_the_documentation(
    observed: tuple[Node, Metrics, Path], fuse_examples: Path
) -> None:
    node, metrics, audit = observed
    assert node.pod_cgroups, "the peer check needs cgroup v2"
    rpc = "csi_async_rpc_requests_total"
    broker = "csi_async_broker_requests_total"
    refusals = "csi_async_broker_refusals_total"
    live, published = "csi_async_live_mounts", "csi_async_published_volumes"

    # Before any volume: the gauges exist and are 0; the readiness Probe counted.
    assert metrics.value(live) == 0
    assert metrics.value(published) == 0
    probes = metrics.value(rpc, method="Probe", code="OK")
    assert probes is not None and probes >= 1

    pod = Pod("app")
    volume = node.publish_fuse_volume(pod)  # the FUSE volume and its socket volume
    assert metrics.value(rpc, method="NodePublishVolume", code="OK") == 2
    assert metrics.value(published) == 2
    # A publish refused by policy is counted with its gRPC code, and publishes nothing.
    with pytest.raises(CsiError) as refused:
        node.publish(Pod("refused"), "data", {"mountOptions": "suid"})
    assert refused.value.code.name == "INVALID_ARGUMENT"
    assert metrics.value(rpc, method="NodePublishVolume", code="INVALID_ARGUMENT") == 1
    assert metrics.value("csi_async_rpc_duration_seconds_count", method="NodePublishVolume") == 3
    assert metrics.value(published) == 2

    # Refused by policy: an SELinux context from the pod's own FUSE program.
    sandbox = node.sandbox(volume.binds(DATA))
    context = sandbox.run([str(fuse_examples / "hello"), "-f", "-o", CONTEXT, DATA],
                          capture_output=True, timeout=30)  # fmt: skip
    assert context.returncode != 0
    assert f"option '{CONTEXT}' refused" in context.stderr.decode()
    # libfuse asks twice: with its subtype option, then again without it.
    wait_for_audit(audit, 2)
    assert metrics.value(broker, op="mount", decision="refused") == 2
    assert metrics.value(refusals, reason="policy") == 2

    # Refused by the peer check: a process that does not run in the pod.
    answer = raw_mount_from_the_host(volume.socket_binds[NATIVE_SOCKET_DIR], ["suid"])
    assert answer["ok"] is False and answer["errno"] == EACCES
    wait_for_audit(audit, 3)
    assert metrics.value(broker, op="mount", decision="refused") == 3
    assert metrics.value(refusals, reason="peer") == 1
    assert metrics.value(live) == 0

    # Allowed: hello mounts through the zipapp.
    hello = sandbox.spawn([str(fuse_examples / "hello"), "-f", DATA],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    node.wait_mounted(volume.target)
    assert (volume.target / "hello").read_text() == HELLO_TEXT
    wait_for_audit(audit, 4)
    assert metrics.value(broker, op="mount", decision="allowed") == 1
    assert metrics.value(live) == 1
    assert metrics.value("csi_async_broker_duration_seconds_count", op="mount") == 4

    # Unmounted by fusermount3 -u: the gauge goes back to 0.
    unmount = sandbox.run(["fusermount3", "-u", DATA], capture_output=True, timeout=30)
    assert unmount.returncode == 0, unmount.stderr
    node.wait_unmounted(volume.target)
    assert hello.wait(15) == 0
    metrics.wait_for(live, 0)
    assert (metrics.value(broker, op="unmount", decision="allowed") or 0) >= 1
    assert metrics.value("csi_async_dead_mounts_detached_total") == 0

    # A daemon killed outright: the broker detaches its dead mount and counts it.
    second = sandbox.spawn([str(fuse_examples / "hello"), "-f", DATA],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    node.wait_mounted(volume.target)
    metrics.wait_for(live, 1)
    second.kill()
    second.wait(15)
    node.wait_unmounted(volume.target)
    metrics.wait_for("csi_async_dead_mounts_detached_total", 1)
    metrics.wait_for(live, 0)
    assert metrics.value(broker, op="mount", decision="allowed") == 2

    node.unpublish(pod, "data")
    node.unpublish(pod, "data-broker")
    assert metrics.value(rpc, method="NodeUnpublishVolume", code="OK") == 2
    assert metrics.value(published) == 0
    # The documented types: counters, histograms (with buckets), gauges.
    samples = metrics.scrape()
    names = {name for name, _ in samples}
    for histogram in ("csi_async_rpc_duration_seconds", "csi_async_broker_duration_seconds"):
        assert {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"} <= names

    # ---- the audit file: one JSON line per broker request, nothing else.
    requests = int(metrics.total(broker))
    lines = wait_for_audit(audit, requests)
    assert len(lines) == requests
    for line in lines:
        assert set(line) >= AUDIT_FIELDS, sorted(AUDIT_FIELDS - set(line))
        assert line["logger"] == "csi_async.audit"
        assert TIME_FORMAT.match(str(line["time"])), line["time"]
        assert line["op"] in ("mount", "unmount")
        assert line["decision"] in ("allowed", "refused", "failed")
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
        assert line["volume_id"] == node.kubelet.volume_id(pod, "data")
        assert line["target_path"] == str(volume.target)
        assert (line["pod_uid"], line["pod_namespace"], line["pod_name"]) == (
            pod.uid, "default", "app",
        )  # fmt: skip
        assert isinstance(line["peer_pid"], int) and line["peer_pid"] > 0
        assert (line["decision"] == "allowed") == (line["errno"] == 0), line
    # Metrics and audit agree, decision by decision.
    for op in ("mount", "unmount"):
        for decision in ("allowed", "refused", "failed"):
            counted = metrics.value(broker, op=op, decision=decision) or 0
            audited = [x for x in lines if (x["op"], x["decision"]) == (op, decision)]
            assert len(audited) == counted, (op, decision)

    mounts = [x for x in lines if x["op"] == "mount"]
    assert [(x["decision"], x["errno"]) for x in mounts] == [
        ("refused", EPERM), ("refused", EPERM), ("refused", EACCES), ("allowed", 0),
        ("allowed", 0),
    ]  # fmt: skip
    peer, allowed = mounts[2], mounts[3]
    # The pod's program, refused by policy: its ids and pod, and the reason.
    for policy in mounts[:2]:
        assert CONTEXT in str(policy["detail"])
        assert (policy["peer_uid"], policy["peer_gid"]) == (65534, 65534)
        assert policy["peer_pod_uid"] == pod.uid
        assert policy["effective"] == {}
    # The host process: no pod in its cgroup, refused before any policy.
    assert (peer["decision"], peer["errno"]) == ("refused", EACCES)
    assert "does not run in that pod" in str(peer["detail"])
    assert (peer["peer_pid"], peer["peer_uid"], peer["peer_gid"]) == (
        os.getpid(), os.getuid(), os.getgid(),
    )  # fmt: skip
    assert peer["peer_pod_uid"] is None
    # The allowed mount: what the kernel got.
    assert (allowed["decision"], allowed["errno"], allowed["detail"]) == ("allowed", 0, "")
    assert allowed["peer_pod_uid"] == pod.uid
    assert (allowed["peer_uid"], allowed["peer_gid"]) == (65534, 65534)
    effective = allowed["effective"]
    assert isinstance(effective, dict)
    assert set(effective) >= EFFECTIVE_FIELDS, sorted(EFFECTIVE_FIELDS - set(effective))
    assert effective["fstype"] == "fuse.hello"
    assert effective["read_only"] is False
    assert (effective["user_id"], effective["group_id"]) == (65534, 65534)
    assert effective["flags"] == ["allow_other"]
    assert isinstance(effective["mount_attrs"], int)
    assert isinstance(effective["source"], str) and effective["source"]
    unmounts = [x for x in lines if x["op"] == "unmount"]
    assert unmounts and unmounts[0]["decision"] == "allowed"
    assert unmounts[0]["effective"] == {}
    # With --audit-log, no audit line goes to the driver's own log.
    assert not [e for e in node.driver.log_entries() if e.get("logger") == "csi_async.audit"]
