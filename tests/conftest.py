"""Shared fixtures: MQTT brokers on free ports (see docs/transport.md, "How tests choose a broker")."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest

from p2pdoe.services.broker import (
    REQUIRE_MOSQUITTO_ENV,
    Broker,
    BrokerUnavailableError,
    broker_for_tests,
    embedded_available,
    start_embedded,
    start_mosquitto,
)


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
