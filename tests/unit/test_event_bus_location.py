"""Choosing the event bus by location: parsing, errors that name the bad part, config."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from feedrec.events.event_bus import bus_location, open_event_bus
from feedrec.events.event_log import EventLog, EventLogError
from feedrec.events.redis_event_log import EventBusUnavailable, RedisLocation
from feedrec.serving.config import ServiceConfig


def test_a_path_is_the_embedded_log_and_a_redis_url_a_stream(tmp_path: Path) -> None:
    assert bus_location(tmp_path) == tmp_path
    assert bus_location(str(tmp_path / "events")) == tmp_path / "events"
    assert bus_location("relative/events") == Path("relative/events")
    assert isinstance(open_event_bus(tmp_path / "log"), EventLog)
    assert isinstance(open_event_bus(str(tmp_path / "log2")), EventLog)
    where = bus_location("redis://cache.internal:6380/2?stream=feed-events")
    assert where == RedisLocation(host="cache.internal", port=6380, db=2, stream="feed-events")
    plain = bus_location("redis://localhost?stream=events")
    assert plain == RedisLocation(host="localhost", port=6379, db=0, stream="events")
    secret = bus_location("redis://app:s3cr%40t@10.0.0.5:6379/0?stream={feed}events")
    assert isinstance(secret, RedisLocation)
    assert (secret.username, secret.password, secret.stream) == ("app", "s3cr@t", "{feed}events")
    assert "s3cr" not in str(secret) and str(secret).startswith("redis://***@10.0.0.5:6379/0")


@pytest.mark.parametrize(
    ("location", "names"),
    [
        ("", "empty"),
        ("http://host:6379/0?stream=e", "scheme 'http'"),
        ("Redis://host:6379/0?stream=e", "scheme 'Redis'"),
        ("redis://:6379/0?stream=e", "no host"),
        ("redis://host:port/0?stream=e", "port must be an integer"),
        ("redis://host:99999/0?stream=e", "port must be an integer"),
        ("redis://host:6379/zero?stream=e", "database must be an integer"),
        ("redis://host:6379/0", "stream=NAME"),
        ("redis://host:6379/0?stream=a&stream=b", "stream=NAME"),
        ("redis://host:6379/0?stream=", "stream must match"),
        ("redis://host:6379/0?stream=a b", "stream must match"),
        ("redis://host:6379/0?stream=e&timeout=3", "unknown parameter(s) timeout"),
        ("redis://host:6379/0?stream=e#x", "fragment"),
    ],
)
def test_a_malformed_location_is_a_value_error_naming_the_part(location: str, names: str) -> None:
    with pytest.raises(ValueError) as info:
        bus_location(location)
    assert names in str(info.value)


def test_errors_never_show_a_password() -> None:
    with pytest.raises(ValueError, match="unknown parameter") as info:
        bus_location("redis://app:hunter2@host:6379/0?stream=e&x=1")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_a_server_that_is_not_there_is_an_event_log_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EventBusUnavailable, match=f"127.0.0.1:{port}.*open") as info:
        open_event_bus(f"redis://127.0.0.1:{port}/0?stream=events")
    assert isinstance(info.value, EventLogError)  # the Ingress answers it with 503


def _config(tmp_path: Path, **fields: object) -> ServiceConfig:
    return ServiceConfig.from_run(tmp_path, **fields)


def test_config_events_bus_replaces_events_dir_and_is_checked_at_load(tmp_path: Path) -> None:
    default = _config(tmp_path)
    assert default.event_bus_location() == tmp_path.resolve() / "events"
    url = "redis://127.0.0.1:6379/0?stream=events"
    assert _config(tmp_path, events_bus=url).event_bus_location() == url
    assert _config(tmp_path, events_dir=None).event_bus_location() is None
    with pytest.raises(ValidationError, match=r"events_bus(.|\n)*needs exactly one \?stream"):
        _config(tmp_path, events_bus="redis://127.0.0.1:6379/0")


@pytest.mark.parametrize(
    ("location", "names"),
    [
        ("http://host/0", "scheme must be redis://"),
        ("redis://host:6379/db", "database must be an integer"),
        ("redis://host/0?prefix=a&prefix=b", "at most one ?prefix=NAME"),
        ("redis://host/0?prefix=a*", "prefix must match"),
        ("redis://host/0?stream=e", "unknown parameter(s) stream"),
        ("redis://app:hunter2@host/0?x=1", "redis://app:***@host/0?x=1"),
    ],
)
def test_a_malformed_feature_store_is_refused_at_config_load(location: str, names: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServiceConfig.from_run(Path("run"), feature_store=location)
    text = str(info.value)
    assert "feature_store" in text and "feature store" in text and names in text
    assert "hunter2" not in text


def test_a_feature_store_url_needs_no_prefix() -> None:
    from feedrec.serving.redis_feature_source import DEFAULT_PREFIX, parse_location

    cfg = ServiceConfig.from_run(Path("run"), feature_store="redis://cache:6380/3")
    assert cfg.feature_store == "redis://cache:6380/3"
    where = parse_location("redis://cache:6380/3")
    assert (where.host, where.port, where.db, where.key) == ("cache", 6380, 3, DEFAULT_PREFIX)
    assert parse_location("redis://cache?prefix={feed}x").key == "{feed}x"


def test_config_errors_never_show_a_password() -> None:
    for field in ("events_bus", "feature_store"):
        with pytest.raises(ValidationError) as info:
            ServiceConfig.from_run(Path("run"), **{field: "redis://app:hunter2@host/0?x=1"})
        assert field in str(info.value) and "hunter2" not in str(info.value)
