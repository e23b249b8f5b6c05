"""kvcache: share KV-cache blocks across sessions and tenants, route requests to the worker
that holds their prefix, and spill cold blocks down a memory hierarchy.

The public API is what ``__all__`` lists; everything else is private and may change.
"""

from kvcache.config import CacheConfig, TenantQuota
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
from kvcache.events import BlockRemoved, BlockStored, CacheEvent
from kvcache.hashing import Hasher
from kvcache.manager import Allocation, BlockManager, Prompt
from kvcache.stats import CacheStats, TenantStats
from kvcache.tenancy import PUBLIC_SCOPE, UNSCOPED, Scope

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
