"""What kubelet gives the driver, parsed once: target paths, volume contexts, its layout."""
