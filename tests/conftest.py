"""Shared fixtures: MQTT brokers on free ports (see docs/transport.md, "How tests choose a broker")."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


@pytest.fixture
def mqtt_broker() -> Iterator[Broker]:
    """Mosquitto if installed, else the embedded broker (P2PDOE_REQUIRE_MOSQUITTO=1: Mosquitto or fail)."""
    try:
        broker = broker_for_tests()
    except BrokerUnavailableError as exc:
        if _mosquitto_required():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with broker:
        yield broker


@pytest.fixture
def mosquitto_broker() -> Iterator[Broker]:
    """A real Mosquitto on a free port: skipped if not installed, unless P2PDOE_REQUIRE_MOSQUITTO=1."""
    try:
        broker = start_mosquitto()
    except BrokerUnavailableError as exc:
        if _mosquitto_required():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with broker:
        yield broker


@pytest.fixture
def embedded_broker() -> Iterator[Broker]:
    """The embedded amqtt broker (MQTT 3.1.1) on a free port: skipped if amqtt is not installed."""
    if not embedded_available():
        pytest.skip("amqtt is not installed (pip install 'p2pdoe[demo]')")
    with start_embedded() as broker:
        yield broker
