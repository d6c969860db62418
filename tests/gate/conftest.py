"""Gates over separate Redis connections stand for separate worker processes: what one
does, the other must see. Tests go through the gate's own API, the one workers use."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from payq.errors import CardDeclined
from payq.gate import ProviderGate
from payq.settings import Settings
from tests.conftest import REDIS_URL

DECLINED = CardDeclined("declined", code="card_declined", provider_charge_id="ch_2")


@pytest.fixture
def gates(clean: None) -> Iterator[Callable[[Settings], ProviderGate]]:
    """Makes a gate (a process) on its own connection; stops their threads after."""
    made: list[tuple[ProviderGate, redis.Redis]] = []

    def make(settings: Settings) -> ProviderGate:
        client = redis.Redis.from_url(REDIS_URL)
        made.append((ProviderGate(client, settings), client))
        return made[-1][0]

    yield make
    for gate, client in made:
        gate.stop_keeping()
        gate.fleet.stop_renewing()
        client.close()
