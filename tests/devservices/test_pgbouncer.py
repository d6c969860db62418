"""`ThrowawayPgBouncer`: a real pgbouncer in transaction mode in front of the machine's
PostgreSQL, on a free port of its own."""

from __future__ import annotations

import os
import threading

import psycopg2  # type: ignore[import-untyped, unused-ignore]
import pytest

from devservices import DevServiceError
from devservices.pgbouncer import ThrowawayPgBouncer
from tests.conftest import PG_SERVER


def test_it_pools_per_transaction_within_its_server_pool() -> None:
    with ThrowawayPgBouncer(f"{PG_SERVER}/postgres", pool_size=2) as bouncer:
        workdir = bouncer.workdir
        assert bouncer.url("postgres").endswith(f"@127.0.0.1:{bouncer.port}/postgres")
        config = {row["key"]: row["value"] for row in bouncer.show("CONFIG")}
        assert config["pool_mode"] == "transaction"
        assert (config["default_pool_size"], config["listen_addr"]) == ("2", "127.0.0.1")
        pids: list[int] = []

        def client() -> None:  # six clients at once, each in its own transaction
            conn = psycopg2.connect(
                host="127.0.0.1", port=bouncer.port, user="postgres", dbname="postgres"
            )
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid() FROM pg_sleep(0.2)")
                    pids.append(cur.fetchone()[0])
                conn.commit()
            finally:
                conn.close()

        clients = [threading.Thread(target=client) for _ in range(6)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        assert len(pids) == 6 and len(set(pids)) <= 2  # two server connections served six
        assert bouncer.server_connections("postgres") <= 2
        if os.geteuid() == 0:  # pgbouncer refuses root: it runs as postgres
            assert workdir.stat().st_uid != 0
    assert not workdir.exists()
    assert not bouncer.is_running()


def test_a_missing_pgbouncer_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda *args, **kwargs: None)
    with pytest.raises(DevServiceError, match="apt-get install pgbouncer"):
        ThrowawayPgBouncer(f"{PG_SERVER}/postgres", pool_size=1).start()
