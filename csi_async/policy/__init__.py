"""What pods may do: mount options and the peer rule, decided from the node's settings."""
