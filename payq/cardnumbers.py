"""Finding raw card numbers in text: one detector for the door and for every scrubber.

payq never takes a card number (only the provider's tokens) and never lets one out in a
log line, a Sentry event or an error. Text is read as people paste it: NFKC-normalized
(full-width and other digits become digits), invisible marks dropped (soft hyphen,
zero-width, direction, combining), and a short run of non-letter, non-digit characters
between digit groups taken as a separator (spaces, tabs, dots, dashes, slashes, colons).

A card number has a length its network issues for its prefix (Visa 4…: 13, 16 or 19;
Amex 34/37: 15; Mastercard 51-55 and 2221-2720: 16; …), passes Luhn, is one group or
groups of three digits or more (4-4-4-4, 4-6-5; a list of short numbers is not a card),
and stands alone: not the tail of an identifier like ``order-1733400000000`` (joined by
``-``, ``_``, ``.``, ``/`` or glued to letters), judged at the card's edges. Every stretch
of whole groups in a run is tried, so a number beside its expiry or CVV is found.
``strict`` (for a payment token) drops the stands-alone rule. UUIDs, ULIDs, millisecond
timestamps and current snowflake ids never match.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

__all__ = [
    "card_number_spans",
    "is_card_number",
    "is_whole_card_number",
    "looks_like_card_number",
    "mask_card_numbers",
]

#: Characters that join digits to a word on their side into one identifier
#: ("order-1733…", "inv_4242…", "v1.4242…"), dashes of every kind among them (written
#: as escapes: they look alike). Whitespace and other punctuation do not.
_JOINERS = frozenset("._-/\\\u2010\u2011\u2012\u2013\u2014\u2015\u2212")
#: A run of 13 digits or more, at most three other characters (not letters) between any
#: two of them. (``[^\W\d_]`` is a letter: a word character that is no digit nor ``_``.)
_RUN = re.compile(r"\d(?:[\W_]{0,3}\d){12,}")
_DIGITS = re.compile(r"\d+")
#: Invisible characters a paste can carry between digits: format (soft hyphen, zero
#: width, direction marks) and combining marks (accents, keycaps, joiners).
_INVISIBLE = frozenset(("Cf", "Mn", "Me"))
#: A character written as an escape (``repr``, JSON, a traceback): ``\\t``, ``\\x0b``,
#: ``\\u2009``. Between digit groups it separates them like the character would.
_ESCAPE = re.compile(r"\\(?:[tnrfvab]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")

#: (prefix range low, high, number of prefix digits, lengths issued), by network.
_NETWORKS: tuple[tuple[int, int, int, frozenset[int]], ...] = (
    (4, 4, 1, frozenset({13, 16, 19})),  # Visa
    (51, 55, 2, frozenset({16})),  # Mastercard
    (2221, 2720, 4, frozenset({16})),  # Mastercard 2-series
    (34, 34, 2, frozenset({15})),  # American Express
    (37, 37, 2, frozenset({15})),
    (300, 305, 3, frozenset({14, 16, 17, 18, 19})),  # Diners Club
    (36, 36, 2, frozenset({14, 16, 17, 18, 19})),
    (38, 39, 2, frozenset({16, 17, 18, 19})),
    (6011, 6011, 4, frozenset({16, 17, 18, 19})),  # Discover
    (644, 649, 3, frozenset({16, 17, 18, 19})),
    (65, 65, 2, frozenset({16, 17, 18, 19})),
    (3528, 3589, 4, frozenset({16, 17, 18, 19})),  # JCB
    (62, 62, 2, frozenset({16, 17, 18, 19})),  # UnionPay
    (2200, 2204, 4, frozenset({16, 17, 18, 19})),  # Mir
    (5018, 5018, 4, frozenset(range(13, 20))),  # Maestro
    (5020, 5020, 4, frozenset(range(13, 20))),
    (5038, 5038, 4, frozenset(range(13, 20))),
    (5893, 5893, 4, frozenset(range(13, 20))),
    (6304, 6304, 4, frozenset(range(13, 20))),
    (6759, 6759, 4, frozenset(range(13, 20))),
    (6761, 6763, 4, frozenset(range(13, 20))),
    (60, 60, 2, frozenset({16})),  # RuPay
    (81, 82, 2, frozenset({16})),
    (508, 508, 3, frozenset({16})),
    (506099, 506198, 6, frozenset({16, 18, 19})),  # Verve
    (650002, 650027, 6, frozenset({16, 18, 19})),
)
#: The shortest group of a grouped card number, but for its last (a 19-digit card's 3).
_MIN_GROUP = 3


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(digits: str) -> bool:
    """``digits`` (digits only) is a number a card network issues: prefix, length, Luhn."""
    length = len(digits)
    if not 13 <= length <= 19:
        return False
    ascii_digits = "".join(str(int(ch)) for ch in digits) if not digits.isascii() else digits
    for low, high, width, lengths in _NETWORKS:
        if length in lengths and low <= int(ascii_digits[:width]) <= high:
            return _luhn_ok(ascii_digits)
    return False


def _normalized(text: str) -> str:
    if "\\" in text:  # an escape a formatter wrote (repr, JSON) separates like the character
        text = _ESCAPE.sub(" ", text)
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE)


def _joined(text: str, edge: int, step: int) -> bool:
    """Whether the digits ending at ``edge`` (looking in direction ``step``) are joined to a
    letter or digit, directly or through joiners only: part of a longer identifier."""
    i = edge
    while 0 <= i < len(text) and text[i] in _JOINERS:
        i += step
    return 0 <= i < len(text) and text[i].isalnum()


def card_number_spans(text: str, *, strict: bool = False) -> Iterator[tuple[int, int]]:
    """Where card numbers stand in ``text`` (a normalized text: ``_normalized``)."""
    for run in _RUN.finditer(text):
        groups = [
            (m.start() + run.start(), m.end() + run.start()) for m in _DIGITS.finditer(run.group())
        ]
        digits = [text[a:b] for a, b in groups]
        for first in range(len(groups)):
            found = _card_from(text, groups, digits, first, strict)
            if found is not None:
                yield found


def _card_from(
    text: str,
    groups: list[tuple[int, int]],
    digits: list[str],
    first: int,
    strict: bool,
) -> tuple[int, int] | None:
    """The card number that starts at group ``first``, if one does."""
    if not strict and _joined(text, groups[first][0] - 1, -1):
        return None
    number = ""
    for last in range(first, len(groups)):
        if last > first and len(digits[last - 1]) < _MIN_GROUP:
            return None  # a short group inside: a list of small numbers, not a card
        number += digits[last]
        if len(number) > 19:
            return None
        if is_card_number(number) and (strict or not _joined(text, groups[last][1], 1)):
            return groups[first][0], groups[last][1]
    return None


def looks_like_card_number(value: str, *, strict: bool = False) -> bool:
    """True when ``value`` holds a card number anywhere, however it was pasted.
    ``strict``: digits glued to a word count too (for a payment token)."""
    return next(card_number_spans(_normalized(value), strict=strict), None) is not None


def is_whole_card_number(value: str) -> bool:
    """True when ``value`` itself is a card number (digits and separators, nothing else):
    the rule for an idempotency key, which may well hold digits of its own."""
    text = _normalized(value).strip()
    run = _RUN.fullmatch(text)
    return run is not None and looks_like_card_number(text)


def mask_card_numbers(text: str, mask: str = "[card number]") -> str:
    """``text`` with each card number replaced by ``mask`` (for logs, events, errors)."""
    normalized = _normalized(text)
    spans = list(card_number_spans(normalized))
    if not spans:
        return text
    out, at = [], 0
    for start, end in spans:
        if start < at:
            continue
        out.append(normalized[at:start])
        out.append(mask)
        at = end
    out.append(normalized[at:])
    return "".join(out)
