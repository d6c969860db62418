"""The simulator's in-memory state: fault knobs, charges, stored idempotency keys, counters.

`provider_sim.app` asks `SimulatorState` what happens to each request; everything
here runs on the simulator's one event loop, so it needs no locks.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from provider_sim.faults import KNOBS, Faults, Step

__all__ = [
    "ChargeParams",
    "JSONObject",
    "RequestRecord",
    "SimulatorState",
    "StoredOutcome",
]

JSONObject = dict[str, Any]

MAX_AMOUNT = 99_999_999
ERROR_STATUSES = (500, 502, 503, 504)
DECLINE_TOKENS = {
    "tok_chargeDeclined": "card_declined",
    "tok_chargeDeclinedInsufficientFunds": "insufficient_funds",
    "tok_chargeDeclinedExpiredCard": "expired_card",
}
DECLINE_MESSAGES = {
    "card_declined": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
}
#: Tokens the simulated provider never issued: refused with a 400 (like a real "no such token").
UNKNOWN_TOKEN_PREFIX = "tok_invalid"  # noqa: S105 - a test token prefix, not a secret
_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")
_CURRENCY_RE = re.compile(r"[A-Za-z]{3}")


@dataclass(frozen=True)
class ChargeParams:
    """A validated charge request; ``canonical`` is the whole body, for key comparison."""

    key: str
    canonical: str
    amount: int
    currency: str
    source: str

    @staticmethod
    def validate(body: JSONObject) -> tuple[str, str] | None:
        """``(param, message)`` for the first invalid field, or None if the body is valid."""
        amount = body.get("amount")
        if type(amount) is not int or not 1 <= amount <= MAX_AMOUNT:
            return "amount", f"amount must be an integer from 1 to {MAX_AMOUNT} (minor units)"
        currency = body.get("currency")
        if not isinstance(currency, str) or not _CURRENCY_RE.fullmatch(currency):
            return "currency", "currency must be a three-letter code"
        source = body.get("source")
        if not isinstance(source, str) or not source.strip():
            return "source", "source must be a non-empty payment token"
        if source.startswith(UNKNOWN_TOKEN_PREFIX):
            return "source", "no such payment token"
        return None

    @classmethod
    def from_body(cls, key: str, body: JSONObject) -> ChargeParams:
        """Build from a body that passed `validate`."""
        return cls(
            key=key,
            canonical=json.dumps(body, sort_keys=True),
            amount=body["amount"],
            currency=body["currency"].lower(),
            source=body["source"],
        )


@dataclass
class RequestRecord:
    """One ``POST /v1/charges`` as it reached the simulator (``GET /_requests``).

    ``status`` is None when the client got no complete answer (a reset, or it
    hung up first); ``fault`` names the fault or script step that fired. ``at`` and
    ``ended_at`` are this process's ``time.time()``: arrival, and the moment the
    simulator was done with the request (its answer written, or the connection gone).
    """

    at: float
    status: int | None = None
    fault: str | None = None
    retry_after_s: int | None = None
    replayed: bool = False
    ended_at: float | None = None

    def to_dict(self) -> JSONObject:
        """JSON-ready form, as ``GET /_requests`` documents it (without ``ended_at``)."""
        data = dataclasses.asdict(self)
        del data["ended_at"]
        return data

    def to_log_dict(self, key: str) -> JSONObject:
        """JSON-ready form for the whole log (``GET /_requests/all``): key and end time too."""
        return {"idempotency_key": key, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class StoredOutcome:
    """A stored 200 or 402, replayed for a later request with the same key and body."""

    canonical: str
    status: int
    body: JSONObject
    charge_id: str


class SimulatorState:
    """Everything the simulator remembers: faults, charges, stored keys, counters.

    Used from one event loop only, so its methods need no locks; a decision taken
    between two awaits is atomic.
    """

    requests: int
    charge_requests: int
    charges_created: int
    declines: int
    replays: int
    max_in_flight: int
    peak: list[str]
    by_status: dict[str, int]
    charges: dict[str, JSONObject]
    _outcomes: dict[str, StoredOutcome]
    _new_charges_by_key: Counter[str]
    _log: dict[str, list[RequestRecord]]
    _arrivals: list[tuple[str, RequestRecord]]

    def __init__(self, api_key: str, faults: Faults | None = None) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.api_key = api_key
        self.faults = Faults()
        self.rng = random.Random()
        self.script: deque[Step] = deque()
        self.outage_until: float | None = None
        self.in_flight = 0
        self._open: dict[int, tuple[str, float]] = {}
        self._claims: dict[str, str] = {}  # idempotency key -> canonical body, in flight
        self._install(faults or Faults(), changed=set(KNOBS))
        self.reset_stats()

    # faults
    def _install(self, faults: Faults, changed: set[str]) -> None:
        self.faults = faults
        if "script" in changed:
            self.script = deque(Step(step) for step in faults.script)
        if "seed" in changed:
            self.rng.seed(faults.seed)
        if "outage_s" in changed:
            has_outage = faults.outage_s > 0
            self.outage_until = time.monotonic() + faults.outage_s if has_outage else None

    def update_faults(self, data: JSONObject) -> None:
        """Merge a partial update (``POST /_faults``); ``{"reset": true}`` restores defaults.

        Raises ``ValueError`` naming the knob; nothing changes then.
        """
        knobs = dict(data)
        reset = knobs.pop("reset", False)
        if not isinstance(reset, bool):
            raise ValueError(f"'reset' must be true or false, got {reset!r}")
        base = Faults() if reset else self.faults
        self._install(base.updated(knobs), set(KNOBS) if reset else set(knobs))

    def faults_view(self) -> JSONObject:
        """Current knobs; ``script`` holds the steps not yet consumed."""
        view = self.faults.to_dict()
        view["script"] = [step.value for step in self.script]
        view["outage_remaining_s"] = round(self.outage_remaining_s(), 3)
        return view

    def outage_remaining_s(self) -> float:
        """Seconds left in the outage window (0 when there is none)."""
        if self.outage_until is None:
            return 0.0
        return max(0.0, self.outage_until - time.monotonic())

    def outage_active(self) -> bool:
        """True while the outage window lasts."""
        return self.outage_remaining_s() > 0

    def latency_s(self) -> float:
        """Latency to sleep before this answer: fixed plus uniform jitter."""
        jitter_ms = self.rng.uniform(0, self.faults.latency_jitter_ms)
        return (self.faults.latency_ms + jitter_ms) / 1000

    def _draw(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def pop_script_step(self) -> Step | None:
        """The next script step, consumed, or None when the script is empty."""
        return self.script.popleft() if self.script else None

    def draw_early_fault(self) -> Step | None:
        """Random faults that fire before validation, in order: reset, rate_limit, error."""
        if self._draw(self.faults.reset_rate):
            return Step.RESET
        if self._draw(self.faults.rate_limit_rate):
            return Step.RATE_LIMIT
        if self._draw(self.faults.error_rate):
            return Step.ERROR
        return None

    def draw_lookup_error(self) -> bool:
        """Whether this lookup by key fails with a 503 (``lookup_error_rate``)."""
        return self._draw(self.faults.lookup_error_rate)

    def random_error_status(self) -> int:
        """A 5xx status chosen at random."""
        return self.rng.choice(ERROR_STATUSES)

    # request accounting
    def begin_request(
        self, key: str | None, *, is_charge: bool, opened: object = None, label: str = ""
    ) -> RequestRecord | None:
        """Count a /v1 request on arrival; log it if it is a charge with a key.

        ``opened`` (any object, given again to ``end_request``) and ``label`` ("GET
        /v1/charges") keep the request among the open ones, so that a new peak of
        ``max_in_flight`` says which requests made it (``/_stats``'s ``peak``).
        """
        self.requests += 1
        self.in_flight += 1
        if opened is not None:
            self._open[id(opened)] = (label, time.monotonic())
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
            now = time.monotonic()
            self.peak = [f"{lbl} {1000 * (now - at):.0f}ms" for lbl, at in self._open.values()]
        if not is_charge:
            return None
        self.charge_requests += 1
        if key is None:
            return None
        record = RequestRecord(at=time.time())
        self._log.setdefault(key, []).append(record)
        self._arrivals.append((key, record))
        return record

    def end_request(
        self, record: RequestRecord | None, status: int | None, opened: object = None
    ) -> None:
        """Count a /v1 request as finished with ``status`` (None: no answer)."""
        self.in_flight -= 1
        self._open.pop(id(opened), None)
        label = "no_answer" if status is None else str(status)
        self.by_status[label] = self.by_status.get(label, 0) + 1
        if record is not None:
            record.status = status
            record.ended_at = time.time()

    def requests_for(self, key: str) -> list[RequestRecord]:
        """Every charge request with ``key``, in arrival order."""
        return list(self._log.get(key, []))

    def request_log(self) -> list[tuple[str, RequestRecord]]:
        """Every charge request with a key, ``(key, record)`` in arrival order.

        The chaos run reads it once at the end to check Retry-After across all keys
        and to count calls during an outage, instead of thousands of per-key calls.
        """
        return list(self._arrivals)

    # idempotency and charges
    @staticmethod
    def valid_key(key: str) -> bool:
        """An idempotency key is 1..255 printable ASCII characters."""
        return _KEY_RE.fullmatch(key) is not None

    def check_key(self, params: ChargeParams) -> tuple[str | None, StoredOutcome | None]:
        """``(conflict code, None)``, ``(None, outcome to replay)`` or ``(None, None)``."""
        claimed = self._claims.get(params.key)
        if claimed is not None:
            same = claimed == params.canonical
            return ("idempotency_key_in_use" if same else "idempotency_key_reused"), None
        stored = self._outcomes.get(params.key)
        if stored is None:
            return None, None
        if stored.canonical != params.canonical:
            return "idempotency_key_reused", None
        self.replays += 1
        return None, stored

    def claim(self, params: ChargeParams) -> None:
        """Mark the key in flight until `release`."""
        self._claims[params.key] = params.canonical

    def release(self, params: ChargeParams) -> None:
        """End the in-flight mark of the key."""
        self._claims.pop(params.key, None)

    def key_in_flight(self, key: str) -> bool:
        """True while a first request with ``key`` is being processed."""
        return key in self._claims

    def make_outcome(
        self, params: ChargeParams, step: Step | None
    ) -> tuple[StoredOutcome, Step | None]:
        """Charge or decline, store the outcome; return it and the fault that fired.

        ``step`` is the script step of the request (None: draw the random knobs).
        """
        code = DECLINE_TOKENS.get(params.source)
        fault: Step | None = None
        if step is None:
            if code is None and self._draw(self.faults.decline_rate):
                code, fault = "card_declined", Step.DECLINE
            if self._draw(self.faults.timeout_rate):
                fault = Step.TIMEOUT
            elif self._draw(self.faults.trickle_rate):
                fault = Step.TRICKLE
        elif step is Step.DECLINE:
            code, fault = code or "card_declined", Step.DECLINE
        elif step in (Step.TIMEOUT, Step.TRICKLE, Step.SLOW):
            fault = step
        charge_id = "ch_" + secrets.token_hex(12)
        charge: JSONObject = {
            "id": charge_id,
            "object": "charge",
            "status": "succeeded" if code is None else "failed",
            "amount": params.amount,
            "currency": params.currency,
            "created": int(time.time()),
        }
        if code is None:
            status, body = 200, dict(charge)
            self.charges_created += 1
            self._new_charges_by_key[params.key] += 1
        else:
            error = {
                "type": "card_error",
                "code": code,
                "message": DECLINE_MESSAGES[code],
                "charge": charge_id,
            }
            charge["error"] = error
            status, body = 402, {"error": dict(error)}
            self.declines += 1
        self.charges[charge_id] = charge
        outcome = StoredOutcome(params.canonical, status, body, charge_id)
        self._outcomes[params.key] = outcome
        return outcome, fault

    def charge_for_key(self, key: str) -> JSONObject | None:
        """The charge object created with ``key``, or None."""
        outcome = self._outcomes.get(key)
        return None if outcome is None else self.charges.get(outcome.charge_id)

    def books(self) -> list[JSONObject]:
        """The provider's books (``GET /_charges``): every stored outcome by key, with its
        charge's id and status (``succeeded`` charged, ``failed`` declined)."""
        return [
            {"idempotency_key": key, "id": outcome.charge_id, "status": charge["status"]}
            for key, outcome in self._outcomes.items()
            if (charge := self.charges.get(outcome.charge_id)) is not None
        ]

    def forget_keys(self) -> int:
        """Drop every stored outcome (as if keys expired), keeping the counters.

        A client that then resends a charged key is charged again, and
        ``duplicate_charges`` shows it.
        """
        count = len(self._outcomes)
        self._outcomes.clear()
        return count

    # stats
    def stats(self) -> JSONObject:
        """The ``GET /_stats`` document."""
        return {
            "requests": self.requests,
            "charges": self.charges_created,
            "replays": self.replays,
            "duplicate_charges": sum(1 for n in self._new_charges_by_key.values() if n > 1),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            # The open requests when max_in_flight was last raised: "METHOD path age".
            "peak": list(self.peak),
            "charge_requests": self.charge_requests,
            "declines": self.declines,
            "stored_keys": len(self._outcomes),
            "by_status": dict(sorted(self.by_status.items())),
        }

    def reset_stats(self) -> None:
        """Forget counters, charges, stored keys and the request log (not the faults)."""
        self.requests = 0
        self.charge_requests = 0
        self.charges_created = 0
        self.declines = 0
        self.replays = 0
        self.max_in_flight = self.in_flight
        self.peak: list[str] = []
        self.by_status = {}
        self.charges = {}
        self._outcomes = {}
        self._new_charges_by_key = Counter()
        self._log = {}
        self._arrivals = []
