"""End to end: a real Prometheus scrapes a real `payq worker` and `payq serve` with
``deploy/prometheus.yml``, the scrape config of ``docker-compose.yml``.

What Compose provides is stood in for: each target's service name becomes its process's
loopback address (the worker job's DNS lookup, a static target at the one group's
address), and the Compose secret's token file is a temporary one. The jobs, paths and
authorization are the file's own. The Prometheus is Debian's (package `prometheus`), not
the image's pinned release; both read the text format payq serves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devservices import free_port
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.e2e.test_workers import all_final, enqueue
from tests.helpers import wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

ROOT = Path(__file__).resolve().parents[2]
SECRET_PATH = "/run/secrets/payq-metrics-token"
OPERATOR_TOKEN = "tok_scrape_operator_0123456789"
INTAKE_TOKEN = "tok_scrape_intake_0123456789"


def local_config(addresses: dict[str, str], token_file: Path) -> dict[str, Any]:
    """deploy/prometheus.yml with each service name at its address here."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    for job in config["scrape_configs"]:
        targets = [
            addresses[str(target).rpartition(":")[0]]
            for group in job.pop("static_configs", [])
            for target in group["targets"]
        ]
        targets += [
            addresses[name] for lookup in job.pop("dns_sd_configs", []) for name in lookup["names"]
        ]
        job["static_configs"] = [{"targets": targets}]
        auth = job.get("authorization")
        if auth:
            assert auth["credentials_file"] == SECRET_PATH
            auth["credentials_file"] = str(token_file)
    return config


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "prometheus is missing: install the Debian package `prometheus`"
    return found


class Prometheus:
    """A Prometheus on 127.0.0.1 with a given config, its data in a temporary directory."""

    def __init__(self, binary: str, config: dict[str, Any], directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def api(self, path: str, **params: str) -> Any:
        """An API answer's data; None until Prometheus is ready (it answers 503 before)."""
        try:
            answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        except httpx.HTTPError:
            return None
        return answer.json()["data"] if answer.status_code == 200 else None

    def targets(self) -> dict[str, dict[str, Any]]:
        """Each job's target (one each here): its health and last error."""
        data = self.api("targets")
        return {t["labels"]["job"]: t for t in data["activeTargets"]} if data else {}

    def series(self, query: str) -> list[dict[str, Any]]:
        data = self.api("query", query=query)
        return list(data["result"]) if data else []

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=20)


@pytest.fixture
def payq_processes() -> Iterator[dict[str, str]]:
    """`payq serve` and a two-process `payq worker` group serving metrics, calling the
    simulator."""
    serve_port, metrics_port = free_port(), free_port()
    tokens = {"PAYQ_API_TOKENS": INTAKE_TOKEN, "PAYQ_OPERATOR_TOKENS": OPERATOR_TOKEN}
    with SimulatorThread(api_key=API_KEY) as sim:
        worker_env = {"METRICS_PORT": str(metrics_port), "PAYMENT_PROVIDER_URL": sim.url}
        serve = PayqProcess("serve", "--host", "127.0.0.1", "--port", str(serve_port), env=tokens)
        worker = PayqProcess("worker", "--processes", "2", "--threads", "2", env=worker_env)
        with serve, worker:
            yield {"serve": f"127.0.0.1:{serve_port}", "worker": f"127.0.0.1:{metrics_port}"}


def totals(prometheus: Prometheus) -> tuple[float, float]:
    """payq's charges and Dramatiq's messages, summed over the worker group's processes."""
    charges, messages = (
        prometheus.series(f'sum({name}{{job="payq-worker"}})')
        for name in ("payq_charges_total", "dramatiq_messages_total")
    )
    return (
        float(charges[0]["value"][1]) if charges else 0.0,
        float(messages[0]["value"][1]) if messages else 0.0,
    )


def test_prometheus_scrapes_the_workers_and_serve_with_the_compose_config(
    payq_processes: dict[str, str], prometheus_binary: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "payq-metrics-token"
    token_file.write_text(OPERATOR_TOKEN + "\n", encoding="utf-8")  # as a secret file may end
    prometheus = Prometheus(prometheus_binary, local_config(payq_processes, token_file), tmp_path)
    try:
        targets = wait_until(
            lambda: (
                (found := prometheus.targets())
                and all(t["health"] == "up" for t in found.values())
                and found
            ),
            40,
            "both jobs' targets up",
        )
        assert set(targets) == {"payq-worker", "payq-serve"}
        assert targets["payq-serve"]["scrapeUrl"].endswith("/metrics")
        # The worker job sees the whole group (two processes): payq's and Dramatiq's counts.
        ids = enqueue(6, prefix="scrape")
        wait_until(lambda: all_final(ids), 60, "every charge to end final")
        # Every charge once; a message may come round again (a deferral), never fewer.
        wait_until(
            lambda: (seen := totals(prometheus))[0] == len(ids) and seen[1] >= len(ids),
            30,
            "the worker group's charges and messages in Prometheus",
        )
        # Serve's job sees the intake's request counts, its own scrapes among them.
        scrapes = wait_until(
            lambda: prometheus.series(
                '{job="payq-serve", __name__="payq_http_requests_total", route="/metrics"}'
            ),
            20,
            "serve's count of its /metrics requests",
        )
        assert {s["metric"]["status"] for s in scrapes} == {"200"}

        # The token is what lets Prometheus in: a wrong one, and serve refuses the scrape.
        token_file.write_text("tok_not_an_operator_0123456789\n", encoding="utf-8")
        refused = wait_until(
            lambda: (
                prometheus.targets().get("payq-serve", {}).get("health") == "down"
                and prometheus.targets()["payq-serve"]
            ),
            20,
            "serve's target down with a wrong token",
        )
        assert "401" in refused["lastError"]
    except BaseException:
        print(prometheus.log.read_text(errors="replace")[-4000:])
        raise
    finally:
        prometheus.stop()
