"""The workers' breaker and fleet-slot gauges: one per endpoint, labelled by its name, and
the first-priority endpoint's unlabelled. Real Redis and simulators; a real worker."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY

from devservices import free_port
from tests.helpers import passed, wait_until
from tests.ops.endpoints import TwoEndpoints, two_endpoints
from tests.processes import PayqProcess
from workers.middleware.gauges import set_gate_gauges

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def ends() -> Iterator[TwoEndpoints]:
    with two_endpoints() as both:
        yield both


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_each_endpoint_has_its_own_breaker_and_slot_gauges(ends: TwoEndpoints) -> None:
    ends.open_breaker("a")
    b = ends.route("b").gate
    held = [passed(b.enter()) for _ in range(2)]  # two calls in flight at b
    set_gate_gauges(ends.routes)
    assert gauge("payq_endpoint_breaker_state", endpoint="a") == 2  # open
    assert gauge("payq_endpoint_breaker_state", endpoint="b") == 0  # closed
    assert gauge("payq_endpoint_slots_in_use", endpoint="a") == 0
    assert gauge("payq_endpoint_slots_in_use", endpoint="b") == 2
    assert gauge("payq_breaker_state") == 2  # a: the first-priority endpoint
    assert gauge("payq_fleet_slots_in_use") == 0

    for entry in held:
        b.leave(entry, None, keep=False)
    ends.client.delete(ends.route("a").gate.breaker.state_key)  # a is back
    set_gate_gauges(ends.routes)
    assert gauge("payq_endpoint_breaker_state", endpoint="a") == 0
    assert gauge("payq_endpoint_slots_in_use", endpoint="b") == 0
    assert gauge("payq_breaker_state") == 0


def test_a_worker_serves_every_endpoints_gauges(ends: TwoEndpoints) -> None:
    ends.open_breaker("a")
    port = free_port()
    with PayqProcess("worker", "--processes", "1", "--threads", "1",
                     env={**ends.env, "METRICS_PORT": str(port)}):  # fmt: skip
        body = wait_until(
            lambda: _scrape(port, 'payq_endpoint_breaker_state{endpoint="b"}'),
            30,
            "the worker's first report with the endpoint gauges",
        )
    assert 'payq_endpoint_breaker_state{endpoint="a"} 2.0' in body
    assert 'payq_endpoint_breaker_state{endpoint="b"} 0.0' in body
    assert 'payq_endpoint_slots_in_use{endpoint="a"} 0.0' in body
    assert 'payq_endpoint_slots_in_use{endpoint="b"} 0.0' in body
    assert "payq_breaker_state 2.0" in body  # the first-priority endpoint's, unlabelled


def _scrape(port: int, wanted: str) -> str | None:
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    except httpx.HTTPError:
        return None  # not listening yet
    return body if wanted in body else None
