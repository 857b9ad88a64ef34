"""--boot: the firmware's boot order, `disk`, `net`, `diskN`, `netN` (N counts the --disk / --net options)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .options import ConfigError

BOOT_SYNTAX = "a comma-separated list of disk, net, diskN, netN (N counts --disk/--net options from 0)"


@dataclass(frozen=True)
class BootItem:
    """One entry of --boot: a kind of device, and which one."""

    kind: str  # "disk" or "net"
    index: int | None = None  # which --disk / --net (from 0); None: all of that kind, in order


DEFAULT_BOOT_ORDER = (BootItem("disk"), BootItem("net"))


def parse_boot_order(text: str) -> tuple[BootItem, ...]:
    """'disk', 'net,disk', 'disk1,disk0,net' -> BootItems; ConfigError says what is wrong."""
    items = []
    for word in text.split(","):
        word = word.strip().lower()
        m = re.fullmatch(r"(disk|net)(\d*)", word)
        if not m:
            raise ConfigError(f"--boot {text!r}: {word!r} is not disk, net, diskN or netN ({BOOT_SYNTAX})")
        items.append(BootItem(m.group(1), int(m.group(2)) if m.group(2) else None))
    return tuple(items)


def boot_slots(order, disk_slots: list[int], net_slots: list[int]) -> list[tuple[str, int]]:
    """The (kind, PCI slot) sequence a boot order names, each device once, in order; ConfigError
    for an index past the devices given."""
    by_kind = {"disk": disk_slots, "net": net_slots}
    out: list[tuple[str, int]] = []
    for item in order:
        slots = by_kind[item.kind]
        if item.index is None:
            chosen = slots
        elif item.index < len(slots):
            chosen = [slots[item.index]]
        else:
            raise ConfigError(f"--boot: {item.kind}{item.index} names a {item.kind} that was not given "
                              f"(there {'is' if len(slots) == 1 else 'are'} {len(slots)})")
        for slot in chosen:
            if (item.kind, slot) not in out:
                out.append((item.kind, slot))
    return out
