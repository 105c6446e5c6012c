"""Mechanism only: the kernel calls that mount, detach and read the mount table."""
