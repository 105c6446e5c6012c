"""The CSI gRPC surface: Identity and Node services on grpclib."""
