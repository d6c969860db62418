"""Incident drills: ``payq simulate payment_timeout | database_pool_exhaustion | connection_error``.

Each drill reproduces one error of the incident payq is built for (the provider timing
out after 5000 ms, HTTPS pools timing out, the database pool running dry) against the
provider simulator and live payq processes, then tells in numbered lines, with measured
figures, what happened and why nothing was lost. A drill is ok only if every charge
ended final, the provider made one charge per succeeded charge and none twice
(``duplicate_charges`` 0), and the error it is about really happened.

Never run a drill against a live system: it points payq's workers at a simulator. It
refuses to start while the database holds unfinished charges that are not a drill's
(its worker and relay would send them to the simulator).

`run` holds the entry point, `orchestration` what every drill shares (processes, counts,
verdict), one module per drill tells its story, and `cli` registers ``payq simulate``.
"""

from __future__ import annotations

from typing import Any

from payq.ops.drills.cli import add_simulate_command
from payq.ops.drills.names import DRILLS

__all__ = [
    "DRILLS",
    "DrillRefused",
    "DrillResult",
    "Figure",
    "add_simulate_command",
    "run_drill",
]


def __getattr__(name: str) -> Any:
    """The drills themselves load on first use: ``payq --help`` need not load them."""
    if name in {"DrillRefused", "DrillResult", "run_drill"}:
        from payq.ops.drills import run

        return getattr(run, name)
    if name == "Figure":
        from payq.ops.drills.orchestration import Figure

        return Figure
    raise AttributeError(f"module 'payq.ops.drills' has no attribute {name!r}")
