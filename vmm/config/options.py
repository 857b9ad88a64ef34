"""The pieces every option's syntax is made of: KEY=VALUE lists, on/off, counts, sizes; ConfigError."""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

BOOLEANS = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}
SIZE_SUFFIXES = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


class ConfigError(ValueError):
    """A VM configuration that cannot be used, with the one line that says why."""


def split_options(text: str, *, what: str, syntax: str, known: tuple[str, ...], aliases: dict | None = None,
                  head: bool = False) -> tuple[str | None, dict[str, str]]:
    """`[HEAD,]KEY=VALUE,...` -> (HEAD or None, {key: value}); keys are case-blind, values kept as written.
    `what` names the option in messages ("disk"), `known` its keys, `aliases` other spellings of them."""
    items = text.split(",")
    first = items.pop(0) if head else None
    values: dict[str, str] = {}
    for option in items:
        key, eq, value = option.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            raise ConfigError(f"{what} {text!r}: option {option!r} is not KEY=VALUE (expected {syntax})")
        key = (aliases or {}).get(key, key)
        if key not in known:
            raise ConfigError(f"{what} {text!r}: unknown option {key!r} (known: {', '.join(known)})")
        if key in values:
            raise ConfigError(f"{what} {text!r}: option {key!r} given twice")
        values[key] = value
    return first, values


def check_dict(d: dict, *, where: str, known: tuple[str, ...], required: str | None, missing: str = "") -> None:
    """The dict form of a device (a config file's): only `known` keys, and `required` (if any) not empty."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r} (known: {', '.join(known)})")
    if required is not None and not d.get(required):
        raise ConfigError(f"{where}: {missing}")


def parse_bool(value, where: str, key: str) -> bool:
    """on/off, yes/no, true/false, 1/0 (or a bool)."""
    if isinstance(value, bool):
        return value
    flag = str(value).strip().lower()
    if flag not in BOOLEANS:
        raise ConfigError(f"{where}: {key}={value!r} is not on or off")
    return BOOLEANS[flag]


def parse_count(value, where: str, key: str, maximum: int) -> int:
    """A whole number from 1 to `maximum` (queues=N): decimal text or an int."""
    try:
        n = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 10)
    except ValueError:
        n = 0
    if not 1 <= n <= maximum:
        raise ConfigError(f"{where}: {key}={value!r} is not a number from 1 to {maximum}")
    return n


def parse_size(text) -> int:
    """'512M', '4G', '65536', '1.5G' (or an int) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"not a size: {text!r} (try 512M or 4G)")
    return int(float(m.group(1)) * SIZE_SUFFIXES[m.group(2).upper()])
