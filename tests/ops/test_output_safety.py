"""Nothing sensitive or dangerous gets out of the CLI: the reproduced cases.

Spreadsheet formulas in exports, terminal escapes in stored text, payment tokens in
tracebacks, databases that exist only in a URL, broken pipes, a worker without its key.
Real PostgreSQL and Redis, ``payq`` run as a command.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from payq.db import transaction
from payq.models import Charge
from payq.ops.output import spreadsheet_safe, terminal_safe
from producers import enqueue_charge
from tests.conftest import PG_SERVER, TEST_ENV
from tests.helpers import charge, unique_key

pytestmark = pytest.mark.usefixtures("clean")

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # writes the terminal user's clipboard


def payq(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payq_cli", *args],
        env={**os.environ, **TEST_ENV, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def dead_charge(description: str, **metadata: str) -> uuid.UUID:
    cid = enqueue_charge(
        1999, "usd", "tok_visa", unique_key("dead"), description=description, metadata=metadata
    ).id
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET status = 'dead', attempts = 1, dead_outcome = 'not_charged', "
                "dead_reason = :why WHERE id = :id"
            ),
            {"id": cid, "why": f"invalid_request: {description}"},
        )
    return cid


def test_an_export_never_hands_a_spreadsheet_a_formula() -> None:
    formulas = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]
    for formula in formulas:
        dead_charge(formula, note=formula)
    out = payq("dlq", "export", "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    cells = [row[k] for row in rows for k in ("description", "dead_reason")]
    assert len(rows) == len(formulas)
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells), cells
    # Each kept whole, as text: a control character shown as an escape, a formula quoted.
    assert sorted(row["description"] for row in rows) == sorted(
        str(spreadsheet_safe(terminal_safe(f))) for f in formulas
    )


def test_the_cli_never_sends_a_stored_escape_sequence_to_the_terminal() -> None:
    cid = dead_charge(f"order 8812 {OSC52}done", note=OSC52)
    for args in (("dlq", "show", str(cid)), ("dlq", "list"), ("dlq", "export")):
        out = payq(*args)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout, args
    assert "\\x1b]52" in payq("dlq", "show", str(cid)).stdout  # shown, not obeyed


def test_a_charges_repr_never_shows_its_payment_token() -> None:
    cid = enqueue_charge(1999, "usd", "tok_secret_visa_4242", unique_key("repr")).id
    c: Charge = charge(cid)
    assert "tok_secret_visa_4242" not in repr(c) and "source=***" in repr(c)


def test_an_unmigrated_database_says_to_migrate_in_one_line() -> None:
    name = f"payq_empty_{uuid.uuid4().hex[:8]}"
    from devservices import ensure_database

    url = f"{PG_SERVER}/{name}"
    ensure_database(url)
    try:
        out = payq("enqueue", "--amount", "1999", "--currency", "usd", "--source",
                   "tok_visa", "--key", "order-1", DATABASE_URL=url)  # fmt: skip
    finally:
        from sqlalchemy import create_engine

        admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr  # one line
    assert "payq migrate" in out.stderr
    assert "tok_visa" not in out.stderr + out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("url_tail", "says"),
    [
        ("/payq_no_such_database", "database DATABASE_URL names does not exist"),
        ("nosuchrole", "user DATABASE_URL names does not exist"),
    ],
)
def test_a_database_or_role_that_does_not_exist_is_not_called_silent(
    url_tail: str, says: str
) -> None:
    if url_tail.startswith("/"):
        url = f"{PG_SERVER}{url_tail}"
    else:
        url = PG_SERVER.replace("postgres@", f"{url_tail}@") + "/postgres"
    out = payq("dlq", "list", DATABASE_URL=url)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "did not answer" not in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr


def test_a_broken_pipe_ends_quietly(tmp_path: Path) -> None:
    with transaction() as conn:  # far more than a pipe holds
        conn.execute(
            text(
                "INSERT INTO charges (id, idempotency_key, amount, currency, source, status, "
                "attempts, dead_reason, dead_outcome) SELECT gen_random_uuid(), 'bulk-' || g, "
                "100, 'usd', 'tok_visa', 'dead', 1, repeat('x', 200), 'not_charged' "
                "FROM generate_series(1, 3000) g"
            )
        )
    errors = tmp_path / "stderr"
    shell = (
        f"{sys.executable} -m payq_cli dlq export --format jsonl 2>{errors} | head -n 2; "
        "echo exit=${PIPESTATUS:-}"
    )
    done = subprocess.run(
        ["bash", "-c", shell.replace("${PIPESTATUS:-}", "${PIPESTATUS[0]}")],
        env={**os.environ, **TEST_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(done.stdout.splitlines()) == 3 and done.stdout.endswith("exit=0\n")
    assert errors.read_text() == ""  # no traceback, no "Exception ignored", nothing


def test_a_worker_without_the_providers_key_exits_2_with_one_line() -> None:
    out = payq("worker", "--processes", "1", "--threads", "1", PAYMENT_PROVIDER_API_KEY="")
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1].startswith("payq: PAYMENT_PROVIDER_API_KEY: is not set")
    )
    assert "Traceback" not in out.stderr


def test_output_helpers_escape_what_terminals_and_spreadsheets_obey() -> None:
    assert terminal_safe(f"a{OSC52}b\nc") == "a\\x1b]52;c;ZWNobyBwd25lZA==\\x07b\\x0ac"
    assert terminal_safe("plain text, ünïcode") == "plain text, ünïcode"
    assert spreadsheet_safe("=1+1") == "'=1+1" and spreadsheet_safe("1+1") == "1+1"
    assert spreadsheet_safe(-5) == -5


def test_a_bad_cli_argument_is_not_echoed() -> None:
    out = payq("enqueue", "--amount", "1", "--currency", "usd", "--source", "tok_visa",
               "--key", "k-1", "--metadata", "4242424242424242")  # fmt: skip
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr
    assert "4242424242424242" not in out.stderr
