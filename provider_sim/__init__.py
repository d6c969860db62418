"""The payment provider simulator: the contract of provider-api.md with fault knobs.

Start it in-process with `SimulatorThread` (tests) or blocking with `serve`
(``payq provider-sim``); tune faults at start with `Faults` or at run time with
``POST /_faults``. The server half (aiohttp) loads on first use, so the ``payq``
command line can describe the simulator's options without it.
"""

from __future__ import annotations

from typing import Any

from provider_sim.faults import (
    Faults,
    Step,
    add_cli_arguments,
    add_fault_arguments,
    faults_from_args,
)

__all__ = [
    "Faults",
    "SimulatorState",
    "SimulatorThread",
    "Step",
    "add_cli_arguments",
    "add_fault_arguments",
    "build_app",
    "faults_from_args",
    "serve",
    "serve_from_args",
]

_SERVER = {"SimulatorState", "SimulatorThread", "build_app", "serve", "serve_from_args"}


def __getattr__(name: str) -> Any:
    if name in _SERVER:
        from provider_sim import server

        return getattr(server, name)
    raise AttributeError(f"module 'provider_sim' has no attribute {name!r}")
