"""kvcache: share KV-cache blocks across sessions and tenants, route requests to the worker
that holds their prefix, and spill cold blocks down a memory hierarchy.

The public API is what ``__all__`` lists; everything else is private and may change.
"""

from kvcache.cache.config import CacheConfig, TenantQuota
from kvcache.cache.events import BlockRemoved, BlockStored, CacheEvent
from kvcache.cache.hashing import Hasher
from kvcache.cache.manager import Allocation, BlockManager, Prompt
from kvcache.cache.stats import CacheStats, TenantStats
from kvcache.cache.tenancy import PUBLIC_SCOPE, UNSCOPED, Scope
from kvcache.errors import (
    AuthError,
    CapacityError,
    ConfigError,
    CorruptBlockError,
    InvalidTokensError,
    KernelError,
    KVCacheError,
    ModelError,
    ProtocolError,
    QuotaError,
    RequestError,
    ScopeError,
    TierError,
    TraceError,
)

__version__ = "0.1.0"

__all__ = [
    "PUBLIC_SCOPE",
    "Allocation",
    "AuthError",
    "BlockManager",
    "BlockRemoved",
    "BlockStored",
    "CacheConfig",
    "CacheEvent",
    "CacheStats",
    "CapacityError",
    "ConfigError",
    "CorruptBlockError",
    "Hasher",
    "InvalidTokensError",
    "KVCacheError",
    "KernelError",
    "ModelError",
    "Prompt",
    "ProtocolError",
    "QuotaError",
    "RequestError",
    "Scope",
    "ScopeError",
    "TenantQuota",
    "TenantStats",
    "TierError",
    "TraceError",
    "UNSCOPED",
    "__version__",
]
