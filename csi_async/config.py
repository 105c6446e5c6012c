"""Driver settings, defined once: csi_async/cli.py makes a flag and an environment variable
of each field (its description is the flag's help, its default the flag's default).

A plain pydantic model, not pydantic-settings: click reads the flags and the environment
(flag > environment > default), this model only validates, and the driver does not keep a
settings framework (and python-dotenv) in memory for the whole of its life.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_DRIVER_NAME = "fuse.csi-async.dev"
DEFAULT_DEVICE_RESOURCE = "fuse.csi-async.dev/fuse"
# kubelet's rule for an extended resource name: a DNS subdomain prefix outside
# kubernetes.io, a slash, and a name of up to 63 characters (IsExtendedResourceName).
_RESOURCE_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# CSI's rule for plugin names, as csi-sanity checks it.
_DRIVER_NAME = re.compile(r"^[a-zA-Z][A-Za-z0-9-._]{0,61}[a-zA-Z]$")

# Every field can also be set as ENV_PREFIX + its name in capitals (CSI_ASYNC_STATE_DIR).
ENV_PREFIX = "CSI_ASYNC_"
# A field's json_schema_extra key naming one more variable, read when the prefixed one is
# unset or empty.
ENV_FALLBACK = "env_fallback"

LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseModel):
    """Everything `csi-async serve` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(
        default="unix:///csi/csi.sock",
        description="CSI endpoint kubelet and the registrar dial: unix:///absolute/path.",
    )
    node_id: str = Field(
        min_length=1,
        # The Downward API's spec.nodeName, as the node plugin's pod spec usually names it.
        json_schema_extra={ENV_FALLBACK: "NODE_NAME"},
        description="This node's id, reported by NodeGetInfo (required).",
    )
    driver_name: str = Field(
        default=DEFAULT_DRIVER_NAME,
        description="CSI driver name; must equal the CSIDriver object's name.",
    )
    kubelet_root: Path = Field(
        default=Path("/var/lib/kubelet"),
        description="The kubelet's root directory (--root-dir); target paths must be below it.",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/csi-async"),
        description="Where the driver keeps volume and mount records and native-mode broker "
        "sockets.",
    )
    log_level: LogLevel = Field(default="info", description="Log verbosity.")
    allow_other: bool = Field(
        default=True,
        description="Mount FUSE with allow_other, so containers running as other uids "
        "can use the mount (default_permissions only when the program asks for it). "
        "Off: pods may not ask for it; a PersistentVolume's own options still may.",
    )

    peer_check: Literal["cgroup", "off"] = Field(
        default="cgroup",
        description="cgroup: a broker socket only serves processes of its own pod (their "
        "cgroup names the pod UID). off: skip the check (the node emulator; not for clusters).",
    )
    audit_log: Path | None = Field(
        default=None,
        description="File to append the broker's audit lines to (JSON, one per privileged "
        "request); default: stderr.",
    )
    metrics_address: str = Field(
        default="",
        description="host:port (e.g. :9809) for the Prometheus /metrics endpoint; empty: off.",
    )
    max_connections: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Broker requests doing privileged work (mount syscalls) at once, node-wide; "
        "a request waits up to 5 s for a slot, then gets EAGAIN.",
    )
    max_connections_per_pod: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Broker connections one pod may hold open at once, across all its volumes; "
        "more are refused with EAGAIN.",
    )

    device_plugin: bool = Field(
        default=True,
        description="Serve kubelet's device plugin API: pods that ask for the resource get "
        "/dev/fuse, so FUSE programs run with their ordinary command lines.",
    )
    device_plugin_dir: Path | None = Field(
        default=None,
        description="kubelet's device plugin directory (kubelet.sock is there); the plugin's "
        "socket goes there too. Default: device-plugins in the kubelet root.",
    )
    device_plugin_resource: str = Field(
        default=DEFAULT_DEVICE_RESOURCE,
        description="The extended resource pods ask for in resources.limits.",
    )
    device_plugin_devices: int = Field(
        default=1000,
        ge=1,
        le=10000,
        description="How many containers of this node may hold the resource at once (all "
        "share the one /dev/fuse).",
    )

    @field_validator("device_plugin_resource")
    @classmethod
    def _extended_resource(cls, value: str) -> str:
        prefix, sep, name = value.partition("/")
        if (
            not sep
            or len(prefix) > 253
            or not _RESOURCE_PREFIX.match(prefix)
            or len(name) > 63
            or not _RESOURCE_NAME.match(name)
        ):
            raise ValueError("must be domain/name, e.g. fuse.csi-async.dev/fuse")
        if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
            raise ValueError("must not be in the kubernetes.io domain (kubelet refuses it)")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            _, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port or :port")
        return value

    @field_validator("endpoint")
    @classmethod
    def _unix_endpoint(cls, value: str) -> str:
        if not value.startswith("unix:///"):
            raise ValueError("must be unix:///absolute/path (only Unix sockets are served)")
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if len(value.encode()) > 256:
            raise ValueError("must be at most 256 bytes (CSI limit)")
        return value

    @field_validator("driver_name")
    @classmethod
    def _driver_name(cls, value: str) -> str:
        if not _DRIVER_NAME.match(value):
            raise ValueError(
                "must be 2-63 characters of letters, digits, '-', '.', '_', "
                "starting and ending with a letter"
            )
        return value

    @field_validator("kubelet_root", "state_dir", "audit_log", "device_plugin_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_absolute() or ".." in value.parts:
            raise ValueError("must be an absolute path without '..'")
        return Path(str(value).rstrip("/") or "/")

    @property
    def socket_path(self) -> str:
        return self.endpoint.removeprefix("unix://")

    @property
    def device_plugin_directory(self) -> Path:
        """--device-plugin-dir, or kubelet's own (pluginapi.DevicePluginPath) below its root."""
        if self.device_plugin_dir is not None:
            return self.device_plugin_dir
        return self.kubelet_root / "device-plugins"


def env_vars(name: str) -> tuple[str, ...]:
    """The environment variables that set field `name`, the first one set and non-empty wins."""
    names = [ENV_PREFIX + name.upper()]
    extra = Settings.model_fields[name].json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get(ENV_FALLBACK), str):
        names.append(str(extra[ENV_FALLBACK]))
    return tuple(names)
