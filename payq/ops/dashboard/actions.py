"""The dashboard's confirmed actions: a token the server issued, good for one action once.

A confirmation page issues a fresh random token, kept in PostgreSQL
(``dashboard_actions``, by its digest) with what it confirms: the action, the filter
(a digest of it) and the operator's session. The POST that acts claims it, and the
claim holds only for that action, that filter and that session, within
``TOKEN_TTL_S``, and only once. Then it runs the action, stores what it did, and
redirects to the result's own page (POST-redirect-GET): reloading shows the stored
result; submitting the same form again finds the token used and shows the same result.
A token made up, taken from another action's page or another session, or expired runs
nothing. Several ``payq serve`` processes share the table, so it holds across them.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import secrets
from typing import Any

from sqlalchemy import func, insert, select, update

from payq.db import transaction
from payq.models import dashboard_actions

__all__ = ["TOKEN_TTL_S", "Claim", "claim", "digest", "finish", "issue", "stored"]

#: How long a confirmation page's token may be used.
TOKEN_TTL_S = 3600


class Claim(enum.Enum):
    TAKEN = "taken"  # this request runs the action
    USED = "used"  # it ran before (a reload, a resend): show its result
    REFUSED = "refused"  # unknown, expired, or issued for another action, filter or session


def digest(value: object) -> str:
    """A SHA-256 hex digest of a token, a session's secret, or a filter (as JSON)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def issue(*, action: str, flt: dict[str, Any], session_secret: str) -> str:
    """A new token for one confirmation page, kept with what it confirms."""
    token = secrets.token_urlsafe(24)
    with transaction() as conn:
        conn.execute(
            insert(dashboard_actions).values(
                token=digest(token),
                action=action,
                filter_digest=digest(flt),
                session_digest=digest(session_secret),
            )
        )
    return token


def claim(
    token: str, *, action: str, flt: dict[str, Any], session_secret: str, actor: str
) -> Claim:
    """Take the token to run its action now, if it was issued for exactly this."""
    key = digest(token)
    with transaction() as conn:
        taken = conn.execute(
            update(dashboard_actions)
            .where(
                dashboard_actions.c.token == key,
                dashboard_actions.c.started_at.is_(None),
                dashboard_actions.c.action == action,
                dashboard_actions.c.filter_digest == digest(flt),
                dashboard_actions.c.session_digest == digest(session_secret),
                dashboard_actions.c.issued_at > func.now() - dt.timedelta(seconds=TOKEN_TTL_S),
            )
            .values(started_at=func.now(), actor=actor)
            .returning(dashboard_actions.c.token)
        ).first()
        if taken is not None:
            return Claim.TAKEN
        used = conn.execute(
            select(dashboard_actions.c.token).where(
                dashboard_actions.c.token == key,
                dashboard_actions.c.started_at.is_not(None),
                dashboard_actions.c.action == action,
            )
        ).first()
    return Claim.USED if used is not None else Claim.REFUSED


def finish(token: str, result: dict[str, Any]) -> None:
    """Keep what the action did, for its result page."""
    with transaction() as conn:
        conn.execute(
            update(dashboard_actions)
            .where(dashboard_actions.c.token == digest(token))
            .values(result=result, finished_at=func.now())
        )


def stored(token: str) -> dict[str, Any] | None:
    """The action a token ran: actor, action, result (``None`` while running); ``None``
    if it never ran."""
    with transaction() as conn:
        row = (
            conn.execute(
                select(dashboard_actions).where(
                    dashboard_actions.c.token == digest(token),
                    dashboard_actions.c.started_at.is_not(None),
                )
            )
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None
