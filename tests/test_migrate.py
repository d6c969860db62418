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


def run_migrate(wait_s: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payq_cli", "migrate", "--wait", str(wait_s)],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_refusal_is_said_at_once_naming_the_setting_not_waited_out() -> None:
    """Reproduced before: a user the server does not know was retried for --wait seconds,
    then reported as "PostgreSQL did not answer ... start it" (exit 3), though README says
    such a refusal is said so in one line (exit 2), never as "did not answer"."""
    server = TEST_ENV["DATABASE_URL"].rsplit("/", 1)[0].replace("postgres@", "payq_no_such_role@")
    started = time.monotonic()
    result = run_migrate(30, DATABASE_URL=f"{server}/payq_refused")
    assert time.monotonic() - started < 20  # not the 30 s wait
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("payq: PostgreSQL at DATABASE_URL answered and refused")
    assert 'role "payq_no_such_role" does not exist' in line
    assert "does not answer yet" not in result.stderr


def test_migrate_names_database_direct_url_when_that_is_what_failed() -> None:
    """Reproduced before: `payq migrate` through DATABASE_DIRECT_URL said "did not answer
    at DATABASE_URL ... fix DATABASE_URL" of the URL it did not use."""
    result = run_migrate(
        1,
        DATABASE_URL=TEST_ENV["DATABASE_URL"],
        DATABASE_DIRECT_URL=f"postgresql+psycopg2://postgres:pw_s3cret@127.0.0.1:{free_port()}/payq",
    )
    assert result.returncode == 3
    assert "did not answer at DATABASE_DIRECT_URL within 1 s" in result.stderr
    assert "fix DATABASE_DIRECT_URL" in result.stderr
    assert "pw_s3cret" not in result.stderr
