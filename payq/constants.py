"""Names defined once: queue and actor names, Redis key prefixes, charge states."""

from enum import StrEnum

__all__ = [
    "ACTOR_NAME",
    "CHARGED_NOTHING",
    "FINAL_STATUSES",
    "MAY_STILL_ARRIVE",
    "QUEUE_NAME",
    "SETTLED_STATUSES",
    "SYSTEM_ACTOR",
    "UNCERTAIN_OUTCOMES",
    "UNDECODABLE_ACTOR_NAME",
    "AttemptKind",
    "AttemptOutcome",
    "ChargeStatus",
    "DeadOutcome",
    "DeferralCause",
    "redis_key",
]

#: The Dramatiq queue charges travel on. Producers send to it by name.
QUEUE_NAME = "charges"
#: The actor that processes one charge; producers address it by this name only.
ACTOR_NAME = "process_charge"
#: Messages that cannot be decoded are addressed to this (never registered) actor
#: so that Dramatiq moves them to its dead-letter set instead of losing them.
UNDECODABLE_ACTOR_NAME = "payq_undecodable_message"


class ChargeStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"


FINAL_STATUSES = frozenset({ChargeStatus.SUCCEEDED, ChargeStatus.FAILED, ChargeStatus.DEAD})
#: Final by the provider's own answer: nothing payq learns later can change them. A dead
#: charge is final for payq, not for the provider's books: a late answer still settles it.
SETTLED_STATUSES = frozenset({ChargeStatus.SUCCEEDED, ChargeStatus.FAILED})


class AttemptKind(StrEnum):
    """What one request to the provider was (``charge_attempts.kind``)."""

    CHARGE = "charge"  # POST /v1/charges
    LOOKUP = "lookup"  # GET /v1/charges?idempotency_key=


class AttemptOutcome(StrEnum):
    """How one request ended, as far as the provider's books are concerned."""

    IN_FLIGHT = "in_flight"  # written before the call; the worker has not recorded it (yet)
    ABANDONED = "abandoned"  # still in flight when the charge was claimed again: unknown
    NOT_SENT = "not_sent"  # claimed, but its worker stalled past the lease before sending
    SUCCEEDED = "succeeded"  # 200 charge object: charged
    DECLINED = "declined"  # 402: a decline, stored by the provider
    REJECTED = "rejected"  # 400, 401, 409 reused: refused before charging
    NO_CHARGE = "no_charge"  # 429: charged nothing, by the contract
    UNCLEAR = "unclear"  # 5xx, 409 in use, an odd status or body: an answer that does not say
    REFUSED = "refused"  # no connection could be made: not one byte of the request left
    NO_ANSWER = "no_answer"  # timeout, reset, connection error: no answer at all
    UNRECORDED = "unrecorded"  # an answer came but could not be stored as it was
    NOT_FOUND = "not_found"  # a lookup: the provider has no charge with this key


#: Attempts after which the provider may have charged without payq knowing: before a
#: charge with one of these goes dead, it is looked up by key. ``IN_FLIGHT`` counts when
#: it is not the charge's current call; the next claim marks it ``ABANDONED`` (its
#: worker died or stalled past its lease), and a late record still writes what happened.
UNCERTAIN_OUTCOMES = frozenset(
    {
        AttemptOutcome.IN_FLIGHT,
        AttemptOutcome.ABANDONED,
        AttemptOutcome.UNCLEAR,
        AttemptOutcome.NO_ANSWER,
        AttemptOutcome.UNRECORDED,
    }
)


#: Requests that may still reach the provider after payq stopped waiting for them: no
#: answer came (a timeout, a reset) or none was recorded. Within their claim plus the
#: lease, a lookup that finds no charge proves nothing (``ledger.pending_calls_s``).
MAY_STILL_ARRIVE = frozenset(
    {AttemptOutcome.IN_FLIGHT, AttemptOutcome.ABANDONED, AttemptOutcome.NO_ANSWER}
)

#: Requests that charged nothing, as the contract says: after one of these, and none of
#: ``UNCERTAIN_OUTCOMES`` in the same ledger group, the charge may go to another group.
CHARGED_NOTHING = frozenset(
    {
        AttemptOutcome.REJECTED,
        AttemptOutcome.NO_CHARGE,
        AttemptOutcome.REFUSED,
        AttemptOutcome.NOT_SENT,
    }
)


class DeadOutcome(StrEnum):
    """What a dead charge is known to have done at the provider (``charges.dead_outcome``)."""

    NOT_CHARGED = "not_charged"  # every answer was one that charges nothing
    VERIFIED_NOT_CHARGED = "verified_not_charged"  # looked up by key: no charge (404)
    UNKNOWN = "unknown"  # could not be looked up yet: the sweep asks again


class DeferralCause(StrEnum):
    """Why a charge's message was sent again for later, no attempt used
    (``payq_deferrals_total{cause}``, ``payq status``)."""

    BREAKER_OPEN = "breaker_open"  # the fleet's circuit breaker is open
    BREAKER_HALF_OPEN = "breaker_half_open"  # half-open, its probes are out
    FLEET_FULL = "fleet_full"  # every fleet slot (PAYMENT_MAX_CONCURRENCY) is in use
    FLEET_STARTING = "fleet_starting"  # a new, emptied or promoted Redis: slots re-registering
    REDIS = "redis"  # Redis did not answer the gate
    DB_POOL = "db_pool"  # no database connection within DB_TIMEOUT_MS
    DATABASE = "database"  # PostgreSQL did not answer the claim
    EARLY_MESSAGE = "early_message"  # a retry's message came before its time
    FLEET_SLOT_LOST = "fleet_slot_lost"  # the slot lapsed before the call (a frozen process)
    PINNED = "pinned"  # pinned to another ledger group than the endpoint picked: picked again


#: Who ``operator_actions`` names when payq itself changed a charge (a late answer, a lookup).
SYSTEM_ACTOR = "payq"


def redis_key(namespace: str, *parts: str) -> str:
    """payq's own Redis keys live beside Dramatiq's, under ``<namespace>:payq:``."""
    return ":".join((namespace, "payq", *parts))
