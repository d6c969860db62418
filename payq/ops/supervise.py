"""Child processes that are restarted when they die.

The ``dramatiq`` master stops its whole group when one child dies, so something
must restart workers; in production that is systemd, Kubernetes or compose's
``restart:``; in the demo (and the chaos run) it is this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

__all__ = ["Supervised"]

log = logging.getLogger("payq.supervise")


class Supervised:
    """``payq <args>`` kept running; its output appended to ``log_path``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = False

    def start(self) -> Self:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "payq_cli", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def check(self) -> None:
        """Restart the process if it died (call this now and then)."""
        if self._stopping or self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        if code == 2:  # a refused setting: restarting cannot help
            raise RuntimeError(f"{self.name} refused to start; see {self.log_path}")
        log.warning("%s exited with %s; restarting", self.name, code)
        self.restarts += 1
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process (in-flight work drains), SIGKILL its group after the timeout.

        Only the leader gets the SIGTERM: the ``dramatiq`` master passes it on to its
        workers, and a worker that got one from us and another from the master would
        take the second as "stop now" and cut its calls (systemd: ``KillMode=mixed``).
        """
        self._stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
