"""The README's web-app example works as pasted, against the suite's database.

Reproduced before: ``f"order-{order.id}"`` before a flush gave ``order-None``, so a
second order got the first order's charge back (never charged), or an
``IdempotencyConflict`` for another amount.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from payq.db import transaction
from payq.models import charges
from tests.conftest import TEST_ENV

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("clean")


def web_app_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using it from a web app") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the README's web-app section has no Python example"
    return found.group(1)


def test_the_web_app_example_runs_as_pasted_and_each_order_gets_its_own_charge(
    tmp_path: Path,
) -> None:
    script = tmp_path / "app.py"
    script.write_text(web_app_example())
    try:
        printed = []
        for _ in range(2):  # two orders of the same amount
            done = subprocess.run(
                [sys.executable, str(script)],
                env={**os.environ, **TEST_ENV},
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert done.returncode == 0, done.stderr
            printed.append(done.stdout.strip())
        assert printed == ["pending", "pending"]
        with transaction() as conn:
            keys = sorted(conn.execute(select(charges.c.idempotency_key)).scalars())
            orders = conn.execute(select(func.count()).select_from(text("shop_orders"))).scalar()
        assert orders == 2
        assert len(keys) == 2 and all(re.fullmatch(r"shop-order-\d+", k) for k in keys), keys
    finally:
        with transaction() as conn:
            conn.execute(text("DROP TABLE IF EXISTS shop_orders"))
