"""Stored text made safe to show: on a terminal, and in a spreadsheet.

Charges carry text from outside (descriptions, metadata, the provider's messages). The
CLI prints it and ``payq dlq export`` hands it to finance. A terminal obeys escape
sequences (OSC 52 writes the clipboard, others retitle the window or hide text), and a
spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula. So
control characters are shown as visible escapes (``\\x1b``), never sent, and a cell
that could be read as a formula gets a leading apostrophe (OWASP's advice for CSV).
"""

from __future__ import annotations

import unicodedata

__all__ = ["plural", "spreadsheet_safe", "terminal_safe"]

#: Starts of a cell that spreadsheets read as a formula (or a formula's lead-in).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def terminal_safe(text: str) -> str:
    """``text`` with every control or format character shown as an escape, not obeyed."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if unicodedata.category(ch) in ("Zs",):  # a no-break or other space: a space
        return " "
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that no spreadsheet runs as a formula; non-text values as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 dead charge``, ``2 dead charges`` (``nouns`` when adding an s is wrong)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
