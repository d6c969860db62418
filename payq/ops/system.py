"""A whole payq system on this machine: provider simulator, worker groups, the relay.

The demo, the incident drills and the chaos run use one: supervised child processes
(restarted if they die), the simulator on free ports with a fresh API key, logs in a
folder. The demo and the drills run one worker group; the chaos run several, so that
killing one leaves the others serving. With ``endpoints``, the simulator runs as that
many independent providers (its own books each) and the workers get a
``PAYMENT_ENDPOINTS`` naming them.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devservices import free_port
from payq.ops.supervise import Supervised
from payq.ops.waiting import wait_for_http, wait_for_log

__all__ = ["LocalSystem", "start_local_system"]


@dataclass
class LocalSystem:
    """The running processes, and how to talk to the simulator."""

    sim_urls: list[str]  # one independent provider each
    api_key: str
    env: dict[str, str]
    processes: int  # per worker group
    threads: int  # per worker process
    sim: Supervised
    workers: list[Supervised]  # one per worker group (a `payq worker` master each)
    relay: Supervised
    logs: dict[str, Path]

    @property
    def sim_url(self) -> str:
        """The first provider's URL."""
        return self.sim_urls[0]

    @property
    def worker(self) -> Supervised:
        """The first worker group (the only one, unless started with ``groups``)."""
        return self.workers[0]

    def faults(self, provider: int = 0, **knobs: Any) -> None:
        """Set fault knobs of one provider (the first by default)."""
        url = self.sim_urls[provider]
        httpx.post(f"{url}/_faults", json=knobs, timeout=5).raise_for_status()

    def stats(self, provider: int = 0) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.sim_urls[provider]}/_stats", timeout=5).json()
        return data

    def requests_for(self, key: str, provider: int = 0) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.sim_urls[provider]}/_requests", params={"idempotency_key": key}, timeout=5
        )
        data: list[dict[str, Any]] = response.json()
        return data

    def request_log(self, provider: int = 0) -> list[dict[str, Any]]:
        """Every charge request one provider received, all keys, in arrival order."""
        response = httpx.get(f"{self.sim_urls[provider]}/_requests/all", timeout=30)
        response.raise_for_status()
        data: list[dict[str, Any]] = response.json()
        return data

    def books(self, provider: int = 0) -> list[dict[str, Any]]:
        """One provider's books: every key it charged or declined (``GET /_charges``)."""
        response = httpx.get(f"{self.sim_urls[provider]}/_charges", timeout=30)
        response.raise_for_status()
        data: list[dict[str, Any]] = response.json()
        return data

    def provider_charge_id(self, key: str) -> str | None:
        """The first provider's charge for ``key``, looked up as payq's reconciliation does."""
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
        for child in (self.sim, *self.workers, self.relay):
            child.check()

    def stop_workers(self) -> None:
        """Stop the relay and the workers, leaving the simulator up to be asked."""
        self.relay.stop()
        for worker in self.workers:
            worker.stop()


@contextlib.contextmanager
def start_local_system(
    workdir: Path,
    *,
    sim_args: Sequence[str],
    processes: int,
    threads: int,
    env: Mapping[str, str] | None = None,
    groups: int = 1,
    endpoints: Callable[[list[str]], list[dict[str, Any]]] | None = None,
    providers: int = 1,
) -> Iterator[LocalSystem]:
    """Start it, return once the workers are ready; stop everything on the way out.

    ``groups`` worker groups of ``processes`` x ``threads`` each; the first logs to
    ``logs["worker"]``, the others to ``logs["worker-2"]``, ``logs["worker-3"]``, ...
    ``providers`` independent providers; ``endpoints``, given their URLs, the
    ``PAYMENT_ENDPOINTS`` entries the workers call them by.
    """
    ports = [free_port() for _ in range(providers)]
    sim_urls = [f"http://127.0.0.1:{port}" for port in ports]
    api_key = "sk_local_" + uuid.uuid4().hex
    child_env = {
        **os.environ,
        **(env or {}),
        "PAYMENT_PROVIDER_URL": sim_urls[0],
        "PAYMENT_PROVIDER_API_KEY": api_key,
    }
    # Only the endpoints given here: none inherited from this process's environment.
    child_env["PAYMENT_ENDPOINTS"] = json.dumps(endpoints(sim_urls)) if endpoints else ""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    group_names = ["worker", *(f"worker-{n}" for n in range(2, groups + 1))]
    names = ("provider-sim", *group_names, "relay")
    logs = {name: workdir / f"{name}.log" for name in names}
    for path in logs.values():
        path.write_bytes(b"")
    worker_argv = ["worker", "--processes", str(processes), "--threads", str(threads)]
    system = LocalSystem(
        sim_urls=sim_urls,
        api_key=api_key,
        env=child_env,
        processes=processes,
        threads=threads,
        sim=Supervised(
            "provider-sim",
            ["provider-sim", "--port", ",".join(map(str, ports)), *sim_args],
            child_env,
            logs["provider-sim"],
        ),
        workers=[Supervised(name, worker_argv, child_env, logs[name]) for name in group_names],
        relay=Supervised("relay", ["relay"], child_env, logs["relay"]),
        logs=logs,
    )
    try:
        system.sim.start()
        for url in sim_urls:
            wait_for_http(f"{url}/_stats")
        for worker in system.workers:
            worker.start()
        system.relay.start()
        for name in group_names:
            wait_for_log(logs[name], "ready for action", count=processes)
        yield system
    finally:
        system.stop_workers()
        system.sim.stop()
