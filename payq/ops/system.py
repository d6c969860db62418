"""A whole payq system on this machine: provider simulator, one worker group, the relay.

The demo and the incident drills both run one: supervised child processes (restarted
if they die), the simulator on a free port with a fresh API key, logs in a folder.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from payq.devservices import free_port
from payq.ops.supervise import Supervised
from payq.ops.waiting import wait_for_http, wait_for_log

__all__ = ["LocalSystem", "start_local_system"]


@dataclass
class LocalSystem:
    """The running processes, and how to talk to the simulator."""

    sim_url: str
    api_key: str
    env: dict[str, str]
    processes: int
    threads: int
    sim: Supervised
    worker: Supervised
    relay: Supervised
    logs: dict[str, Path]

    def faults(self, **knobs: Any) -> None:
        httpx.post(f"{self.sim_url}/_faults", json=knobs, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.sim_url}/_stats", timeout=5).json()
        return data

    def requests_for(self, key: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.sim_url}/_requests", params={"idempotency_key": key}, timeout=5
        )
        data: list[dict[str, Any]] = response.json()
        return data

    def provider_charge_id(self, key: str) -> str | None:
        """The provider's charge for ``key``, looked up as payq's reconciliation does."""
        response = httpx.get(
            f"{self.sim_url}/v1/charges",
            params={"idempotency_key": key},
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=5,
        )
        if response.status_code != 200:
            return None
        return str(response.json().get("id"))

    def check(self) -> None:
        """Restart whatever died (the dramatiq master stops its group when a child dies)."""
        for child in (self.sim, self.worker, self.relay):
            child.check()

    def stop_workers(self) -> None:
        """Stop the relay and the workers, leaving the simulator up to be asked."""
        self.relay.stop()
        self.worker.stop()


@contextlib.contextmanager
def start_local_system(
    workdir: Path,
    *,
    sim_args: Sequence[str],
    processes: int,
    threads: int,
    env: Mapping[str, str] | None = None,
) -> Iterator[LocalSystem]:
    """Start it, return once the workers are ready; stop everything on the way out."""
    port = free_port()
    sim_url = f"http://127.0.0.1:{port}"
    api_key = "sk_local_" + uuid.uuid4().hex
    child_env = {
        **os.environ,
        **(env or {}),
        "PAYMENT_PROVIDER_URL": sim_url,
        "PAYMENT_PROVIDER_API_KEY": api_key,
    }
    logs = {name: workdir / f"{name}.log" for name in ("provider-sim", "worker", "relay")}
    for path in logs.values():
        path.write_bytes(b"")
    worker_argv = ["worker", "--processes", str(processes), "--threads", str(threads)]
    system = LocalSystem(
        sim_url=sim_url,
        api_key=api_key,
        env=child_env,
        processes=processes,
        threads=threads,
        sim=Supervised(
            "provider-sim",
            ["provider-sim", "--port", str(port), *sim_args],
            child_env,
            logs["provider-sim"],
        ),
        worker=Supervised("worker", worker_argv, child_env, logs["worker"]),
        relay=Supervised("relay", ["relay"], child_env, logs["relay"]),
        logs=logs,
    )
    try:
        system.sim.start()
        wait_for_http(f"{sim_url}/_stats")
        system.worker.start()
        system.relay.start()
        wait_for_log(logs["worker"], "ready for action", count=processes)
        yield system
    finally:
        system.stop_workers()
        system.sim.stop()
