"""Fault knobs of the provider simulator: one value object, validated once.

`Faults` holds every knob with a default that means "no fault". It is built from
keyword arguments (Python), from a JSON object (``POST /_faults``) or from the
command line (``payq provider-sim``); all three paths go through the same
validators, so a bad value is refused with a message that names the knob and
says what is allowed.

A *script* is a list of step names consumed one per ``POST /v1/charges``, in
order, overriding the random knobs for that request; tests use it to build
exact sequences (for example ``["timeout", "ok"]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "KNOBS",
    "OUTAGE_MODES",
    "Faults",
    "Step",
    "add_cli_arguments",
    "add_fault_arguments",
    "faults_from_args",
]


class Step(StrEnum):
    """What the simulator does with one charge request (script entries, log names)."""

    OK = "ok"  # process normally: validation, idempotency, decline tokens
    DECLINE = "decline"  # 402 card_declined, stored as an outcome
    ERROR = "error"  # 503 api_error, nothing stored
    RATE_LIMIT = "rate_limit"  # 429 with Retry-After, nothing stored
    TIMEOUT = "timeout"  # charge and store, then answer after timeout_delay_s
    SLOW = "slow"  # process normally, but take timeout_delay_s with the key in use
    RESET = "reset"  # connection reset without an answer, nothing stored
    TRICKLE = "trickle"  # charge and store, then trickle the body over trickle_duration_s
    INVALID_REQUEST = "invalid_request"  # 400 invalid_request_error, nothing stored
    AUTH = "auth"  # 401 authentication_error, nothing stored
    KEY_IN_USE = "key_in_use"  # 409 idempotency_key_in_use, nothing stored
    KEY_REUSED = "key_reused"  # 409 idempotency_key_reused, nothing stored
    BAD_BODY = "bad_body"  # 200 whose body is not a charge object, nothing stored
    UNEXPECTED_STATUS = "unexpected_status"  # 418 with a text body, nothing stored


#: "503": every /v1 request answered 503; "reset": connections reset; "charges": charge
#: requests answered 503 while lookups by key still answer (the write path down, reads up).
OUTAGE_MODES = ("503", "reset", "charges")
_STEP_NAMES = frozenset(step.value for step in Step)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"fault knob {name!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"fault knob {name!r} must be a finite number, got {value!r}")
    return float(value)


def _rate(name: str, value: object) -> float:
    number = _number(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"fault knob {name!r} must be a probability from 0 to 1, got {value!r}")
    return number


def _non_negative(name: str, value: object) -> float:
    number = _number(name, value)
    if number < 0:
        raise ValueError(f"fault knob {name!r} must be a number >= 0, got {value!r}")
    return number


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"fault knob {name!r} must be an integer >= 0, got {value!r}")
    return value


def _seed(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"fault knob {name!r} must be an integer or null, got {value!r}")
    return value


def _outage_mode(name: str, value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or text not in OUTAGE_MODES:
        allowed = ", ".join(repr(mode) for mode in OUTAGE_MODES)
        raise ValueError(f"fault knob {name!r} must be one of {allowed}, got {value!r}")
    return text


def _script(name: str, value: object) -> tuple[str, ...]:
    allowed = ", ".join(step.value for step in Step)
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"fault knob {name!r} must be a list of steps ({allowed}), got {value!r}")
    steps: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in _STEP_NAMES:
            raise ValueError(f"fault knob {name!r} has unknown step {item!r}; allowed: {allowed}")
        steps.append(item)
    return tuple(steps)


_VALIDATORS: dict[str, Callable[[str, object], Any]] = {
    "latency_ms": _non_negative,
    "latency_jitter_ms": _non_negative,
    "error_rate": _rate,
    "decline_rate": _rate,
    "rate_limit_rate": _rate,
    "retry_after_s": _non_negative_int,
    "timeout_rate": _rate,
    "timeout_delay_s": _non_negative,
    "reset_rate": _rate,
    "trickle_rate": _rate,
    "trickle_duration_s": _non_negative,
    "lookup_error_rate": _rate,
    "outage_s": _non_negative,
    "outage_mode": _outage_mode,
    "script": _script,
    "seed": _seed,
}

KNOBS: tuple[str, ...] = tuple(_VALIDATORS)


@dataclass(frozen=True, kw_only=True)
class Faults:
    """Every fault knob of the simulator; the defaults mean "behave perfectly".

    Rates are probabilities per ``POST /v1/charges``; ``lookup_error_rate`` per lookup by
    key (``GET /v1/charges?idempotency_key=``), answered 503. ``outage_s`` starts an outage
    window of that many seconds when the knobs are applied (at start, or by
    ``POST /_faults``); ``0`` ends it.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0
    decline_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_s: int = 2
    timeout_rate: float = 0.0
    timeout_delay_s: float = 8.0
    reset_rate: float = 0.0
    trickle_rate: float = 0.0
    trickle_duration_s: float = 10.0
    lookup_error_rate: float = 0.0
    outage_s: float = 0.0
    outage_mode: str = "503"
    script: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, validate in _VALIDATORS.items():
            object.__setattr__(self, name, validate(name, getattr(self, name)))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Faults:
        """Build from a JSON object; knobs left out keep their defaults."""
        return cls().updated(data)

    def updated(self, data: Mapping[str, object]) -> Faults:
        """Return a copy with the knobs in ``data`` changed (a partial update).

        Raises ``ValueError`` naming the knob for an unknown knob or a bad value.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"fault knobs must be a JSON object, got {data!r}")
        for name in data:
            if name not in _VALIDATORS:
                raise ValueError(f"unknown fault knob {name!r}; known knobs: {', '.join(KNOBS)}")
        return dataclasses.replace(self, **dict(data))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The knobs as a JSON-ready dict (``script`` as a list)."""
        data = dataclasses.asdict(self)
        data["script"] = list(self.script)
        return data


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--knob-name`` option per fault knob (defaults: no faults)."""
    group = parser.add_argument_group("faults (defaults: none)")
    group.add_argument("--latency-ms", type=float, help="fixed latency added to every answer")
    group.add_argument("--latency-jitter-ms", type=float, help="uniform random extra latency")
    group.add_argument("--error-rate", type=float, help="probability of a 500/502/503/504")
    group.add_argument("--decline-rate", type=float, help="probability of a 402 card_declined")
    group.add_argument("--rate-limit-rate", type=float, help="probability of a 429")
    group.add_argument("--retry-after-s", type=int, help="Retry-After of a 429 (default 2)")
    group.add_argument(
        "--timeout-rate", type=float, help="probability of charging, then answering late"
    )
    group.add_argument("--timeout-delay-s", type=float, help="delay of a late answer (default 8.0)")
    group.add_argument("--reset-rate", type=float, help="probability of a connection reset")
    group.add_argument(
        "--trickle-rate", type=float, help="probability of a body trickled byte by byte"
    )
    group.add_argument(
        "--trickle-duration-s", type=float, help="time a trickled body takes (default 10.0)"
    )
    group.add_argument(
        "--lookup-error-rate", type=float, help="probability that a lookup by key answers 503"
    )
    group.add_argument("--outage-s", type=float, help="every request fails for this long")
    group.add_argument(
        "--outage-mode",
        choices=OUTAGE_MODES,
        help="503 (default), reset, or charges (charges 503, lookups by key answered)",
    )
    group.add_argument(
        "--script",
        help="comma-separated steps consumed one per charge: "
        + ",".join(step.value for step in Step),
    )
    group.add_argument("--seed", type=int, help="seed of the random generator")


def faults_from_args(ns: argparse.Namespace) -> Faults:
    """Build `Faults` from options added by `add_fault_arguments` (``ValueError`` if bad)."""
    data: dict[str, object] = {}
    for name in KNOBS:
        value = getattr(ns, name, None)
        if value is None:
            continue
        if name == "script" and isinstance(value, str):
            value = [step.strip() for step in value.split(",") if step.strip()]
        data[name] = value
    return Faults.from_dict(data)


#: The simulator's API key comes from the same variable payq's client reads.
API_KEY_ENV = "PAYMENT_PROVIDER_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8099


def _ports(text: str) -> list[int]:
    """``--port``: one port, or several separated by commas."""
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port or a comma-separated list of ports"
        ) from None
    chosen = [p for p in ports if p != 0]  # 0: any free port, as often as wanted
    if not all(0 <= p <= 65535 for p in ports) or len(set(chosen)) != len(chosen):
        raise argparse.ArgumentTypeError(f"{text!r}: ports must be 0-65535 and differ")
    return ports


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port``, ``--api-key`` and every fault knob to ``parser``.

    Here rather than beside the server so that building ``payq``'s parser does not
    load aiohttp.
    """
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind")
    parser.add_argument(
        "--port",
        type=_ports,
        default=[DEFAULT_PORT],
        help="port to listen on; several, comma-separated (8099,8100): as many independent "
        "providers, each with its own books and fault knobs",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the Bearer key clients must send (default: ${API_KEY_ENV})",
    )
    add_fault_arguments(parser)
