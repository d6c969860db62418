"""The operators' routes, under ``/ops``: the place of the ops dashboard.

Every path under ``/ops`` needs an operator token (``PAYQ_OPERATOR_TOKENS``): the
``Authenticate`` middleware refuses any other caller before routing, so a route added
to ``router`` is protected without a line of its own. Like the intake's routes, these
call the core (``payq.ops.status``, ``payq.ops.dlq``, ...) and add no logic of their own.
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(prefix="/ops", tags=["ops"])
