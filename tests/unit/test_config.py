from pathlib import Path

import pytest

from zmta_common.config import ConfigError, load_config


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
