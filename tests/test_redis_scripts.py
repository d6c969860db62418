"""payq's Lua scripts: in .lua files, each reading exactly the arguments its dataclass names."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

import payq
from payq.dramatiq_redis import RequeueAcks, RequeueDead
from payq.gate.scripts import GATE_SCRIPTS
from payq.redis_scripts import ScriptArgs


def names(source: str, table: str) -> set[str]:
    return set(re.findall(rf"\b{table}\.(\w+)", source))


@pytest.mark.parametrize("kind", [*GATE_SCRIPTS, RequeueAcks, RequeueDead], ids=lambda k: k.script)
def test_a_script_reads_exactly_its_named_keys_and_arguments(kind: type[ScriptArgs]) -> None:
    source = kind.source()
    own = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    keys = {f.name for f in fields(kind) if f.metadata.get("key")}  # type: ignore[arg-type]
    assert names(source, "K") == keys
    assert names(source, "A") == own - keys | {"keys"}  # "keys": the prelude's name list


def test_no_lua_in_python_strings() -> None:
    root = Path(payq.__file__).parent.parent
    for folder in ("payq", "producers", "workers"):
        for path in (root / folder).rglob("*.py"):
            assert "redis.call(" not in path.read_text(), f"Lua in {path.relative_to(root)}"
