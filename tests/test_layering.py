"""The layers stay apart: producers never load worker code; the core loads neither."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys, importlib
for name in {modules!r}:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})
print(' '.join(loaded))
"""


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (["producers", "producers.relay"], ["workers"]),
        (
            [
                "payq.settings",
                "payq.db",
                "payq.models",
                "payq.broker",
                "payq.provider",
                "payq.processing",
                "payq.validation",
                "payq.migrate",
            ],
            ["workers", "producers"],
        ),
    ],
)
def test_imports_do_not_cross_layers(modules: list[str], forbidden: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(modules=modules, forbidden=forbidden)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "", f"{modules} loaded {result.stdout.strip()}"
