"""End-to-end test infrastructure: an emulated Kubernetes node for csi-async.

* `e2e.hostenv.KubeletRoot` — a kubelet root dir that is a shared mount;
* `e2e.kubelet.KubeletEmulator` — kubelet's CSI calls for inline volumes and static
  PersistentVolumes (grpcio);
* `e2e.sandbox.PodSandbox` — pod containers as sandboxed unprivileged processes.

Submodules are not imported here so that `e2e.sandbox_init` (run as a plain
script as root) and the CLI stay cheap to start.
"""
