"""`payq serve` as a real process, over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from devservices import free_port
from payq.ops.waiting import wait_for_http
from tests.conftest import TEST_ENV
from tests.processes import PayqProcess
from tests.webapp import INTAKE, OPERATOR

pytestmark = pytest.mark.usefixtures("clean")


def test_serve_takes_a_charge_over_http() -> None:
    port = free_port()
    env = {"PAYQ_API_TOKENS": INTAKE, "PAYQ_OPERATOR_TOKENS": OPERATOR}
    with PayqProcess("serve", "--port", str(port), env=env) as server:
        base = f"http://127.0.0.1:{port}"

        wait_for_http(f"{base}/healthz", timeout_s=30)
        auth = {"Authorization": f"Bearer {INTAKE}"}
        body = {"amount": 1999, "currency": "usd", "source": "tok_visa"}
        headers = {**auth, "Idempotency-Key": "order-http-1"}
        created = httpx.post(f"{base}/v1/charges", json=body, headers=headers, timeout=10)
        assert created.status_code == 201, created.text
        again = httpx.post(f"{base}/v1/charges", json=body, headers=headers, timeout=10)
        assert again.status_code == 200 and again.json()["id"] == created.json()["id"]
        found = httpx.get(f"{base}/v1/charges/{created.json()['id']}", headers=auth, timeout=10)
        assert found.json()["status"] in ("pending", "processing", "retrying", "dead")
        refused = httpx.post(f"{base}/v1/charges", json=body, timeout=10)
        assert refused.status_code == 401
        metrics = httpx.get(
            f"{base}/metrics", headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=10
        )
        assert 'route="/v1/charges",status="201"' in metrics.text
        assert "server" not in {k.lower() for k in created.headers}
        output = server.output()
    assert f"intake on http://127.0.0.1:{port}" in output  # 127.0.0.1 unless told otherwise
    assert INTAKE not in output and OPERATOR not in output


def test_serve_refuses_to_start_without_an_intake_token() -> None:
    env = {**os.environ, **TEST_ENV, "PAYQ_API_TOKENS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "payq_cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("payq: PAYQ_API_TOKENS: no intake token set")
    assert len(result.stderr.strip().splitlines()) == 1
