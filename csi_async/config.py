"""Driver settings: command-line flags, or CSI_ASYNC_* environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DRIVER_NAME = "fuse.csi-async.dev"
# CSI's rule for plugin names, as csi-sanity checks it.
_DRIVER_NAME = re.compile(r"^[a-zA-Z][A-Za-z0-9-._]{0,61}[a-zA-Z]$")

LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseSettings):
    """Everything `csi-async serve` needs. Flags win over the environment."""

    model_config = SettingsConfigDict(env_prefix="CSI_ASYNC_", extra="forbid", frozen=True)

    endpoint: str = Field(
        default="unix:///csi/csi.sock",
        description="CSI endpoint the kubelet dials: unix:///absolute/path.",
    )
    node_id: str = Field(
        default="",
        validation_alias=AliasChoices("node_id", "CSI_ASYNC_NODE_ID", "NODE_NAME"),
        description="This node's id in NodeGetInfo (default: $NODE_NAME).",
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
        description="Where the driver keeps volume records and native-mode broker sockets.",
    )
    log_level: LogLevel = Field(default="info", description="Log verbosity.")
    allow_other: bool = Field(
        default=True,
        description="Mount FUSE with allow_other (with default_permissions), so "
        "containers running as other uids can read the mount.",
    )

    peer_check: Literal["cgroup", "off"] = Field(
        default="cgroup",
        description="cgroup: a broker socket only serves processes of its own pod (their "
        "cgroup names the pod UID). off: skip the check (the node emulator; not for clusters).",
    )
    audit_log: Path | None = Field(
        default=None,
        description="File to append the broker's audit lines to (JSON); default: stderr.",
    )
    metrics_address: str = Field(
        default="",
        description="host:port for the Prometheus /metrics endpoint; empty: off.",
    )
    max_connections: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Broker requests doing privileged work (mount syscalls) at once, node-wide.",
    )
    max_connections_per_pod: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Broker connections one pod may hold open at once, across all its volumes.",
    )

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

    @field_validator("kubelet_root", "state_dir", "audit_log")
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
