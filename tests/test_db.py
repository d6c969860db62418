"""The engine's guards against real PostgreSQL: idle connections are pinged and replaced
when dead, busy ones are not pinged, and ``autocommit`` commits each statement."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, Integer, text

from payq import db
from payq.settings import load_settings


@pytest.fixture
def pings() -> list[object]:
    return []


@pytest.fixture
def engine(database: str, pings: list[object], monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    made = db.make_engine(load_settings(database_pool_max_connections=1), role="dbtest")
    real_ping = made.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(made.dialect, "do_ping", counted)
    yield made
    made.dispose()


def backend_pid(engine: Engine) -> int:
    with db.transaction(engine) as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_connection_used_a_moment_ago_is_not_pinged(engine: Engine, pings: list[object]) -> None:
    first = backend_pid(engine)
    for _ in range(5):
        assert backend_pid(engine) == first  # the pool's one connection, reused
    assert pings == []


def test_a_connection_that_died_while_idle_is_replaced_at_checkout(
    engine: Engine, pings: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = backend_pid(engine)
    with db.transaction() as other:  # the test's own engine: cut the idle connection
        assert other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": dead}).scalar_one()
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)

    fresh = backend_pid(engine)  # no error reaches the caller

    assert fresh != dead
    assert len(pings) == 1


def test_autocommit_commits_each_statement_as_it_answers(engine: Engine) -> None:
    with db.transaction() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS dbtest_marks (v int)"))
        conn.execute(text("TRUNCATE dbtest_marks"))
    with db.autocommit(engine) as conn:
        conn.execute(text("INSERT INTO dbtest_marks VALUES (1)"))
        with db.transaction() as other:  # another connection sees it before the block ends
            assert other.execute(text("SELECT count(*) FROM dbtest_marks")).scalar_one() == 1

    # Back in the pool, the connection is transactional again: a rollback undoes.
    with pytest.raises(RuntimeError), db.transaction(engine) as conn:
        conn.execute(text("INSERT INTO dbtest_marks VALUES (2)"))
        raise RuntimeError("undo")
    with db.transaction() as conn:
        assert conn.execute(text("SELECT array_agg(v) FROM dbtest_marks")).scalar_one() == [1]
        conn.execute(text("DROP TABLE dbtest_marks"))


def _lookup(name: str = "lookup") -> db.Prepared:
    from sqlalchemy import bindparam, literal_column, select

    return db.Prepared(name, select(literal_column("1") + bindparam("n", type_=Integer)))


def test_a_prepared_statement_is_prepared_once_per_connection(engine: Engine) -> None:
    lookup = _lookup()
    with db.autocommit(engine) as conn:
        assert [lookup.execute(conn, {"n": n}).scalar_one() for n in (1, 2, 3)] == [2, 3, 4]
        held = conn.execute(
            text("SELECT name FROM pg_prepared_statements WHERE name = :n"), {"n": lookup.name}
        ).all()
    assert len(held) == 1


def test_a_connection_that_lost_its_prepared_statements_prepares_again(engine: Engine) -> None:
    lookup = _lookup()
    with db.autocommit(engine) as conn:
        assert lookup.execute(conn, {"n": 1}).scalar_one() == 2
        conn.execute(text("DISCARD ALL"))  # what a pooler does between clients
        assert lookup.execute(conn, {"n": 41}).scalar_one() == 42


def test_where_prepared_statements_never_stay_plain_sql_is_run_with_a_warning(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lookup = _lookup()
    # A pooler in transaction mode: each PREPARE lands on another server connection.
    monkeypatch.setattr(db.Prepared, "_prepare_on", lambda self, conn: None)
    with db.autocommit(engine) as conn:
        assert lookup.execute(conn, {"n": 1}).scalar_one() == 2
        assert lookup.execute(conn, {"n": 2}).scalar_one() == 3
    assert [r.message for r in caplog.records if r.name == "payq.db"] == [
        "prepared statements vanish between statements on this database connection "
        "(a pooler in transaction mode?): it runs plain SQL from now on"
    ]


def test_two_versions_of_a_statement_never_share_a_name() -> None:
    from sqlalchemy import bindparam, literal_column, select

    other = db.Prepared("lookup", select(literal_column("2") + bindparam("n", type_=Integer)))
    assert other.name != _lookup().name
    assert _lookup().name == _lookup().name


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain SQL"])
def test_a_statement_not_durable_skips_the_wal_flush_for_itself_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, prepared: bool
) -> None:
    from sqlalchemy import func, select

    setting = select(func.current_setting("synchronous_commit"))
    quick = db.Prepared("quick", setting, durable=False)
    durable = db.Prepared("durable", setting)
    if not prepared:  # the plain-SQL fallback (behind a pooler) keeps it too
        monkeypatch.setattr(db.Prepared, "_prepare_on", lambda self, conn: None)
    with db.autocommit(engine) as conn:
        assert quick.execute(conn, {}).scalar_one() == "off"
        assert durable.execute(conn, {}).scalar_one() == "on"
        assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
        assert quick.execute(conn, {}).scalar_one() == "off"
