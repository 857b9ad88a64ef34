"""--disk: one virtio-blk disk, `PATH[,readonly=on][,serial=ID][,cache=none][,queues=N]`."""

from __future__ import annotations

from dataclasses import dataclass

from .options import ConfigError, check_dict, parse_bool, parse_count, split_options

DISK_SPEC_SYNTAX = "PATH[,readonly=on|off][,serial=ID][,cache=writeback|none][,queues=N]"
DISK_KEYS = ("readonly", "serial", "cache", "queues")
DISK_ALIASES = {"ro": "readonly", "read-only": "readonly", "read_only": "readonly"}


@dataclass(frozen=True)
class DiskSpec:
    """One disk as the configuration describes it."""

    path: str
    read_only: bool = False
    serial: str = ""
    cache: str = "writeback"
    queues: int | None = None  # None: the machine's choice (one per vCPU)


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse `PATH[,readonly=on][,serial=ID][,cache=none][,queues=N]`; ConfigError says what is wrong."""
    path, values = split_options(text, what="disk", syntax=DISK_SPEC_SYNTAX, known=DISK_KEYS,
                                 aliases=DISK_ALIASES, head=True)
    if not path:
        raise ConfigError(f"disk {text!r}: no image path (expected {DISK_SPEC_SYNTAX})")
    return disk_from_values(path, values, where=f"disk {text!r}")


def disk_from_dict(d: dict) -> DiskSpec:
    """{"path": ..., "readonly": ..., "serial": ..., "cache": ..., "queues": ...} (a config file's form)."""
    where = f"disk {d!r}"
    check_dict(d, where=where, known=("path", *DISK_KEYS, *DISK_ALIASES), required="path", missing="no image path")
    values = {DISK_ALIASES.get(k, k): v for k, v in d.items() if k != "path"}
    return disk_from_values(str(d["path"]), values, where=where)


def disk_from_values(path: str, values: dict, *, where: str) -> DiskSpec:
    from virtio.backends.raw import CACHE_MODES  # (the device's own limits: loaded with the first disk)
    from virtio.blk import MAX_QUEUES, check_serial

    read_only = parse_bool(values["readonly"], where, "readonly") if "readonly" in values else False
    serial = str(values.get("serial", ""))
    try:
        check_serial(serial)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    cache = str(values.get("cache", "writeback")).strip().lower()
    if cache not in CACHE_MODES:
        raise ConfigError(f"{where}: cache={values['cache']!r} is not one of {', '.join(CACHE_MODES)}")
    queues = parse_count(values["queues"], where, "queues", MAX_QUEUES) if "queues" in values else None
    return DiskSpec(path=path, read_only=read_only, serial=serial, cache=cache, queues=queues)
