"""kubelet's device plugin API for /dev/fuse: a resource pods ask for in `resources.limits`.

With it a pod gets a real /dev/fuse node, which libfuse opens before it runs fusermount3,
so FUSE programs run with their ordinary command lines. The node opens a FUSE connection
only: mounting still needs CAP_SYS_ADMIN, so the mount is still the broker's.

devices.py: the advertised devices and Allocate's answer; health.py: whether /dev/fuse is
usable; service.py: the DevicePlugin gRPC service; registration.py: the Register call to
kubelet; plugin.py: the socket, the registration and the watch for kubelet restarts.
"""
