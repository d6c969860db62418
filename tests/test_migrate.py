"""`payq migrate` waits for a PostgreSQL that is still starting, and says so when none comes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from devservices import ThrowawayPostgres, free_port
from tests.conftest import TEST_ENV


def migrate(port: int, wait_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payq_cli", "migrate", "--wait", str(wait_s)],
        env={
            **TEST_ENV,
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/payq",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_rides_out_a_database_that_is_still_starting() -> None:
    port = free_port()
    server = ThrowawayPostgres(port=port)
    late = threading.Thread(target=lambda: (time.sleep(1.5), server.start()))
    late.start()
    try:
        result = migrate(port, wait_s=60)
    finally:
        late.join()
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "created the database and migrated the schema" in result.stdout
    assert "PostgreSQL does not answer yet" in result.stderr


def test_migrate_gives_up_with_what_to_do() -> None:
    result = migrate(free_port(), wait_s=1)
    assert result.returncode == 3
    assert "PostgreSQL did not answer at DATABASE_URL within 1 s" in result.stderr
    assert "start it or fix DATABASE_URL" in result.stderr
