"""Who a request belongs to, and which chain scope its blocks are keyed in.

A ``Scope`` is set by the embedding server from the authenticated caller, never parsed from
request content. Its ``chain_scope`` enters the root of the hash chain (see ``hashing``), so two
tenants sending the same tokens get different keys and cannot hit, probe or overwrite each
other's blocks: there is no check to forget at lookup time.

- private (default): ``Scope("acme")`` -> chain scope ``"tenant:acme"``;
- share group: ``Scope("acme", group="partners")`` -> ``"group:partners"``, shared by every
  tenant of that group, subject to k-anonymity (``CacheConfig.k_anonymity``);
- salted: ``Scope("acme", salt="s")`` narrows the scope it would have without the salt (here
  ``"tenant:acme"``) to a sub-scope of it: ``"salted:11:tenant:acme:s"`` (the length fixes where
  the parent ends). A salt is what a caller may choose (vLLM's ``cache_salt``); it can only
  split its own scope further, never name another, and a salted chain shares nothing with the
  unsalted one. Quotas and statistics still count the tenant;
- public: prefixes an operator published with ``BlockManager.publish``; every scope's chain
  runs through them first and continues in its own scope after them;
- unscoped: a call without a scope gets ``UNSCOPED`` (tenant ``""``, chain scope ``"unscoped"``),
  a namespace no tenant or group name can produce, so a real tenant named ``"default"`` never
  shares blocks, stats or quotas with unscoped calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcache.errors import ScopeError

PUBLIC_SCOPE = "public"
MAX_SALT_CHARS = 256  # a salt is stored with every block its requests cache


@dataclass(frozen=True, slots=True)
class Scope:
    tenant: str
    group: str | None = None
    salt: str | None = None
    # What enters the chain root; computed once, since every hashed prompt reads it.
    chain_scope: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ScopeError(f"tenant={self.tenant!r} must be a non-empty string")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ScopeError(f"group={self.group!r} must be None or a non-empty string")
        salt = self.salt
        if salt is not None and (not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT_CHARS):
            raise ScopeError(f"salt={salt!r:.80} must be None or a string of 1..{MAX_SALT_CHARS} characters")
        chain = f"group:{self.group}" if self.group is not None else f"tenant:{self.tenant}"
        if salt is not None:
            chain = f"salted:{len(chain)}:{chain}:{salt}"
        object.__setattr__(self, "chain_scope", chain)

    @property
    def is_shared(self) -> bool:
        return self.group is not None


def _unscoped() -> Scope:
    scope = object.__new__(Scope)  # bypasses validation: "" is no tenant a caller can name
    object.__setattr__(scope, "tenant", "")
    object.__setattr__(scope, "group", None)
    object.__setattr__(scope, "salt", None)
    object.__setattr__(scope, "chain_scope", "unscoped")
    return scope


UNSCOPED = _unscoped()


def as_scope(scope: Scope | str | None) -> Scope:
    """Accept a ``Scope``, a bare tenant name, or None (the reserved unscoped namespace)."""
    if scope is None:
        return UNSCOPED
    if isinstance(scope, Scope):
        return scope
    if isinstance(scope, str):
        return Scope(scope)
    raise ScopeError(f"scope={scope!r} must be a Scope, a tenant name or None")
