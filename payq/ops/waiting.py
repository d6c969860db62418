"""Waiting for a child process to come up: its HTTP endpoint answers, its log says so.

``payq demo`` and the incident drills start the provider simulator and workers as
subprocesses and poll with these (every 100 ms) before they go on; each raises
``RuntimeError`` when its deadline passes.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx

__all__ = ["wait_for_http", "wait_for_log"]


def wait_for_http(url: str, timeout_s: float = 15) -> None:
    """Return once a GET of ``url`` succeeds; raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1).raise_for_status()
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def wait_for_log(path: Path, needle: str, count: int, timeout_s: float = 30) -> None:
    """Return once ``needle`` appears ``count`` times in the log at ``path``.

    The log is a worker group's, so the error raised after ``timeout_s`` says
    the workers did not start.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.read_text(errors="replace").count(needle) >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"workers did not start within {timeout_s} s; see {path}")
