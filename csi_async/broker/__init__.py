"""The fd broker: one listener per published FUSE volume, one session per connection."""
