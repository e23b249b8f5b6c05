"""Who may call the server: tenants, their API keys, share groups, k-anonymity and block quotas.

A config file (TOML or JSON, chosen by extension) lists tenants; each names its API keys, an
optional share group and optional block floor/cap. ``k_anonymity`` applies to every share group::

    host = "127.0.0.1"          # default; bind elsewhere only behind something that terminates TLS
    k_anonymity = 2

    [tenants.acme]
    keys = ["sk-acme-1", "sk-acme-2"]
    group = "partners"           # blocks shared with every tenant of this group (k-anonymous)
    cap_blocks = 512             # per worker: the tenant never owns more blocks than this

    [tenants.globex]
    keys = ["sk-globex"]
    max_share = 0.25             # at most a quarter of each worker's --max-num-seqs seats

``max_share`` (per tenant, or at the top level for every tenant) is the fraction of each
worker's running seats (``--max-num-seqs``) that one tenant's requests may hold at once, waiting
ones included; the front answers 429 past it (``fairness``); 1 is no cap. Default: 1 when the
file defines one tenant, 0.5 otherwise, so one tenant never holds every seat while others exist.
``admin_keys = ["..."]`` (top level) lists the keys that may read the per-tenant series of
``/metrics`` and manage public prefixes (``/admin/public-prefixes``); other callers see
aggregates only.

``[[public_prefixes]]`` declares what every tenant may share: each entry has exactly one of
``system`` (a system message, rendered through the model's chat template the way chat requests
are), ``text`` (a completion prompt's text) or ``token_ids``, and optionally ``model`` (the entry
applies only to a server of that model name)::

    [[public_prefixes]]
    system = "You are a helpful agent. Tools: ..."
    model = "smollm2-135m"

Without a file the server binds to loopback and serves one tenant, ``default``, without keys.
This module only parses and answers "which scope does this key belong to"; it does not serve.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache.cache.config import TenantQuota
from kvcache.cache.tenancy import Scope
from kvcache.errors import AuthError, ConfigError

DEFAULT_TENANT = "default"
LOOPBACK = "127.0.0.1"

_TOP_KEYS = {"host", "k_anonymity", "tenants", "admin_keys", "max_share", "public_prefixes"}
PREFIX_SOURCES = ("system", "text", "token_ids")
_TENANT_KEYS = {"keys", "group", "cap_blocks", "floor_blocks", "max_share"}
SHARED_MAX_SHARE = 0.5  # each tenant's default when several share the workers


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """One tenant: its scope (name and share group), its per-worker block quota and the fraction
    of each worker's running seats its requests may hold (``max_share``)."""

    name: str
    group: str | None = None
    quota: TenantQuota = field(default_factory=TenantQuota)
    max_share: float = 1.0

    @property
    def scope(self) -> Scope:
        return Scope(self.name, group=self.group)


@dataclass(frozen=True, slots=True)
class PublicPrefixSpec:
    """A declared public prefix: ``source`` is ``system``, ``text`` or ``token_ids``; ``model``, when
    given, the only model name it applies to (``serve.public`` renders it to token ids)."""

    source: str
    value: str | tuple[int, ...]
    model: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> PublicPrefixSpec:
        """One ``[[public_prefixes]]`` entry (or an admin request's body); ``ConfigError`` naming
        what is wrong."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a table/object with one of {list(PREFIX_SOURCES)}")
        bad = set(data) - {*PREFIX_SOURCES, "model"}
        if bad:
            raise ConfigError(f"{where}: unknown keys {sorted(bad)}; allowed: {[*PREFIX_SOURCES, 'model']}")
        given = [s for s in PREFIX_SOURCES if s in data]
        if len(given) != 1:
            raise ConfigError(f"{where} must give exactly one of {list(PREFIX_SOURCES)}, not {given}")
        source = given[0]
        value = data[source]
        if source == "token_ids":
            if (
                not isinstance(value, list)
                or not value
                or not all(type(t) is int and 0 <= t < 2**32 for t in value)
            ):
                raise ConfigError(f"{where}.token_ids must be a non-empty list of token ids (integers >= 0)")
            value = tuple(value)
        elif not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{source} must be a non-empty string")
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise ConfigError(f"{where}.model={model!r} must be a non-empty string")
        return cls(source, value, model)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Tenants by API key. ``keys`` empty means no authentication: every caller is ``default``."""

    host: str = LOOPBACK
    k_anonymity: int = 1
    tenants: dict[str, TenantSpec] = field(
        default_factory=lambda: {DEFAULT_TENANT: TenantSpec(DEFAULT_TENANT)}
    )
    keys: dict[str, str] = field(default_factory=dict)  # API key -> tenant name
    admin_keys: frozenset[str] = frozenset()  # may read per-tenant metrics, manage public prefixes
    public_prefixes: tuple[PublicPrefixSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.k_anonymity, int) or self.k_anonymity < 1:
            raise ConfigError(f"k_anonymity={self.k_anonymity!r} must be an integer >= 1")
        for key, tenant in self.keys.items():
            if tenant not in self.tenants:
                raise ConfigError(f"API key ...{key[-4:]} names tenant {tenant!r}, which is not defined")
        if self.admin_keys & set(self.keys):
            raise ConfigError("an admin key is also a tenant's API key; give admins keys of their own")
        if not self.keys and DEFAULT_TENANT not in self.tenants:
            raise ConfigError("a config without API keys must define the tenant 'default'")

    @property
    def requires_auth(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> TenantSpec:
        """The tenant of an ``Authorization: Bearer KEY`` header; raises ``AuthError`` otherwise."""
        if not self.keys:
            return self.tenants[DEFAULT_TENANT]
        if not authorization:
            raise AuthError("missing API key; send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("malformed Authorization header; send 'Authorization: Bearer <key>'")
        tenant = self.keys.get(key.strip())
        if tenant is None:
            raise AuthError("unknown API key")  # never echo the key back
        return self.tenants[tenant]

    def is_admin(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of ``admin_keys``."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        return scheme.lower() == "bearer" and key.strip() in self.admin_keys

    def quotas(self) -> dict[str, TenantQuota]:
        """Quotas for ``CacheConfig.quotas``: only tenants that set one."""
        return {name: t.quota for name, t in self.tenants.items() if t.quota != TenantQuota()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> ServeConfig:
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise ConfigError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
        host = data.get("host", LOOPBACK)
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{source}: host={host!r} must be a non-empty string")
        raw_tenants = data.get("tenants", {})
        if not isinstance(raw_tenants, Mapping) or not raw_tenants:
            raise ConfigError(f"{source}: 'tenants' must be a non-empty table of tenant name -> settings")
        tenants: dict[str, TenantSpec] = {}
        keys: dict[str, str] = {}
        default_share = _share(
            data.get("max_share", 1.0 if len(raw_tenants) == 1 else SHARED_MAX_SHARE), f"{source}: max_share"
        )
        for name, spec in raw_tenants.items():
            where = f"{source}: tenants.{name}"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{where} must be a table")
            bad = set(spec) - _TENANT_KEYS
            if bad:
                raise ConfigError(f"{where}: unknown keys {sorted(bad)}; allowed: {sorted(_TENANT_KEYS)}")
            tenant_keys = spec.get("keys", [])
            if not isinstance(tenant_keys, list) or not all(isinstance(k, str) and k for k in tenant_keys):
                raise ConfigError(f"{where}.keys must be a list of non-empty strings")
            for key in tenant_keys:
                if key in keys:
                    raise ConfigError(f"{where}: API key ...{key[-4:]} is also given to {keys[key]!r}")
                keys[key] = name
            group = spec.get("group")
            if group is not None and (not isinstance(group, str) or not group):
                raise ConfigError(f"{where}.group={group!r} must be a non-empty string")
            cap, floor = spec.get("cap_blocks"), spec.get("floor_blocks", 0)
            for label, value in (("cap_blocks", cap), ("floor_blocks", floor)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ConfigError(f"{where}.{label}={value!r} must be an integer")
            share = _share(spec.get("max_share", default_share), f"{where}.max_share")
            tenants[name] = TenantSpec(name, group, TenantQuota(floor_blocks=floor, cap_blocks=cap), share)
        if not keys:
            raise ConfigError(f"{source}: no tenant has API keys; give each tenant a 'keys' list")
        admin = data.get("admin_keys", [])
        if not isinstance(admin, list) or not all(isinstance(k, str) and k for k in admin):
            raise ConfigError(f"{source}: admin_keys must be a list of non-empty strings")
        raw_prefixes = data.get("public_prefixes", [])
        if not isinstance(raw_prefixes, list):
            raise ConfigError(f"{source}: public_prefixes must be a list of tables ([[public_prefixes]])")
        prefixes = tuple(
            PublicPrefixSpec.from_dict(p, f"{source}: public_prefixes[{i}]")
            for i, p in enumerate(raw_prefixes)
        )
        return cls(
            host=host,
            k_anonymity=data.get("k_anonymity", 1),
            tenants=tenants,
            keys=keys,
            admin_keys=frozenset(admin),
            public_prefixes=prefixes,
        )

    @classmethod
    def load(cls, path: str | Path | None) -> ServeConfig:
        """Read a ``.toml`` or ``.json`` file; ``None`` gives the keyless loopback default."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read server config {path}: {exc.strerror}") from exc
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                raise ConfigError(f"server config {path} must end in .toml or .json")
        except (ValueError, json.JSONDecodeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"server config {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"server config {path} must hold a table/object at the top")
        return cls.from_dict(data, source=str(path))


def _share(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{where}={value!r} must be a fraction in (0, 1], e.g. 0.5")
    return float(value)
