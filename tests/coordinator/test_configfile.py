"""The configuration file: the seed's eventbus.yaml, env and flag overrides, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import (
    EVENT_TYPES, CoordinatorConfig, DeliveryConfig, PersistenceConfig, RedisConfig, mask_url,
    parse_duration_ms,
)
from coordinator.configfile import load_config, parse_config
from coordinator.errors import ConfigError
from coordinator.keys import Keys

SEED = Path(__file__).resolve().parents[2] / "config" / "eventbus.yaml"

BASE: dict[str, Any] = {
    "eventbus": {
        "enabled": True,
        "provider": "redis",
        "redis": {"addr": "localhost:6379", "password": "", "db": 0,
                  "channel_prefix": "kiki:events:"},
        "publish": {"enabled": True, "async": True, "timeout": "5s"},
        "subscribe": {"events": list(EVENT_TYPES), "workers": 10},
        "persistence": {"enabled": True, "storage": "redis", "retention_days": 7},
        "delivery": {"claim_idle": "30s", "max_deliveries": 5},
    }
}


def doc(section: str | None = None, **values: object) -> dict[str, Any]:
    """BASE with ``values`` set in ``eventbus.<section>`` (or at the top of eventbus)."""
    data = copy.deepcopy(BASE)
    target = data["eventbus"] if section is None else data["eventbus"][section]
    target.update(values)
    return data


def error_of(data: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ=kwargs.pop("environ", {}), **kwargs)
    return str(info.value)


# -- the seed file --------------------------------------------------------------------------


def test_seed_file_loads_with_defaults() -> None:
    cfg = load_config(SEED, environ={})
    assert cfg.enabled and cfg.provider == "redis"
    assert cfg.redis.url == "redis://localhost:6379/0"
    assert cfg.redis.password is None
    assert cfg.redis.prefix == "kiki:events"
    assert Keys(cfg.redis.prefix).inbox("planner").stream.startswith("kiki:events:{a:planner}")
    assert cfg.publish_events and cfg.publish_enabled and cfg.publish_async
    assert cfg.publish_timeout_ms == 5000
    assert cfg.subscribe_events == EVENT_TYPES
    assert cfg.delivery.concurrency == 10
    assert cfg.persistence == PersistenceConfig(enabled=True, storage="redis", retention_days=7)
    assert cfg.events_retention_ms == 7 * 86_400_000
    assert cfg.delivery.claim_idle_ms == 30_000 and cfg.delivery.backoff_base_ms == 200


def test_seed_file_expands_environment() -> None:
    env = {"REDIS_ADDR": "redis.internal:6380", "REDIS_PASSWORD": "s3cret"}
    cfg = load_config(str(SEED), environ=env)
    assert cfg.redis.url == "redis://redis.internal:6380/0"
    assert cfg.redis.password == "s3cret"


def test_config_env_names_the_file() -> None:
    cfg = load_config(environ={"KIKI_CONFIG": str(SEED)})
    assert cfg.delivery.concurrency == 10
    assert load_config(environ={}) == CoordinatorConfig()


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ms"), [
    ("250ms", 250), ("5s", 5000), ("1m", 60_000), ("1h", 3_600_000), ("1m30s", 90_000),
    ("1.5s", 1500), ("7d", 7 * 86_400_000), (0, 0), ("0", 0),
])
def test_durations(text: object, ms: int) -> None:
    assert parse_duration_ms("x", text) == ms


@pytest.mark.parametrize("text", ["-5s", "5", 5, "5 parsecs", "", "s", "5s5", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ConfigError, match="x: expected a"):
        parse_duration_ms("x", text)


@pytest.mark.parametrize(("addr", "url"), [
    ("localhost:6379", "redis://localhost:6379/2"),
    ("cache", "redis://cache:6379/2"),
    ("[::1]:7000", "redis://[::1]:7000/2"),
    ("redis://r.example:6390", "redis://r.example:6390/2"),
    ("rediss://r.example:6390/2", "rediss://r.example:6390/2"),
    ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock?db=2"),
])
def test_redis_addr_forms(addr: str, url: str) -> None:
    cfg = parse_config(doc("redis", addr=addr, db=2), environ={})
    assert cfg.redis.url == url


def test_strings_from_variables_are_typed() -> None:
    data = doc("subscribe", workers="${WORKERS:-4}")
    data["eventbus"]["enabled"] = "${BUS_ON:-false}"
    cfg = parse_config(data, environ={})
    assert cfg.delivery.concurrency == 4 and cfg.enabled is False
    assert parse_config(data, environ={"WORKERS": "8"}).delivery.concurrency == 8


def test_memory_provider_and_filesystem_storage() -> None:
    data = doc(provider="memory")
    data["eventbus"]["persistence"] = {"storage": "filesystem", "directory": "/var/kiki"}
    cfg = parse_config(data, environ={})
    assert cfg.provider == "memory"
    assert cfg.persistence.storage == "filesystem" and cfg.persistence.directory == "/var/kiki"


def test_empty_sections_keep_defaults() -> None:
    cfg = parse_config({"eventbus": {"delivery": None, "redis": None}}, environ={})
    assert cfg == CoordinatorConfig()


# -- precedence -----------------------------------------------------------------------------


def test_environment_overrides_file() -> None:
    env = {"KIKI_REDIS_URL": "redis://other:6390/1", "KIKI_REDIS_PASSWORD": "pw",
           "KIKI_PREFIX": "team", "KIKI_NODE_ID": "node-7", "KIKI_CONCURRENCY": "3",
           "KIKI_MAX_DELIVERIES": "9", "KIKI_CLAIM_IDLE": "1m", "KIKI_BACKOFF_MAX": "2s",
           "KIKI_PROVIDER": "memory", "KIKI_NODE_ID_UNUSED": "x",
           "KIKI_PUBLISH_EVENTS": "false"}
    cfg = parse_config(BASE, environ=env)
    assert cfg.redis.url == "redis://other:6390/1" and cfg.redis.password == "pw"
    assert cfg.redis.prefix == "team" and cfg.node_id == "node-7"
    assert cfg.delivery.concurrency == 3 and cfg.delivery.max_deliveries == 9
    assert cfg.delivery.claim_idle_ms == 60_000 and cfg.delivery.backoff_max_ms == 2000
    assert cfg.provider == "memory" and cfg.publish_events is False


def test_empty_environment_values_are_ignored() -> None:
    cfg = parse_config(BASE, environ={"KIKI_NODE_ID": "", "KIKI_CONCURRENCY": ""})
    assert cfg.node_id is None and cfg.delivery.concurrency == 10


def test_overrides_beat_environment_and_file() -> None:
    env = {"KIKI_REDIS_URL": "redis://env:1", "KIKI_CONCURRENCY": "3"}
    flags = {"redis_url": "flag:2", "node_id": "n1", "concurrency": 12, "prefix": None}
    cfg = parse_config(BASE, environ=env, overrides=flags)
    assert cfg.redis.url == "redis://flag:2"
    assert cfg.node_id == "n1" and cfg.delivery.concurrency == 12
    assert cfg.redis.prefix == "kiki:events"


def test_separate_password_wins_over_url_password() -> None:
    cfg = parse_config(doc("redis", addr="redis://user:old@r:1/0", password="new"), environ={})
    assert cfg.redis.url == "redis://user@r:1/0" and cfg.redis.password == "new"


# -- errors: each names the key path --------------------------------------------------------


@pytest.mark.parametrize(("data", "path", "words"), [
    (doc("delivery", max_delivery=3), "eventbus.delivery.max_delivery", "max_deliveries"),
    (doc(publsh={}), "eventbus.publsh", "publish"),
    ({"eventbus": {}, "extra": 1}, "extra", "unknown key"),
    (doc("subscribe", workers="ten"), "eventbus.subscribe.workers", "integer >= 1"),
    (doc("subscribe", workers=0), "eventbus.subscribe.workers", "got 0"),
    (doc("subscribe", workers=2.5), "eventbus.subscribe.workers", "2.5"),
    (doc("publish", enabled="maybe"), "eventbus.publish.enabled", "true or false"),
    (doc("publish", timeout="-5s"), "eventbus.publish.timeout", "non-negative"),
    (doc("publish", timeout="5"), "eventbus.publish.timeout", "needs a unit"),
    (doc("delivery", claim_idle="soon"), "eventbus.delivery.claim_idle", "'soon'"),
    (doc("delivery", claim_idle="0s"), "eventbus.delivery.claim_idle", "at least 1ms"),
    (doc("subscribe", events=["agent:strated"]), "eventbus.subscribe.events[0]",
     "did you mean 'agent:started'"),
    (doc("subscribe", events="agent:started, bogus"), "eventbus.subscribe.events[1]", "bogus"),
    (doc("redis", addr="localhost:99999"), "eventbus.redis.addr", "host:port"),
    (doc("redis", addr="http://localhost"), "eventbus.redis.addr", "redis://"),
    (doc("redis", addr="a b"), "eventbus.redis.addr", "'a b'"),
    (doc("redis", db=-1), "eventbus.redis.db", "integer >= 0"),
    (doc("redis", addr="redis://r:1/3", db=2), "eventbus.redis.db", "conflicts"),
    (doc("redis", channel_prefix="kiki{x}"), "eventbus.redis.channel_prefix", "kiki{x}"),
    (doc("redis", channel_prefix=":"), "eventbus.redis.channel_prefix", "valid name"),
    (doc(provider="kafka"), "eventbus.provider", "not supported, use redis"),
    (doc(provider="pulsar"), "eventbus.provider", "not supported, use redis"),
    (doc(provider="rediss"), "eventbus.provider", "did you mean 'redis'"),
    (doc("persistence", storage="s3"), "eventbus.persistence.storage", "postgres"),
    (doc("persistence", retention_days=0), "eventbus.persistence.retention_days", ">= 1"),
    (doc("persistence", storage="postgres"), "eventbus.persistence.postgres_url (not set)",
     "postgresql://"),
    (doc("delivery", lease_renew="20s"), "eventbus.delivery.lease_renew", "half of"),
    (doc("delivery", claim_idle="6s"), "eventbus.delivery.lease_renew (not set)", "half of"),
    (doc(redis=[1, 2]), "eventbus.redis", "mapping"),
    ({"events": {}}, "events", "did you mean 'eventbus'"),
    ({}, "eventbus", "missing"),
])
def test_bad_values_name_their_key(data: dict[str, Any], path: str, words: str) -> None:
    message = error_of(data)
    assert message.startswith(path + ":"), message
    assert words in message
    assert "\n" not in message


def test_unset_variable_without_default() -> None:
    message = error_of(doc("redis", addr="${REDIS_HOST}:6379"))
    assert message.startswith("eventbus.redis.addr:") and "REDIS_HOST is not set" in message


@pytest.mark.parametrize("text", ["${}", "${1X}", "${A", "${A:-x"])
def test_malformed_references(text: str) -> None:
    message = error_of(doc("redis", addr=text))
    assert message.startswith("eventbus.redis.addr:") and "${VAR}" in message


def test_bad_environment_names_the_variable() -> None:
    assert error_of(BASE, environ={"KIKI_CONCURRENCY": "lots"}).startswith("KIKI_CONCURRENCY:")
    assert error_of(BASE, environ={"KIKI_GRACE": "10"}).startswith("KIKI_GRACE:")
    assert error_of(BASE, environ={"KIKI_NODE_ID": "a{b}"}).startswith("KIKI_NODE_ID:")


def test_bad_overrides_name_the_setting() -> None:
    assert "did you mean 'concurrency'" in error_of(BASE, overrides={"concurency": 3})
    assert error_of(BASE, overrides={"redis_url": "ftp://x"}).startswith("overrides.redis_url:")


def test_yaml_errors_report_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("eventbus:\n  redis:\n    addr: [oops\n  publish: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line \d+, column \d+"):
        load_config(path, environ={})


@pytest.mark.parametrize(("text", "words"), [
    ("", "empty"), ("- a\n- b\n", "got a list"),
])
def test_file_shape_errors(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path, environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


# -- secrets ----------------------------------------------------------------------------------


def test_secrets_never_in_repr_or_describe() -> None:
    data = doc("redis", addr="redis://:urlsecret@r:1/0", password="pwsecret")
    data["eventbus"]["persistence"] = {"storage": "postgres",
                                       "postgres_url": "postgresql://u:pgsecret@db/kiki"}
    cfg = parse_config(data, environ={})
    described = json.dumps(cfg.describe())
    for text in (repr(cfg), str(cfg), described):
        for secret in ("urlsecret", "pwsecret", "pgsecret"):
            assert secret not in text
    assert cfg.describe()["redis"] == {"url": "redis://r:1/0", "password": "***",
                                       "prefix": "kiki:events", "socket_timeout_s": 10.0,
                                       "max_connections": 512}
    assert "postgresql://u:***@db/kiki" in described


def test_secret_values_not_echoed_in_errors() -> None:
    message = error_of(doc("redis", password=123456))
    assert message.startswith("eventbus.redis.password:") and "123456" not in message
    message = error_of(doc("redis", addr="http://u:topsecret@h"))
    assert "topsecret" not in message


def test_url_password_masked_in_describe() -> None:
    cfg = CoordinatorConfig.from_url("redis://:hunter2@h:1/0")
    assert "hunter2" not in json.dumps(cfg.describe())
    assert "hunter2" not in repr(RedisConfig(url="unix:///s.sock?password=hunter2"))


def test_durations_in_milliseconds_from_environment_and_flags() -> None:
    cfg = parse_config(BASE, environ={"KIKI_CLAIM_IDLE_MS": "40000"},
                       overrides={"heartbeat_ttl_ms": 3000, "grace": "1m 30s"})
    assert cfg.delivery.claim_idle_ms == 40_000 and cfg.delivery.heartbeat_ttl_ms == 3000
    assert cfg.delivery.grace_ms == 90_000


def test_bad_secret_reference_does_not_echo_the_value() -> None:
    message = error_of(doc("redis", password="hunter2${"))
    assert message.startswith("eventbus.redis.password:") and "hunter2" not in message


@pytest.mark.parametrize("url", [
    "redis://:hunter2@h:99999", "redis://u:hunter2@[::1:6379", "redis://:hunter2@h:1/0",
    ":hunter2@127.0.0.1:6379", "u:hunter2@h", "redis://:hun@ter2@h:1",
])
def test_mask_url_never_raises_and_hides_the_password(url: str) -> None:
    masked = mask_url(url)
    assert "hunter2" not in masked and "ter2" not in masked and "***" in masked


@pytest.mark.parametrize("url", ["redis://:hunter2@h:99999", "redis://:hunter2@[::1:6379"])
def test_unparseable_redis_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        RedisConfig(url=url)
    assert str(info.value).startswith("redis.url:") and "hunter2" not in str(info.value)
    for overrides, environ, path in [({"redis_url": url}, {}, "overrides.redis_url:"),
                                     ({}, {"KIKI_REDIS_URL": url}, "KIKI_REDIS_URL:")]:
        message = error_of(BASE, environ=environ, overrides=overrides)
        assert message.startswith(path) and "hunter2" not in message, message
    message = error_of(doc("redis", addr=url))
    assert message.startswith("eventbus.redis.addr:") and "hunter2" not in message


@pytest.mark.parametrize("addr", [":hunter2@127.0.0.1:6379", "hunter2@h:1:2", "u:hunter2@h:x",
                                  "ftp://u:hunter2@h"])
def test_bad_addresses_do_not_echo_passwords(addr: str) -> None:
    for message in (error_of(doc("redis", addr=addr)),
                    error_of(BASE, overrides={"redis_url": addr}),
                    error_of(BASE, environ={"KIKI_REDIS_URL": addr})):
        assert "hunter2" not in message and "\n" not in message, message
        assert message.split(":")[0] in ("eventbus.redis.addr", "overrides.redis_url",
                                          "KIKI_REDIS_URL")


# -- cross-field checks ------------------------------------------------------------------------


def test_heartbeat_ttl_has_a_floor() -> None:
    assert DeliveryConfig(heartbeat_ttl_ms=150).heartbeat_interval_ms == 50
    with pytest.raises(ConfigError, match=r"^delivery.heartbeat_ttl_ms: expected an integer "
                                          r">= 150 .*got 149$"):
        DeliveryConfig(heartbeat_ttl_ms=149)
    assert error_of(doc("delivery", heartbeat_ttl="100ms")).startswith(
        "eventbus.delivery.heartbeat_ttl: expected a duration of at least 150ms")
    assert error_of(BASE, overrides={"heartbeat_ttl_ms": 100}).startswith(
        "overrides.heartbeat_ttl_ms: expected an integer >= 150")


def test_backoff_max_not_below_backoff_base() -> None:
    DeliveryConfig(backoff_base_ms=500, backoff_max_ms=500)
    with pytest.raises(ConfigError, match=r"^delivery.backoff_max_ms: .*backoff_base_ms"):
        DeliveryConfig(backoff_base_ms=500, backoff_max_ms=499)
    message = error_of(doc("delivery", backoff_base="2s", backoff_max="1s"))
    assert message.startswith("eventbus.delivery.backoff_max:")
    assert "eventbus.delivery.backoff_base" in message
    message = error_of(doc("delivery", backoff_base="40s"))
    assert message.startswith("eventbus.delivery.backoff_max (not set):")


def test_block_below_the_socket_timeout() -> None:
    CoordinatorConfig(redis=RedisConfig(socket_timeout_s=1.5),
                      delivery=DeliveryConfig(block_ms=1499))
    with pytest.raises(ConfigError, match=r"^delivery.block_ms: .*redis.socket_timeout_s"):
        CoordinatorConfig(redis=RedisConfig(socket_timeout_s=1.0),
                          delivery=DeliveryConfig(block_ms=1000))
    message = error_of(doc("delivery", block="20s"))
    assert message.startswith("eventbus.delivery.block:") and "redis.socket_timeout_s" in message
    message = error_of(doc("redis", socket_timeout="1s"))
    assert message.startswith("eventbus.delivery.block (not set):")
    assert "eventbus.redis.socket_timeout" in message and "\n" not in message
    assert error_of(BASE, overrides={"block": "11s"}).startswith("overrides.block:")


def test_defaults_and_seed_stay_valid() -> None:
    CoordinatorConfig()
    load_config(SEED, environ={})


@pytest.mark.parametrize(("field", "value"), [("socket_timeout_s", None), ("socket_timeout_s", 0),
                                              ("socket_timeout_s", "10"),
                                              ("max_connections", None), ("max_connections", 2.5)])
def test_redis_settings_of_the_wrong_kind_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^redis.{field}: expected"):
        RedisConfig(**{field: value})  # type: ignore[arg-type]
