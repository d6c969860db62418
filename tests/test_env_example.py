"""`.env.example` lists every setting with its real default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from payq.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_every_setting_is_listed_and_nothing_else() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    assert set(example()) == fields


def test_listed_defaults_are_the_real_defaults() -> None:
    for name, value in example().items():
        default = Settings.model_fields[name.lower()].default
        expected = "" if default is None else str(default)
        assert value == expected, (
            f"{name}: .env.example says {value!r}, the default is {expected!r}"
        )


def test_the_example_copied_to_env_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp .env.example .env` is how a newcomer starts: every value in it must load.
    Reproduced before: its empty `DATABASE_DIRECT_URL=` stopped every command (exit 2,
    "DATABASE_DIRECT_URL: must be a postgresql:// ... URL")."""
    for name in list(os.environ):
        if name.lower() in Settings.model_fields:
            monkeypatch.delenv(name)
    settings = load_settings(_env_file=ROOT / ".env.example")
    assert settings.migration_url == settings.database_url
