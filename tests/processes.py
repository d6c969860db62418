"""Real payq processes for end-to-end tests: started with the suite's settings, logs kept."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from payq.ops.supervise import Supervised
from tests.conftest import TEST_ENV


class PayqProcess(Supervised):
    """``payq <args>`` in its own process group, its output in a temporary log file."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="payq-test-", suffix=".log")
        os.close(fd)
        super().__init__(args[0], list(args), {**os.environ, **TEST_ENV, **(env or {})}, Path(path))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> PayqProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is not None:
            sys.stderr.write(
                f"--- output of payq {' '.join(self.args)} ---\n{self.output()[-6000:]}\n"
            )
        self.log_path.unlink(missing_ok=True)
