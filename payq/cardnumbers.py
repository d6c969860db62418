"""Finding raw card numbers in text: one detector for the door and for every scrubber.

payq never takes a card number (only the provider's tokens) and never lets one out in a
log line, a Sentry event or an error. People paste numbers in many shapes, so the text is
read the way they write it: NFKC-normalized (full-width digits become digits), with any
separator a person might type between digit groups (spaces of every kind, tabs, dots,
underscores, dashes, slashes, commas, zero-width characters).

What counts is what card numbers really are: a run of digits that *stands alone* (not
the tail of an identifier such as ``order-1733400000000`` or ``f47ac10b-58cc-4372``),
of a length a card network issues for its prefix (Visa 4…: 13, 16 or 19 digits; Amex
34/37: 15; Mastercard 51-55 and 2221-2720: 16; …), passing the Luhn check. Within a run
of digit groups, every stretch of whole groups is tried, so a number followed by its
expiry or CVV is still found. A UUID, a ULID, a millisecond timestamp or a snowflake id
is none of these, which keeps false alarms away from valid charges.
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

#: Dashes of every kind (hyphen, non-breaking hyphen, figure dash, en and em dash,
#: horizontal bar, minus sign), written as escapes: they look alike.
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"
#: Characters a person may put between digit groups.
_SEPARATORS = rf"\s._\-/\\,'\u00b7\u2022{_DASHES}\u200b-\u200d\u2060\ufeff"
#: Separators that join a digit run to a word on its side into one identifier
#: ("order-1733…", "inv_4242…", "v1.4242…"); whitespace and commas do not.
_JOINERS = frozenset("._-/\\" + _DASHES)
#: A run of 13 digits or more, with separators between them.
_RUN = re.compile(rf"\d(?:[{_SEPARATORS}]*\d){{12,}}")
_GROUP = re.compile(rf"[{_SEPARATORS}]+")

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
    for low, high, width, lengths in _NETWORKS:
        if length in lengths and low <= int(digits[:width]) <= high:
            return _luhn_ok(digits)
    return False


def _normalized(text: str) -> str:
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


def _joined(text: str, edge: int, step: int) -> bool:
    """Whether the run edge at ``edge`` (looking in direction ``step``) is joined to a
    letter or digit without whitespace: the run is then part of a longer identifier."""
    i = edge
    while 0 <= i < len(text) and text[i] in _JOINERS:
        i += step
    return 0 <= i < len(text) and text[i].isalnum()


def card_number_spans(text: str) -> Iterator[tuple[int, int]]:
    """Where card numbers stand in ``text`` (indexes into its NFKC-normalized form)."""
    for run in _RUN.finditer(text):
        start, end = run.span()
        if _joined(text, start - 1, -1) or _joined(text, end, 1):
            continue
        groups = _GROUP.split(run.group())
        offsets = [m.start() + start for m in re.finditer(r"\d+", run.group())]
        for first in range(len(groups)):
            digits = ""
            for last in range(first, len(groups)):
                digits += groups[last]
                if len(digits) > 19:
                    break
                if is_card_number(digits):
                    yield offsets[first], offsets[last] + len(groups[last])
                    break


def looks_like_card_number(value: str) -> bool:
    """True when ``value`` holds a card number anywhere, however it was pasted."""
    return next(card_number_spans(_normalized(value)), None) is not None


def is_whole_card_number(value: str) -> bool:
    """True when ``value`` itself is a card number (digits and separators, nothing else):
    the rule for an idempotency key, which may well hold digits of its own."""
    text = _normalized(value).strip(_STRIP)
    return _RUN.fullmatch(text) is not None and looks_like_card_number(text)


_STRIP = " \t\n\r\f\v\u00a0\u200b\ufeff"


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
