"""Typed TOML configuration with environment overrides.

Each program describes its configuration as nested frozen dataclasses. The
loader walks the TOML document against them and stops at the first problem
with a ConfigError that names the file, the key, the value and what is
expected. Unknown keys are errors, because a misspelt key that is silently
ignored leaves a plant running on a default nobody chose.

Any key can be overridden from the environment as
``<PREFIX>_<SECTION>_<KEY>`` in upper case, for example
``CNC_BACKEND_POSTGRES_DSN``, which is how secrets stay out of files.
Fields marked secret (``field(metadata={"secret": True})``) are never echoed
in an error message.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cnc_common.errors import ConfigError

T = TypeVar("T")

#: Field metadata key: a function returning an error message or None.
CHECK = "check"
#: Field metadata key: never show the value in errors or status output.
SECRET = "secret"


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into ConfigError."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            source, "file", "file not found; pass --config PATH"
        ) from None
    except PermissionError:
        raise ConfigError(source, "file", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(
            source, "file", "is a directory; pass the config file"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "file", f"not valid TOML: {exc}") from None


def read_config_file(path: str, key: str, source: str) -> bytes:
    """Read a configured file; raise ConfigError naming the key and the path."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(source, key, "expected a regular file", path)
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ConfigError(source, key, "file not found", path) from None
    except PermissionError:
        reason = "permission denied (make it readable by this program's user)"
        raise ConfigError(source, key, reason, path) from None
    except IsADirectoryError:
        raise ConfigError(source, key, "expected a regular file", path) from None
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read ({exc.strerror})", path) from None


def read_secret_file(path: str, key: str, source: str) -> str:
    """Read a password or token file: one line, one trailing newline removed."""
    raw = read_config_file(path, key, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(source, key, "expected UTF-8 text", path) from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(source, key, "file is empty", path)
    if "\n" in secret:
        raise ConfigError(source, key, "expected one line", path)
    return secret


def load(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    source: str,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from a decoded TOML document and environment overrides."""
    environ = os.environ if environ is None else environ
    env_sources: dict[str, str] = {}
    merged = _apply_env(cls, dict(data), env_prefix, environ, source, env_sources)
    return _build(cls, merged, _Sources(source, env_sources), path="")


class _Sources(str):
    """The config file's name, which also records the keys set from the environment.

    Errors about such a key name the variable, because the file may hold
    a different, valid value.
    """

    env: dict[str, str]

    def __new__(cls, source: str, env: dict[str, str]) -> _Sources:
        instance = super().__new__(cls, source)
        instance.env = env
        return instance

    def of(self, full_key: str) -> str:
        name = self.env.get(full_key)
        return f"environment variable {name}" if name else str(self)


def _apply_env(
    cls: type,
    data: dict[str, Any],
    env_prefix: str | None,
    environ: Mapping[str, str],
    source: str,
    env_sources: dict[str, str],
) -> dict[str, Any]:
    if not env_prefix:
        return data
    hints = typing.get_type_hints(cls)
    known: set[str] = set()
    for section in dataclasses.fields(cls):
        section_type = hints[section.name]
        if not dataclasses.is_dataclass(section_type):
            continue
        section_hints = typing.get_type_hints(section_type)
        for item in dataclasses.fields(section_type):
            name = f"{env_prefix}_{section.name}_{item.name}".upper()
            known.add(name)
            if name not in environ:
                continue
            env_sources[f"{section.name}.{item.name}"] = name
            raw = environ[name]
            table = data.setdefault(section.name, {})
            if not isinstance(table, dict):
                raise ConfigError(source, section.name, "expected a table")
            table[item.name] = _parse_env(raw, section_hints[item.name], name, item)
    _reject_unknown_env(env_prefix, environ, known)
    return data


def _reject_unknown_env(
    prefix: str, environ: Mapping[str, str], known: set[str]
) -> None:
    """Stop on a misspelt override, which would otherwise be silently ignored."""
    for name in sorted(environ):
        if name.startswith(f"{prefix}_") and name not in known:
            raise ConfigError(
                f"environment variable {name}",
                name,
                f"unknown setting; overrides are named {prefix}_<SECTION>_<KEY> "
                "after a key of the config file, for example "
                f"{sorted(known)[0] if known else prefix + '_SECTION_KEY'}",
            )


def _parse_env(raw: str, hint: Any, name: str, item: dataclasses.Field) -> Any:
    """Convert an environment string to the field's type."""
    base = _strip_optional(hint)
    source = f"environment variable {name}"
    secret = bool(item.metadata.get(SECRET))
    try:
        if base is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if base is int:
            try:
                return int(raw)
            except ValueError:
                raise ValueError("expected an integer") from None
        if base is float:
            try:
                return float(raw)
            except ValueError:
                raise ValueError("expected a number") from None
        if typing.get_origin(base) is list:
            (inner,) = typing.get_args(base)
            parts = [part.strip() for part in raw.split(",") if part.strip()]
            return [inner(part) for part in parts]
        return raw
    except ValueError as exc:
        raise ConfigError(source, name, str(exc), raw, show_value=not secret) from None


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _build(cls: type[T], data: Any, source: str, path: str) -> T:
    where = path or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(source, where, "expected a table", data)
    hints = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            allowed = ", ".join(sorted(known))
            full = f"{path}.{key}" if path else key
            raise ConfigError(source, full, f"unknown key; allowed here: {allowed}")
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        full = f"{path}.{item.name}" if path else item.name
        hint = hints[item.name]
        if item.name not in data:
            if _has_default(item):
                continue
            if dataclasses.is_dataclass(hint):
                values[item.name] = _build(hint, {}, source, full)
                continue
            raise ConfigError(source, full, "missing required key")
        values[item.name] = _convert(data[item.name], hint, item, source, full)
    return cls(**values)


def _has_default(item: dataclasses.Field) -> bool:
    return (
        item.default is not dataclasses.MISSING
        or item.default_factory is not dataclasses.MISSING
    )


def _convert(
    value: Any, hint: Any, item: dataclasses.Field, source: str, full: str
) -> Any:
    secret = bool(item.metadata.get(SECRET))
    base = _strip_optional(hint)
    if value is None and base is not hint:
        return None
    if dataclasses.is_dataclass(base):
        return _build(base, value, source, full)
    origin = source.of(full) if isinstance(source, _Sources) else source
    converted = _check_type(value, base, origin, full, secret)
    check: Callable[[Any], str | None] | None = item.metadata.get(CHECK)
    if check is not None:
        problem = check(converted)
        if problem:
            raise ConfigError(origin, full, problem, value, show_value=not secret)
    return converted


def _check_type(value: Any, base: Any, source: str, full: str, secret: bool) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(
            source, full, f"expected {expected}", value, show_value=not secret
        )

    if base is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if typing.get_origin(base) is list:
        (inner,) = typing.get_args(base)
        if not isinstance(value, list):
            raise fail(f"a list of {inner.__name__}")
        return [_check_type(element, inner, source, full, secret) for element in value]
    raise TypeError(f"unsupported config type {base!r} for {full}")


# Reusable checks for field metadata.


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        return "expected one of " + ", ".join(repr(choice) for choice in choices)

    return check


def host_port(value: str) -> str | None:
    """Check a ``host:port`` listen address."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "expected HOST:PORT, for example 127.0.0.1:9101"
    return None


def nats_url(value: str) -> str | None:
    expected = (
        "expected a URL such as nats://127.0.0.1:4222 (comma-separated for a cluster)"
    )
    for url in value.split(","):
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
            return expected
        try:
            port = parsed.port
        except ValueError:
            return f"{expected}; the port must be from 1 to 65535"
        if port == 0:
            return f"{expected}; the port must be from 1 to 65535"
    return None
