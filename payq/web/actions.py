"""The dashboard's confirmed actions: each confirmation's token works once.

A confirmation page carries a fresh random token. The POST that acts on it first claims
the token in PostgreSQL (``dashboard_actions``, an INSERT that a second claim cannot
repeat), runs the action, stores what it did, and redirects to that result's own page
(POST-redirect-GET). Reloading the result page shows the stored result; submitting the
same form again, from a second tab or the browser's history, only finds the token used
and shows the same result: nothing is replayed or purged twice. Several ``payq serve``
processes share the table, so it holds across them.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert

from payq.db import transaction
from payq.models import dashboard_actions

__all__ = ["claim", "finish", "new_token", "stored"]


def new_token() -> str:
    """A token for one confirmation page."""
    return secrets.token_urlsafe(24)


def claim(token: str, *, actor: str, action: str) -> bool:
    """Take ``token`` for this action; False if it was taken before (by any process)."""
    with transaction() as conn:
        taken = conn.execute(
            insert(dashboard_actions)
            .values(token=token, actor=actor, action=action)
            .on_conflict_do_nothing(index_elements=["token"])
            .returning(dashboard_actions.c.token)
        ).first()
    return taken is not None


def finish(token: str, result: dict[str, Any]) -> None:
    """Keep what the action did, for its result page."""
    with transaction() as conn:
        conn.execute(
            update(dashboard_actions)
            .where(dashboard_actions.c.token == token)
            .values(result=result, finished_at=func.now())
        )


def stored(token: str) -> dict[str, Any] | None:
    """The action a token was used for: actor, action, result (``None`` while running);
    ``None`` if the token was never used."""
    with transaction() as conn:
        row = (
            conn.execute(select(dashboard_actions).where(dashboard_actions.c.token == token))
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None
