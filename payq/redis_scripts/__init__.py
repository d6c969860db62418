"""payq's Lua scripts for Redis: each a ``.lua`` file, its arguments one dataclass.

A package that runs scripts keeps them in its ``lua/`` folder, read once at import the
way Dramatiq reads its own, and names each script's arguments in one frozen dataclass
subclassing ``ScriptArgs``. A field marked ``KEY`` goes to ``KEYS``; the others go, with
the keys' names, as one JSON object in ``ARGV[1]``, which ``_args.lua`` decodes into
``A`` and ``K``: the Lua reads ``A.lease_ms`` and ``K.slots``, never a position. A
script is ``_args.lua``, then the libraries it ``uses`` (plain Lua functions in files
whose names start with ``_``), then its own file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from importlib.resources import files
from typing import Any, ClassVar

import redis

__all__ = ["KEY", "ScriptArgs", "Scripts"]

#: Marks a field as one of the script's Redis keys: ``slots: str = field(metadata=KEY)``.
KEY = {"key": True}

_ARGS = (files("payq.redis_scripts") / "_args.lua").read_text(encoding="utf-8")
_SOURCES: dict[str, dict[str, str]] = {}


def _lua(package: str) -> dict[str, str]:
    """The ``.lua`` files in a package's ``lua/`` folder, by name without the suffix."""
    if package not in _SOURCES:
        folder = files(package) / "lua"
        _SOURCES[package] = {
            f.name.removesuffix(".lua"): f.read_text(encoding="utf-8")
            for f in folder.iterdir()
            if f.name.endswith(".lua")
        }
    return _SOURCES[package]


class ScriptArgs:
    """One script's arguments; subclasses are frozen dataclasses."""

    #: The package whose ``lua/`` folder holds the script.
    package: ClassVar[str]
    #: The ``.lua`` file (without the suffix) these arguments are for.
    script: ClassVar[str]
    #: The libraries it calls, loaded in this order before it.
    uses: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def source(cls) -> str:
        lua = _lua(cls.package)
        return "\n".join([_ARGS, *(lua[part] for part in (*cls.uses, cls.script))])

    def keys_and_argv(self) -> tuple[list[str], list[str]]:
        key_names, arg_names = _names(type(self))
        named = {name: _plain(getattr(self, name)) for name in arg_names}
        named["keys"] = key_names
        keys = [getattr(self, name) for name in key_names]
        return keys, [json.dumps(named, separators=(",", ":"))]


class Scripts:
    """Scripts registered on one Redis client; ``run(args)`` runs the one the arguments
    are for (``EVALSHA``, loading it again if the server forgot it)."""

    def __init__(self, client: redis.Redis, kinds: Iterable[type[ScriptArgs]]) -> None:
        self._registered = {kind: client.register_script(kind.source()) for kind in kinds}

    def run(self, args: ScriptArgs) -> Any:
        """Raises ``redis.RedisError`` if Redis does not answer."""
        keys, argv = args.keys_and_argv()
        return self._registered[type(args)](keys=keys, args=argv)


_NAMES: dict[type, tuple[list[str], list[str]]] = {}


def _names(kind: type) -> tuple[list[str], list[str]]:
    """A script's key fields and argument fields, in their order."""
    if kind not in _NAMES:
        found = fields(kind)
        keys = [f.name for f in found if f.metadata.get("key")]
        if any(f.name == "keys" for f in found):
            raise TypeError(f"{kind.__name__}: 'keys' names the key list; name the field else")
        _NAMES[kind] = keys, [f.name for f in found if f.name not in keys]
    return _NAMES[kind]


def _plain(value: Any) -> Any:
    """A field's value as JSON takes it (a nested dataclass as an object)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    return value
