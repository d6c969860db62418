"""How the dashboard's pages are rendered: the Jinja2 templates (autoescaped), the
filters they format with, the headers every page is sent with, and the geometry of the
throughput and latency chart (an inline SVG: a dozen shapes need no chart library).

Every page carries a strict Content-Security-Policy: scripts, styles and requests to
this server only, no inline script or style, no framing (a confirmation button cannot
be clicked through another site's page); ``no-store``, and a referrer for our own pages
only (``same-origin``: charge ids travel in URLs; ``no-referrer`` would make a browser
send ``Origin: null`` with our own forms, which the CSRF check then refuses).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from payq.figures import MinuteStats, describe_breaker
from payq.ops.commands import format_amount
from payq.reads import last_read_source
from producers.intake.auth import Principal

__all__ = ["STATIC_DIR", "chart", "page"]

STATIC_DIR = Path(__file__).parent / "static"
#: Seconds between refreshes of a page's live part.
REFRESH_S = 4

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _utc(value: dt.datetime | None, with_ms: bool = False) -> str:
    if value is None:
        return "-"
    text = value.astimezone(dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%S.%f" if with_ms else "%Y-%m-%d %H:%M:%S"
    )
    return text[:-3] if with_ms else text


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _percent(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "-"


templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.filters.update(money=format_amount, utc=_utc, ms=_ms)
templates.env.globals.update(
    refresh_s=REFRESH_S, describe_breaker=describe_breaker, percent=_percent
)


def page(
    request: Request, name: str, context: Mapping[str, Any] | None = None, status: int = 200
) -> HTMLResponse:
    """Template ``name`` with the caller (``principal``, ``session``) in its context."""
    principal: Principal | None = request.state.principal
    session = principal.session if principal else None
    return templates.TemplateResponse(
        request,
        name,
        # Where the page's figures were read (a banner when not from the replica as asked).
        {
            "principal": principal,
            "session": session,
            "reads": last_read_source(),
            **(context or {}),
        },
        status_code=status,
        headers=HEADERS,
    )


def _nice(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (an axis top)."""
    step = 1.0
    while step * 10 <= value:
        step *= 10
    return next(m * step for m in (1, 2, 5, 10) if m * step >= value)


def chart(series: list[MinuteStats], width: int = 640, height: int = 190) -> dict[str, Any]:
    """Geometry of an SVG chart: attempts per minute as bars (charged, declined, errors,
    stacked) against the left axis, p50 and p95 latency as lines of points against the
    right one (a minute without attempts has no latency, and no point)."""
    left, right, top, bottom = 40, 60, 10, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    top_n = _nice(max([m.attempts for m in series] + [4]))
    top_ms = _nice(max([m.p95_ms or m.p50_ms or 0 for m in series] + [10]))
    slot = plot_w / max(1, len(series))
    bars: list[dict[str, Any]] = []
    p50: list[dict[str, float]] = []
    p95: list[dict[str, float]] = []
    for i, m in enumerate(series):
        x = left + i * slot
        y = float(top + plot_h)
        segments = []
        for count, kind in ((m.succeeded, "ok"), (m.declined, "declined"), (m.errors, "error")):
            h = plot_h * count / top_n
            y -= h
            if count:
                segments.append({"y": round(y, 1), "h": round(h, 1), "kind": kind})
        title = (
            f"{m.minute:%H:%M} UTC: {m.attempts} attempts, {m.succeeded} charged, "
            f"{m.declined} declined, {m.errors} errors; p50 {_ms(m.p50_ms)}, p95 {_ms(m.p95_ms)}"
        )
        bar = {"x": round(x + slot * 0.15, 1), "w": round(slot * 0.7, 1), "title": title}
        bars.append({**bar, "segments": segments})
        cx = round(x + slot / 2, 1)
        for line, value in ((p50, m.p50_ms), (p95, m.p95_ms)):
            if value is not None:
                cy = round(top + plot_h * (1 - min(value, top_ms) / top_ms), 1)
                line.append({"x": cx, "y": cy})
    ticks = [
        {"y": round(top + plot_h * (1 - f), 1), "n": f"{top_n * f:g}", "ms": _ms(top_ms * f)}
        for f in (0, 0.5, 1)
    ]
    labels = []
    if series:
        first, last = series[0].minute, series[-1].minute
        labels = [
            {"x": round(left + slot / 2, 1), "text": f"{first:%H:%M}", "anchor": "middle"},
            {"x": round(left + plot_w - slot / 2, 1), "text": f"{last:%H:%M}", "anchor": "middle"},
        ]
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": width - right,
        "bottom": top + plot_h,
        "bars": bars,
        "p50": p50,
        "p95": p95,
        "ticks": ticks,
        "labels": labels,
    }
