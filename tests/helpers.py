"""Small helpers the test tiers share: reading charges back, waiting, the simulator."""

from __future__ import annotations

import os
import random
import string
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import select, text

from payq.constants import DeferralCause
from payq.db import transaction
from payq.errors import ProviderError, ProviderTimeout
from payq.gate import Pass, ProviderGate, Wait
from payq.models import Charge, charge_attempts, charges
from payq.provider import ProviderCharge
from payq.settings import Settings, load_settings


def charge(charge_id: uuid.UUID | str) -> Charge:
    with transaction() as conn:
        row = conn.execute(select(charges).where(charges.c.id == uuid.UUID(str(charge_id))))
        return Charge.from_row(row.mappings().one())


def attempts(charge_id: uuid.UUID | str, kind: str | None = "charge") -> list[dict[str, Any]]:
    """The charge's provider requests, oldest first: its calls, its lookups (``kind``), or
    every one (``kind=None``)."""
    query = select(charge_attempts).where(charge_attempts.c.charge_id == uuid.UUID(str(charge_id)))
    if kind is not None:
        query = query.where(charge_attempts.c.kind == kind)
    with transaction() as conn:
        rows = conn.execute(query.order_by(charge_attempts.c.started_at, charge_attempts.c.id))
        return [dict(r) for r in rows.mappings()]


def statuses() -> dict[str, int]:
    from sqlalchemy import func

    with transaction() as conn:
        rows = conn.execute(select(charges.c.status, func.count()).group_by(charges.c.status))
        return {status: count for status, count in rows}


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def lease_passes(charge_id: uuid.UUID | str) -> None:
    """As if a long time passed since the charge's requests were claimed: none of them can
    still reach the provider (``ledger.pending_calls_s``), and its lookup is due now."""
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charge_attempts SET started_at = started_at - interval '1 hour' "
                "WHERE charge_id = :id"
            ),
            {"id": charge_id},
        )
        conn.execute(
            text("UPDATE charges SET next_lookup_at = now() WHERE id = :id"), {"id": charge_id}
        )


class Sim:
    """Talks to a running simulator over HTTP, as any client would."""

    def __init__(self, url: str) -> None:
        self.url = url

    def faults(self, **knobs: Any) -> None:
        httpx.post(f"{self.url}/_faults", json=knobs).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/_stats").json()
        return data

    def requests(self, key: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/_requests", params={"idempotency_key": key})
        data: list[dict[str, Any]] = response.json()
        return data


def unique_key(prefix: str) -> str:
    """A fresh idempotency key. Letters only after the prefix: a uuid's hex can hold a run
    of digits that passes the Luhn check, and payq refuses a key that looks like a card."""
    # From the OS, not ``random``: hypothesis seeds ``random`` the same for every example.
    return f"{prefix}-{''.join(_SYSTEM_RANDOM.choices(string.ascii_lowercase, k=24))}"


_SYSTEM_RANDOM = random.SystemRandom()


# --- calls through the gate, as a worker makes them ------------------------------------

#: A provider's answers, for the gate's own tests.
SUCCEEDED = ProviderCharge(id="ch_test", status="succeeded", amount=1999, currency="usd")
TIMED_OUT = ProviderTimeout("no answer within 5000 ms")  # a failure, to the breaker


def passed(entry: Pass | Wait) -> Pass:
    assert isinstance(entry, Pass), entry
    return entry


def call(gate: ProviderGate, outcome: ProviderCharge | ProviderError | None, ms: int = 10) -> Pass:
    """One provider call through the gate: entered, made (``outcome``), left."""
    entry = passed(gate.enter())
    gate.leave(entry, outcome, ms)
    return entry


def fail_calls(gate: ProviderGate, n: int) -> None:
    """``n`` calls that time out: with the suite's breaker settings, 4 open it."""
    for _ in range(n):
        call(gate, TIMED_OUT)


def open_breaker(gate: ProviderGate) -> None:
    """Calls through the gate that time out, until its breaker opens."""
    for _ in range(20):
        entry = gate.enter()
        if isinstance(entry, Wait):
            assert entry.cause is DeferralCause.BREAKER_OPEN
            return
        gate.leave(entry, TIMED_OUT, 10)
    raise AssertionError("the breaker did not open")


def clear_payq_env(monkeypatch: Any) -> Any:
    """No payq variable in the environment, whatever its case (pydantic ignores case)."""
    fields = frozenset(Settings.model_fields)
    for name in list(os.environ):
        if name.lower() in fields:
            monkeypatch.delenv(name)
    return monkeypatch


def load_env(env: Any, **variables: str) -> Settings:
    """Load settings the way the program does: from environment variables, no .env file."""
    for name, value in variables.items():
        env.setenv(name, value)
    return load_settings(_env_file=None)
