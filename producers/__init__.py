"""What a web app imports to take payments: ``enqueue_charge``, ``enqueue_charges``,
``get_charge``, and the errors they raise.

A charge exists once its row is committed; its message (only the charge id) is
published after the commit. Given the app's own SQLAlchemy ``Session``, the charge
joins the app's transaction and is published only if that transaction commits.
"""

from payq.errors import (
    ChargeInputError,
    ChargeNotFound,
    IdempotencyConflict,
    RawCardNumberError,
    ServiceUnavailable,
)
from producers.enqueue import enqueue_charge, enqueue_charges, get_charge

__all__ = [
    "ChargeInputError",
    "ChargeNotFound",
    "IdempotencyConflict",
    "RawCardNumberError",
    "ServiceUnavailable",
    "enqueue_charge",
    "enqueue_charges",
    "get_charge",
]
