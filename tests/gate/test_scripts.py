"""The gate's nested arguments are named once too: the breaker's rules and a release."""

from __future__ import annotations

from dataclasses import fields

from payq.gate.scripts import BreakerRules, EnterArgs, Release, SettleArgs, SnapshotArgs
from tests.test_redis_scripts import names


def test_the_breaker_rules_read_are_the_rules_sent() -> None:
    for kind in (EnterArgs, SettleArgs, SnapshotArgs):
        read = names(kind.source(), "R") | names(kind.source(), "A.rules")
        assert read and read <= {f.name for f in fields(BreakerRules)}, kind.script
    everywhere = names(SettleArgs.source() + EnterArgs.source(), "R")
    assert everywhere == {f.name for f in fields(BreakerRules)}  # none sent for nothing


def test_a_release_is_read_by_its_fields() -> None:
    assert names(SettleArgs.source(), "release") == {f.name for f in fields(Release)}
