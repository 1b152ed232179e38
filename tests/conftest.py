"""Shared fixtures: MQTT brokers on free ports (see docs/transport.md, "How tests choose a broker");
the hang guard of slow tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from p2pdoe.services.broker import (
    REQUIRE_MOSQUITTO_ENV,
    Broker,
    BrokerUnavailableError,
    broker_for_tests,
    embedded_available,
    free_port,
    start_embedded,
    start_mosquitto,
    start_provisioned,
)
from p2pdoe.services.clock import stop_on_fatal

SLOW_TIMEOUT_S = 1800  # pytest-timeout's guard for a slow test (the default, 600 s, for the rest)


class _LoudLoops(asyncio.DefaultEventLoopPolicy):
    """Every loop a test makes (asyncio.run) stops when a task ends with pytest-timeout's exception,
    instead of running on without the task (p2pdoe.services.clock.stop_on_fatal)."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        stop_on_fatal(loop)
        return loop


asyncio.set_event_loop_policy(_LoudLoops())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A slow test (whole simulated days) takes minutes on a busy machine: its guard against a hang
    is longer, unless it sets its own. Not a limit on speed: nothing is asserted about wall time."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def _mosquitto_required() -> bool:
    return os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1"


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; in CI (P2PDOE_REQUIRE_MOSQUITTO=1) every broker must be there."""
    if _mosquitto_required():
        pytest.fail(reason)
    pytest.skip(reason)


def _running(start: Callable[[], Broker]) -> Iterator[Broker]:
    try:
        broker = start()
    except BrokerUnavailableError as exc:
        _unavailable(str(exc))
    with broker:
        yield broker


@pytest.fixture
def mqtt_broker() -> Iterator[Broker]:
    """Mosquitto if installed, else the embedded broker (P2PDOE_REQUIRE_MOSQUITTO=1: Mosquitto or fail)."""
    yield from _running(broker_for_tests)


@pytest.fixture
def mosquitto_broker() -> Iterator[Broker]:
    """A real Mosquitto on a free port: skipped if not installed, unless P2PDOE_REQUIRE_MOSQUITTO=1."""
    yield from _running(start_mosquitto)


@pytest.fixture
def embedded_broker() -> Iterator[Broker]:
    """The embedded amqtt broker (MQTT 3.1.1) on a free port: skipped if amqtt is not installed
    (failed in CI, where it always is)."""
    if not embedded_available():
        _unavailable("amqtt is not installed (pip install 'p2pdoe[demo]')")
    yield from _running(start_embedded)


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto running a bundle provisioned for the default scenario (`p2pdoe provision`) as is:
    TLS, passwords and the ACL. The bundle is `tmp_path / "bundle"`."""
    from p2pdoe.io.scenarios import load_scenario
    from p2pdoe.services.provision import site_peers, write_bundle

    s = load_scenario("default")
    write_bundle(tmp_path / "bundle", site_peers(s.ids, s.market.peers), "127.0.0.1", free_port())
    yield from _running(lambda: start_provisioned(tmp_path / "bundle"))
