"""Command line: `csi-async serve`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import click
from pydantic import ValidationError

from csi_async import __version__, logs
from csi_async.config import DEFAULT_DRIVER_NAME, Settings
from csi_async.server import serve as serve_forever


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="csi-async")
def main() -> None:
    """csi-async: run any FUSE filesystem in unprivileged Kubernetes pods.

    A CSI node plugin with an fd broker: pods mount FUSE through a
    fusermount3 drop-in, without CAP_SYS_ADMIN or /dev/fuse.
    """


@main.command()
@click.option(
    "--endpoint",
    help="CSI endpoint, unix:///path  [env CSI_ASYNC_ENDPOINT; default unix:///csi/csi.sock]",
)
@click.option(
    "--node-id", help="Node id reported by NodeGetInfo  [env CSI_ASYNC_NODE_ID or NODE_NAME]"
)
@click.option(
    "--driver-name",
    help="CSI driver name; must match the CSIDriver object  "
    f"[env CSI_ASYNC_DRIVER_NAME; default {DEFAULT_DRIVER_NAME}]",
)
@click.option(
    "--kubelet-root",
    type=click.Path(path_type=Path),
    help="kubelet root "
    "directory; target paths must be below it  [env CSI_ASYNC_KUBELET_ROOT; "
    "default /var/lib/kubelet]",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    help="driver state and "
    "native-mode broker sockets  [env CSI_ASYNC_STATE_DIR; default /var/lib/csi-async]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="log verbosity  [env CSI_ASYNC_LOG_LEVEL; default info]",
)
@click.option(
    "--allow-other/--no-allow-other",
    default=None,
    help="mount FUSE with "
    "allow_other,default_permissions so other uids in the pod can read it  "
    "[env CSI_ASYNC_ALLOW_OTHER; default on]",
)
@click.option(
    "--peer-check",
    type=click.Choice(["cgroup", "off"]),
    help="cgroup: a broker socket serves only processes of its own pod (by the pod UID in "
    "their cgroup); off: no check, for test benches only  [env CSI_ASYNC_PEER_CHECK; "
    "default cgroup]",
)
@click.option(
    "--audit-log",
    type=click.Path(path_type=Path),
    help="append the broker's audit lines (JSON, one per privileged request) to this file  "
    "[env CSI_ASYNC_AUDIT_LOG; default: stderr]",
)
@click.option(
    "--metrics-address",
    help="serve Prometheus metrics on host:port (e.g. :9809)  [env CSI_ASYNC_METRICS_ADDRESS; "
    "default off]",
)
@click.option(
    "--max-connections",
    type=int,
    help="broker requests doing privileged work (mount syscalls) at once, node-wide; a "
    "request waits up to 5 s for a slot, then gets EAGAIN  [env CSI_ASYNC_MAX_CONNECTIONS; "
    "default 64]",
)
@click.option(
    "--max-connections-per-pod",
    type=int,
    help="broker connections one pod may hold open at once across all its volumes; more are "
    "refused with EAGAIN  [env CSI_ASYNC_MAX_CONNECTIONS_PER_POD; default 16]",
)
def serve(**flags: Any) -> None:
    """Serve the CSI Identity and Node services and the fd broker.

    Every flag can also come from the environment variable shown; a flag
    wins over the environment. Logs are JSON lines on stderr.
    """
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as err:
        for problem in err.errors():
            where = "--" + "-".join(str(p) for p in problem["loc"]).replace("_", "-")
            click.echo(f"csi-async: invalid {where}: {problem['msg']}", err=True)
        sys.exit(2)
    if not settings.node_id:
        click.echo("csi-async: a node id is required: --node-id or $NODE_NAME", err=True)
        sys.exit(2)
    logs.setup(settings.log_level, settings.audit_log)
    anyio.run(serve_forever, settings)
