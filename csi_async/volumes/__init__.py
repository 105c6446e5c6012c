"""The registry of published volumes: target directories, socket directories, records."""
