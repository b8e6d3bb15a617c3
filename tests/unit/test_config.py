from pathlib import Path

import pytest

from zmta_common.config import DEFAULT_DOMAIN_CONNECTIONS, ConfigError, Zone, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "zmta.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_original() -> None:
    config = load_config(None)
    assert (config.smtp_interfaces["feeder"].host, config.smtp_interfaces["feeder"].port) == ("127.0.0.1", 2525)
    assert (config.api.host, config.api.port) == ("127.0.0.1", 12080)
    assert set(config.zones) == {"default", "bounces"}
    assert config.zones["default"].defer_times[:6] == [300, 420, 480, 1500, 4500, 7200]


def test_yaml_values_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, "zones:\n  fast:\n    connections: 40\n  default: {}\napi:\n  port: 8080\n")
    config = load_config(path)
    assert config.zones["fast"].connections == 40
    assert config.api.port == 8080


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "zones:\n  default:\n    conections: 4\n")
    with pytest.raises(ConfigError, match=r"zones\.default\.conections"):
        load_config(path)


def test_bad_value_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "smtp_interfaces:\n  feeder:\n    port: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "smtp_interfaces.feeder.port" in str(info.value)
    assert "'lots'" in str(info.value)


def test_bad_pool_address_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "zones:\n  default:\n    pool:\n      - {name: a.example, address: 300.1.1.1}\n")
    with pytest.raises(ConfigError, match=r"zones\.default\.pool\.0\.address"):
        load_config(path)


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "dbs:\n  redis: redis://file:6379/1\n  nats: nats://file:4222\n")
    monkeypatch.setenv("ZMTA_DBS__REDIS", "redis://env:6379/2")
    config = load_config(path)
    assert config.dbs.redis == "redis://env:6379/2"
    assert config.dbs.nats == "nats://file:4222"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "name: FromEnv\n")
    monkeypatch.setenv("ZMTA_CONFIG_FILE", str(path))
    assert load_config().name == "FromEnv"


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_default_zone_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, "queue:\n  default_zone: nowhere\n")
    with pytest.raises(ConfigError, match="nowhere"):
        load_config(path)


def test_smarthost_needs_a_port(tmp_path: Path) -> None:
    path = write(tmp_path, "zones:\n  default:\n    smarthost: relay.example\n")
    with pytest.raises(ConfigError, match=r"zones\.default\.smarthost"):
        load_config(path)


def test_dsn_zone_defaults_to_bounces_then_the_default_zone(tmp_path: Path) -> None:
    assert load_config(None).dsn_zone == "bounces"
    assert load_config(write(tmp_path, "zones:\n  default: {}\n")).dsn_zone == "default"
    with pytest.raises(ConfigError, match=r"bounce\.zone 'nowhere'"):
        load_config(write(tmp_path, "bounce:\n  zone: nowhere\n"))


def test_domain_policy_is_merged_field_by_field() -> None:
    """A domain's own entry, then the "*" entry, then the built-in default, for each field."""
    zone = Zone.model_validate(
        {
            "tls": "none",
            "domains": {
                "*": {"tls": "required", "rate": "100/min", "disabled_addresses": ["192.0.2.9"]},
                "big.test": {"connections": 40},
                "slow.test": {"rate": "1/min", "tls": "opportunistic"},
                "Open.Test": {"connections": None},  # explicitly without a limit
            },
        }
    )
    other = zone.domain_policy("other.test")  # "*" without connections no longer lifts every limit
    assert (other.connections, other.rate, other.tls) == (DEFAULT_DOMAIN_CONNECTIONS, "100/min", "required")
    assert other.disabled_addresses == ["192.0.2.9"]
    big = zone.domain_policy("big.test")  # its own connections, the rest from "*"
    assert (big.connections, big.rate, big.tls, big.disabled_addresses) == (40, "100/min", "required", ["192.0.2.9"])
    slow = zone.domain_policy("slow.test")  # an entry without connections keeps the default
    assert (slow.connections, slow.rate, slow.tls) == (DEFAULT_DOMAIN_CONNECTIONS, "1/min", "opportunistic")
    assert zone.domain_policy("open.test").connections is None
    assert zone.tls_mode("slow.test") == "opportunistic"
    assert zone.tls_mode("other.test") == "required"
    assert Zone().domain_policy("any.test").connections == DEFAULT_DOMAIN_CONNECTIONS
    assert Zone(tls="required").tls_mode("any.test") == "required"
