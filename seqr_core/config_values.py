"""Typed parsing of configuration strings: command-line flags and SEQR_* environment variables.

A flag's default read from the environment is wrapped in :class:`FromEnv`, so a value that does
not parse is reported under the variable's name (``SEQR_WORKERS: expected an integer, got
'abc'``) as a :class:`ConfigError` instead of a traceback; a bad value typed on the command line
is an ``argparse.ArgumentTypeError`` that argparse reports under the flag. Pure string
handling: the CLI modules read the environment and hand the strings in.
"""

from __future__ import annotations

import argparse
from typing import Callable

from .errors import InvalidArgumentError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


class ConfigError(InvalidArgumentError):
    """A configuration value that does not parse; ``field`` is the variable or flag it came from."""


class FromEnv(str):
    """A string read from environment variable ``name`` (an argparse default)."""

    name: str

    def __new__(cls, value: str, name: str) -> "FromEnv":
        s = super().__new__(cls, value)
        s.name = name
        return s


def env_default(environ, name: str, default=None):
    """``environ[name]`` as a :class:`FromEnv` when set, else ``default`` (used as is)."""
    value = environ.get(name)
    return default if value is None else FromEnv(value, name)


def _parser(what: str, convert: Callable[[str], object], *, minimum=None) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = convert(text.strip())
        except (TypeError, ValueError):
            value = None
        if value is not None and (minimum is None or value >= minimum):
            return value
        expected = what if value is None or minimum is None else f"{what} >= {minimum}"
        if isinstance(text, FromEnv):
            raise ConfigError(f"expected {expected}, got {str(text)!r}", field=text.name)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {str(text)!r}")
    parse.__name__ = what
    return parse


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


def _boolean(text: str) -> bool:
    low = text.lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ValueError(text)


integer = _parser("an integer", int)
count = _parser("an integer", int, minimum=0)
positive = _parser("an integer", int, minimum=1)
number = _parser("a number", _finite)
seconds = _parser("a number", _finite, minimum=0)
boolean = _parser("a boolean (1/0, true/false, yes/no, on/off)", _boolean)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


_port_number = _parser("a port number (0-65535) or 'off'", _port)


def port_or_off(text: str):
    """A TCP port, or None for 'off'."""
    return None if text.strip().lower() in ("off", "none", "-1") else _port_number(text)


def seconds_or_off(text: str):
    """A duration in seconds, or None for 'off'."""
    return None if text.strip().lower() in ("off", "none") else seconds(text)


def flag(value) -> bool:
    """A store_true option whose default may come from the environment (parsed here, lazily)."""
    return boolean(value) if isinstance(value, str) else bool(value)
