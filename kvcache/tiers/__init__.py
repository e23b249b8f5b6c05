"""The spill hierarchy below the device pool (G1, the engine's own): host memory (G2), local disk (G3) and a
pod-shared tier (ICMS).

Import from here; the modules behind it are private. ``Hierarchy`` is what an engine uses; the
tiers can also be used one by one. ``kvcache.lab.sim_tiers`` runs this hierarchy over key-only
tiers for the trace replay.
"""

from kvcache.tiers.backends import BackendUnavailable, InProcessBackend, RedisBackend
from kvcache.tiers.base import LayoutFingerprint, Tier, TierKey, TierStats, TransferModel
from kvcache.tiers.disk import DiskTier
from kvcache.tiers.hierarchy import Hierarchy, HierarchyStats
from kvcache.tiers.host import HostTier
from kvcache.tiers.icms import IcmsLink, IcmsTier
from kvcache.tiers.policy import TierPolicy, best_load_prefix
from kvcache.tiers.seal import Seal

__all__ = [
    "BackendUnavailable",
    "DiskTier",
    "Hierarchy",
    "HierarchyStats",
    "HostTier",
    "IcmsLink",
    "IcmsTier",
    "InProcessBackend",
    "LayoutFingerprint",
    "RedisBackend",
    "Seal",
    "Tier",
    "TierKey",
    "TierPolicy",
    "TierStats",
    "TransferModel",
    "best_load_prefix",
]
