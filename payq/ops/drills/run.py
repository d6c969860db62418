"""`run_drill`: the one entry point that checks, sets up and runs a drill.

It refuses what would make a drill unsafe or meaningless (an unknown drill, an
``env`` that moves the database, Redis or the namespace, a database holding
unfinished charges that are not a drill's), makes sure the services answer and
the database is migrated, hands a `Drill` to the drill's function, and closes
with the verdict. Logs are kept in a temporary directory unless the drill was ok.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from devservices import ensure_database, postgres_answers, redis_answers
from payq.db import make_engine
from payq.dramatiq_redis import Layout
from payq.errors import PayqError, ServiceUnavailable
from payq.migrate import migrate
from payq.models import charges
from payq.ops.drills.connection_error import drill_connection_error
from payq.ops.drills.names import DRILLS
from payq.ops.drills.orchestration import Drill, Figure, Story, say_verdict
from payq.ops.drills.payment_timeout import drill_payment_timeout
from payq.ops.drills.pool_exhaustion import drill_database_pool_exhaustion
from payq.redis_client import redis_client
from payq.settings import Settings, get_settings, load_settings

__all__ = ["DRILLS", "DrillRefused", "DrillResult", "run_drill"]


#: Settings a drill must share with its children: it counts rows in the same place.
_SHARED = frozenset({"DATABASE_URL", "REDIS_URL", "PAYQ_NAMESPACE"})
_UNFINISHED = ("pending", "processing", "retrying")


class DrillRefused(PayqError):
    """A drill would be unsafe or meaningless here; nothing was started."""


@dataclass(frozen=True)
class DrillResult:
    """What a drill printed and measured.

    ``lines`` are the printed lines (a header, progress lines starting with ``·``,
    the numbered story, the closing line); ``figures`` the measured numbers by name;
    ``problems`` why it is not ok (empty when ok).
    """

    name: str
    run: str
    ok: bool
    lines: list[str]
    figures: dict[str, Figure]
    problems: list[str] = field(default_factory=list)


_DRILL_FUNCTIONS: dict[str, Callable[[Drill], None]] = {
    "payment_timeout": drill_payment_timeout,
    "database_pool_exhaustion": drill_database_pool_exhaustion,
    "connection_error": drill_connection_error,
}


def run_drill(
    name: str,
    *,
    charges: int = 20,
    out: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> DrillResult:
    """Run one incident drill and return what it printed and measured.

    ``charges`` is how many charges the drill enqueues; ``out`` receives each line
    as it is printed; ``env`` adds environment variables for the drill's child
    processes (e.g. ``PAYMENT_TIMEOUT_MS=1500`` for a short run), which the figures
    then follow. ``env`` may not move the database, Redis or the namespace.

    Raises ``ValueError`` for an unknown drill or a bad argument, ``DrillRefused``
    when the database holds unfinished charges that are not a drill's,
    ``ServiceUnavailable`` when PostgreSQL or Redis does not answer.
    """
    if name not in DRILLS:
        raise ValueError(f"unknown drill {name!r}; choose one of {', '.join(DRILLS)}")
    if charges < 1:
        raise ValueError(f"charges must be at least 1, got {charges}")
    overrides = dict(env or {})
    moved = sorted(_SHARED & set(overrides))
    if moved:
        raise ValueError(f"env may not change {', '.join(moved)}: the drill counts its own rows")
    base = get_settings()
    fields = Settings.model_fields
    settings = load_settings(**{k.lower(): v for k, v in overrides.items() if k.lower() in fields})
    _require_services(base)
    ensure_database(base.database_url)
    engine = make_engine(base, "drill")
    run = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"payq-drill-{run}-"))
    story = Story(out)
    drill = Drill(name, run, charges, settings, overrides, engine, workdir, story)
    try:
        migrate(engine)
        _refuse_foreign_work(drill)
        _refuse_live_workers(base)
        _DRILL_FUNCTIONS[name](drill)
        ok = not drill.problems
    except BaseException:
        if any(workdir.iterdir()):
            story.progress(f"logs kept in {workdir}/")
        else:
            workdir.rmdir()
        raise
    finally:
        engine.dispose()
    say_verdict(drill, ok)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        story.progress(f"logs kept in {workdir}/")
    return DrillResult(name, run, ok, story.lines, drill.figures, drill.problems)


def _require_services(settings: Settings) -> None:
    if not postgres_answers(settings.database_url):
        raise ServiceUnavailable(
            "PostgreSQL does not answer at DATABASE_URL: start it, then run the drill again"
        )
    if not redis_answers(settings.redis_url):
        raise ServiceUnavailable(
            "Redis does not answer at REDIS_URL: start it, then run the drill again"
        )


def _refuse_live_workers(settings: Settings) -> None:
    """A drill's charges must reach its own workers and its own simulator: workers it does
    not own, consuming the same queues, would charge them through the live provider."""
    client = redis_client(settings)
    try:
        # Dramatiq's broker stamps a worker's heartbeat at each of its Redis commands.
        cutoff_ms = (time.time() - settings.relay_dead_worker_s) * 1000
        heartbeats = Layout(settings.payq_namespace).heartbeats
        live = client.zcount(heartbeats, cutoff_ms, "+inf")
    finally:
        client.close()
    if live:
        which = "worker process is" if live == 1 else "worker processes are"
        raise DrillRefused(
            f"{live} {which} consuming this namespace's queues (PAYQ_NAMESPACE="
            f"{settings.payq_namespace}): they would take the drill's charges and charge them "
            "through the live provider. Stop them, or run the drill against a scratch "
            "database and namespace (DATABASE_URL, PAYQ_NAMESPACE)"
        )


def _refuse_foreign_work(drill: Drill) -> None:
    with drill.engine.connect() as conn:
        foreign = conn.execute(
            select(func.count()).where(
                charges.c.status.in_(_UNFINISHED), ~charges.c.metadata.has_key("drill")
            )
        ).scalar_one()
    if foreign:
        which, them = ("charge is", "it") if foreign == 1 else ("charges are", "them")
        raise DrillRefused(
            f"{foreign} unfinished {which} in this database and not a drill's: the drill's "
            f"worker and relay would send {them} to the provider simulator. Let {them} finish, "
            "or point DATABASE_URL at a scratch database"
        )
