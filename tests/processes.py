"""Real payq processes for end-to-end tests: started with the suite's settings, logs kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from tests.conftest import TEST_ENV


class PayqProcess:
    """``payq <args>`` in its own process group, its output in a temporary log file."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **TEST_ENV, **(env or {})}
        fd, path = tempfile.mkstemp(prefix="payq-test-", suffix=".log")
        os.close(fd)
        self.log = Path(path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PayqProcess:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "payq.cli", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> PayqProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:
            self.log.unlink(missing_ok=True)
        else:
            sys.stderr.write(
                f"--- output of payq {' '.join(self.args)} ---\n{self.output()[-6000:]}\n"
            )
