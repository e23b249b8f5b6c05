"""The block manager core: hashing, the block pool, eviction, the manager, tenancy, config, stats and
events. The package root (``kvcache``) re-exports its public API."""
