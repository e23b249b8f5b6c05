"""Server config: API keys to tenants, share groups, quotas; errors name the bad value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache.cache.config import TenantQuota
from kvcache.cache.tenancy import Scope
from kvcache.errors import AuthError, ConfigError
from kvcache.serve.config import ServeConfig, TenantSpec

TOML = """
k_anonymity = 2
[tenants.acme]
keys = ["sk-acme-1", "sk-acme-2"]
group = "partners"
cap_blocks = 64
[tenants.globex]
keys = ["sk-globex"]
floor_blocks = 4
"""


def test_no_config_is_keyless_loopback_default_tenant() -> None:
    config = ServeConfig.load(None)
    assert config.host == "127.0.0.1"
    assert not config.requires_auth
    assert config.authenticate(None) == TenantSpec("default")
    assert config.authenticate("Bearer anything").scope == Scope("default")
    assert config.quotas() == {}


def test_toml_maps_keys_to_scopes_and_quotas(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(TOML)
    config = ServeConfig.load(path)
    assert config.k_anonymity == 2
    assert config.authenticate("Bearer sk-acme-2").scope == Scope("acme", group="partners")
    assert config.authenticate("bearer  sk-globex ").scope == Scope("globex")
    assert config.quotas() == {"acme": TenantQuota(cap_blocks=64), "globex": TenantQuota(floor_blocks=4)}


def test_json_equals_toml(tmp_path: Path) -> None:
    import tomllib

    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.json").write_text(json.dumps(tomllib.loads(TOML)))
    assert ServeConfig.load(tmp_path / "a.toml") == ServeConfig.load(tmp_path / "a.json")


@pytest.mark.parametrize("header", [None, "", "sk-acme-1", "Basic sk-acme-1", "Bearer ", "Bearer sk-nope"])
def test_unknown_or_malformed_keys_are_auth_errors(tmp_path: Path, header: str | None) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(TOML)
    with pytest.raises(AuthError) as info:
        ServeConfig.load(path).authenticate(header)
    assert "sk-nope" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"tenants": {"a": {"keys": ["k"]}}, "port": 1}, "unknown keys ['port']"),
        ({"tenants": {"a": {"keys": ["k"], "quota": 3}}}, "unknown keys ['quota']"),
        ({"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}}, "also given to 'a'"),
        ({"tenants": {"a": {"keys": "k"}}}, "keys must be a list"),
        ({"tenants": {"a": {"keys": ["k"], "cap_blocks": "9"}}}, "cap_blocks='9'"),
        ({"tenants": {"a": {"keys": ["k"], "cap_blocks": 0}}}, "cap_blocks=0"),
        ({"tenants": {"a": {"keys": ["k"]}}, "k_anonymity": 0}, "k_anonymity=0"),
        ({"tenants": {"a": {}}}, "no tenant has API keys"),
        ({"tenants": {}}, "non-empty table"),
    ],
)
def test_bad_configs_name_the_value(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        ServeConfig.from_dict(data)
    assert needle in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("a: 1")
    (tmp_path / "x.toml").write_text("tenants = [")
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        ServeConfig.load(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ServeConfig.load(tmp_path / "x.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        ServeConfig.load(tmp_path / "missing.toml")


def test_max_share_defaults_to_half_when_tenants_share_the_workers_and_is_checked() -> None:
    two = {"tenants": {"acme": {"keys": ["a"]}, "globex": {"keys": ["g"], "max_share": 0.25}}}
    config = ServeConfig.from_dict(two)
    assert [config.tenants[n].max_share for n in ("acme", "globex")] == [0.5, 0.25]
    config = ServeConfig.from_dict({**two, "max_share": 0.75})
    assert [config.tenants[n].max_share for n in ("acme", "globex")] == [0.75, 0.25]
    alone = ServeConfig.from_dict({"tenants": {"acme": {"keys": ["a"]}}})
    assert alone.tenants["acme"].max_share == 1.0 and ServeConfig().tenants["default"].max_share == 1.0
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ConfigError, match=r"tenants.acme.max_share=.* must be a fraction in \(0, 1\]"):
            ServeConfig.from_dict({"tenants": {"acme": {"keys": ["a"], "max_share": bad}}})
    with pytest.raises(ConfigError, match=r"config: max_share=2 must be a fraction"):
        ServeConfig.from_dict({**two, "max_share": 2})
