"""The prebuilt statements behind enqueueing: a charge built without reading it back is
the row, a single charge commits on its own (autocommit), a batch stays one transaction,
and the pooled connection goes back to the pool as it came."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select, text

from payq.db import get_engine, transaction
from payq.errors import IdempotencyConflict, ServiceUnavailable
from payq.models import charges
from producers import enqueue_charge, enqueue_charges, get_charge
from producers.enqueue import enqueue_charge_result
from tests.producers.test_enqueue import queued_ids, row_count

pytestmark = pytest.mark.usefixtures("clean")


def request(key: str, amount: int = 100, **more: Any) -> dict[str, Any]:
    return {
        "amount": amount,
        "currency": "usd",
        "source": "tok_visa",
        "idempotency_key": key,
        **more,
    }


@pytest.fixture
def autocommit_at_checkin() -> Iterator[list[bool]]:
    """The driver's autocommit flag of every connection given back to the pool."""
    seen: list[bool] = []

    def record(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None:  # None: invalidated, never reused
            seen.append(bool(dbapi_connection.autocommit))

    pool = get_engine().pool
    event.listen(pool, "checkin", record)
    yield seen
    event.remove(pool, "checkin", record)


def test_new_charges_equal_their_rows() -> None:
    one = enqueue_charge(1999, "EUR", "tok_visa", "one", description="d", metadata={"a": "1"})
    many = enqueue_charges([request(f"m-{i}", 100 + i, metadata={"i": str(i)}) for i in range(3)])
    for charge in [one, *many]:
        assert get_charge(charge.id) == charge
    assert one.attempts == 0 and one.retry_base == 0 and one.created_at == one.updated_at


def test_single_enqueue_gives_its_connection_back_transactional(
    autocommit_at_checkin: list[bool],
) -> None:
    enqueue_charge(100, "usd", "tok_visa", "ac-1")
    enqueue_charge(100, "usd", "tok_visa", "ac-1")  # the repeat path reads the row back
    with pytest.raises(IdempotencyConflict):
        enqueue_charge(200, "usd", "tok_visa", "ac-1")
    assert autocommit_at_checkin == [False, False, False]
    # And a transaction on the pool still rolls back.
    with pytest.raises(RuntimeError), transaction() as conn:
        conn.execute(charges.delete())
        raise RuntimeError
    assert row_count() == 1


def test_created_tells_a_new_charge_from_a_repeat() -> None:
    first = enqueue_charge_result(100, "usd", "tok_visa", "r-1")
    again = enqueue_charge_result(100, "usd", "tok_visa", "r-1")
    assert first.created and not again.created and again.charge == first.charge
    assert queued_ids() == [str(first.charge.id)]


def test_batch_with_a_conflict_writes_none_of_it() -> None:
    enqueue_charge(100, "usd", "tok_visa", "taken")
    with pytest.raises(IdempotencyConflict, match="amount"):
        enqueue_charges([request("new-1"), request("taken", 999), request("new-2")])
    assert row_count() == 1 and len(queued_ids()) == 1


def test_batch_returns_existing_and_new_in_the_order_given() -> None:
    [old] = enqueue_charges([request("old")])
    made = enqueue_charges([request("a"), request("old"), request("b"), request("a")])
    assert [c.idempotency_key for c in made] == ["a", "old", "b", "a"]
    assert made[1] == old and made[0] == made[3]
    assert sorted(queued_ids()) == sorted(str(c.id) for c in (old, made[0], made[2]))


def test_a_key_being_written_elsewhere_is_waited_for_then_returned() -> None:
    """ON CONFLICT waits for the other transaction; the row is then read, committed."""
    done: list[Any] = []
    with get_engine().connect() as other:
        other.execute(
            charges.insert().values(
                id=uuid.uuid4(),
                idempotency_key="racing",
                amount=100,
                currency="usd",
                source="tok_visa",
                metadata={},
                status="pending",
            )
        )
        worker = threading.Thread(
            target=lambda: done.append(enqueue_charge_result(100, "usd", "tok_visa", "racing"))
        )
        worker.start()
        time.sleep(0.3)
        assert not done  # still waiting on the other transaction's row
        other.commit()
        worker.join(timeout=5)
    [result] = done
    assert not result.created and result.charge.idempotency_key == "racing"
    assert row_count() == 1


def test_postgresql_dropping_a_single_enqueue_is_service_unavailable(
    autocommit_at_checkin: list[bool],
) -> None:
    """The backend killed mid-INSERT: a clear error, nothing written, the pool carries on."""
    failures: list[BaseException] = []

    def enqueue() -> None:
        try:
            enqueue_charge(100, "usd", "tok_visa", "cut")
        except BaseException as exc:  # handed to the test's thread
            failures.append(exc)

    with get_engine().connect() as locker:
        locker.execute(text("LOCK TABLE charges IN EXCLUSIVE MODE"))
        worker = threading.Thread(target=enqueue)
        worker.start()
        deadline = time.monotonic() + 1.5
        killed = False
        while not killed and time.monotonic() < deadline:
            time.sleep(0.02)
            with get_engine().connect() as admin:
                killed = bool(
                    admin.execute(
                        text(
                            "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                            "AND query LIKE 'INSERT INTO charges%'"
                        )
                    ).scalar()
                )
        locker.rollback()
        worker.join(timeout=5)
    assert killed
    [failure] = failures
    assert isinstance(failure, ServiceUnavailable) and "nothing was written" in str(failure)
    assert True not in autocommit_at_checkin
    again = enqueue_charge(100, "usd", "tok_visa", "cut")
    assert get_charge(again.id) == again
    with transaction() as conn:
        assert conn.execute(select(func.count()).select_from(charges)).scalar_one() == 1


def test_a_server_that_answers_and_refuses_says_what_to_fix_not_that_it_did_not_answer() -> None:
    """Reproduced before: a web app behind PgBouncer without DATABASE_POOLER=transaction,
    or with an unknown user, was told "PostgreSQL did not answer ... check that it is
    running"; now it gets what PostgreSQL (or the pooler) said and what to change."""
    from payq.runtime import Runtime, use
    from payq.settings import load_settings
    from tests.conftest import PG_SERVER, TEST_DB

    url = f"{PG_SERVER.replace('postgres@', 'payq_no_such_role@')}/{TEST_DB}"
    refused = Runtime(load_settings(database_url=url), role="test")
    before = use(refused)
    try:
        with pytest.raises(ServiceUnavailable) as info:
            enqueue_charge(100, "usd", "tok_visa", f"refused-{uuid.uuid4()}")
    finally:
        refused.close()
        use(before)
    message = str(info.value)
    assert "the user DATABASE_URL names does not exist" in message
    assert "nothing was written" in message and "did not answer" not in message
