"""Sharding: the logical-axis rules, meshes, multi-host start-up, batch placement, shard plans."""
