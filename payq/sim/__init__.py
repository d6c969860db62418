"""The payment provider simulator: the contract of provider-api.md with fault knobs.

Start it in-process with `SimulatorThread` (tests) or blocking with `serve`
(``payq provider-sim``); tune faults at start with `Faults` or at run time with
``POST /_faults``.
"""

from payq.sim.faults import Faults, Step, add_fault_arguments, faults_from_args
from payq.sim.server import (
    SimulatorState,
    SimulatorThread,
    add_cli_arguments,
    build_app,
    serve,
    serve_from_args,
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
