"""`pyvmm run --config vm.toml`: the options of `pyvmm run` in a TOML file, and back.

Each key is an option's flag without its dashes (`mem`, `cpuid-mask`, `on-reboot`); values are
what the flag takes: a string (`mem = "1G"`), an integer (`cpus = 2`), seconds as a number
(`shutdown-timeout = 30`), for a repeatable option an array (`disk = ["a.img", "b.img,readonly=on"]`),
for an option that may stand alone (`--rng`, `--stats`, `--firmware`, `--balloon`) `true` or its
value.  A device's value may also be a table of its keys (`disk = [{ path = "a.img", readonly = true }]`).
Relative paths are taken from the current directory, as on the command line.  Unknown keys and
values of the wrong type are refused; everything else is checked as the flags are (vmm/config/vm.py).

    options = load("vm.toml")       # {key: value} with OPTIONS' keys, ready for from_dict
    text = to_toml(options)         # the same options as a config file
"""

from __future__ import annotations

import math
import re
import tomllib

from .flags import CHOICE, FLAGS, INT, LIST, OPTIONAL, SECONDS, Flag
from .options import ConfigError

_BY_FILE_KEY = {f.file_key: f for f in FLAGS.values()}


def load(path: str) -> dict:
    """The options in the TOML file at `path`, keyed as OPTIONS; ConfigError names the file and
    what is wrong in one line."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not TOML: {e}") from None
    options = {}
    for key, value in data.items():
        flag = _BY_FILE_KEY.get(key)
        if flag is None:
            raise ConfigError(f"{path}: unknown key {key!r}{_hint(key)}")
        value = _checked(flag, value, path)
        if value is not None:
            options[flag.key] = value
    return options


def _hint(key: str) -> str:
    spelled = key.replace("_", "-").lstrip("-")
    if spelled in _BY_FILE_KEY:
        return f" (keys are the options' names with dashes: {spelled})"
    return f" (known: {', '.join(_BY_FILE_KEY)})"


def _checked(flag: Flag, value, path: str):
    """`value` as the command line would give it to from_dict (None: the option not given), or
    ConfigError when its TOML type does not fit the option."""
    if flag.kind == LIST:
        if not isinstance(value, list) or not all(_is_entry(flag, v) for v in value):
            _wrong(flag, value, path, "an array of strings" + (" or tables" if flag.table else ""))
        return value or None
    if flag.kind == OPTIONAL and isinstance(value, bool):
        return "" if value else None  # true: the flag alone; false: not given
    if flag.kind == INT:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong(flag, value, path, "an integer")
        return value
    if flag.kind == SECONDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _wrong(flag, value, path, "a number of seconds")
        return value
    if not _is_entry(flag, value):
        _wrong(flag, value, path, "true or a string" if flag.kind == OPTIONAL else "a string")
    if flag.kind == CHOICE and value not in flag.choices:
        raise ConfigError(f"{path}: {flag.file_key} = {_value(value)}: use {' or '.join(flag.choices)}")
    return value


def _is_entry(flag: Flag, value) -> bool:
    return isinstance(value, str) or (flag.table and isinstance(value, dict))


def _wrong(flag: Flag, value, path: str, expected: str):
    raise ConfigError(f"{path}: {flag.file_key} = {_value(value)}: expected {expected}")


def to_toml(options: dict) -> str:
    """`options` (keyed as OPTIONS, values as the command line or load() gives them, checked by
    from_dict) as a config file that load() reads back to the same options (seconds given as text
    become numbers); in OPTIONS' order, options not given left out."""
    lines = []
    for key, flag in FLAGS.items():
        value = options.get(key)
        if value is None:
            continue
        if flag.kind == OPTIONAL and value == "":
            value = True
        elif flag.kind == SECONDS and isinstance(value, str):  # the flag's text, checked by from_dict
            value = float(value)
            value = int(value) if value.is_integer() else value
        lines.append(f"{flag.file_key} = {_value(value)}")
    return "".join(line + "\n" for line in lines)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _value(value) -> str:
    """A TOML value: string, boolean, integer, float, array, inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "inf" if value > 0 else "-inf" if value < 0 else "nan"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{k if _BARE_KEY.fullmatch(k) else _string(k)} = {_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }" if value else "{}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
