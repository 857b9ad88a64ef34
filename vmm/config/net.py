"""--net: one virtio-net NIC on a host tap, `tap=NAME[,mac=MAC][,queues=N][,mtu=N][,rom=PATH|off]`.

mtu=N (68-65535) is offered to the guest (VIRTIO_NET_F_MTU: its driver takes it as the
link's MTU and its ceiling) and set on the tap, so both ends carry frames of that size;
without it the guest is offered 1500 and the tap is left as it is.

Without mac=, `default_mac(tap, vm_id)` derives a stable, locally administered
52:54:00:xx:xx:xx address from the tap name and an identifier of the VM chosen
by the caller (its name, say): the same VM on the same tap gets the same
address on every start, two VMs (or two taps) almost surely differ."""

from __future__ import annotations

from dataclasses import dataclass

from .options import ConfigError, check_dict, parse_count, split_options

NET_SPEC_SYNTAX = "tap=NAME[,mac=MAC][,queues=N][,mtu=N][,rom=PATH|off]"
NET_KEYS = ("tap", "mac", "queues", "mtu", "rom")


@dataclass(frozen=True)
class NetSpec:
    """One NIC as the configuration describes it."""

    tap: str
    mac: bytes | None = None  # None: default_mac(tap, vm_id)
    queues: int | None = None  # queue pairs; None: the machine's choice (one per vCPU)
    mtu: int | None = None  # offered to the guest and set on the tap; None: 1500 offered, the tap untouched
    rom: str | None = None  # expansion ROM image; None: the machine's default, "off": none


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """`52:54:00:12:34:56` (or with '-') as 6 bytes; ConfigError unless a unicast, non-zero address."""
    from virtio.net_common import ETH_ALEN  # (the device's own limits: loaded with the first NIC)

    parts = text.strip().replace("-", ":").split(":")
    try:
        if len(parts) != ETH_ALEN or not all(1 <= len(p) <= 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"MAC address {text!r} is not six hex bytes like 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text!r} is a multicast address (the first byte is odd)")
    if mac == bytes(ETH_ALEN):
        raise ConfigError(f"MAC address {text!r} is all zeroes")
    return mac


def default_mac(tap: str, vm_id: str | int = "") -> bytes:
    """A stable MAC for a NIC: 52:54:00 (locally administered, unicast) and 3 bytes of
    SHA-256 over the VM's identifier and the tap name.  The caller picks `vm_id` (the VM's
    name, or its index among the VMs it starts); equal inputs give equal addresses."""
    import hashlib  # (here: only a NIC without a MAC needs it)

    digest = hashlib.sha256(f"pyvmm-net\0{vm_id}\0{tap}".encode()).digest()
    return b"\x52\x54\x00" + digest[:3]


def parse_net_spec(text: str) -> NetSpec:
    """Parse `tap=NAME[,mac=MAC][,queues=N][,mtu=N][,rom=PATH|off]`; ConfigError says what is wrong."""
    _, values = split_options(text, what="net", syntax=NET_SPEC_SYNTAX, known=NET_KEYS)
    if not values.get("tap", "").strip():
        raise ConfigError(f"net {text!r}: no tap=NAME (expected {NET_SPEC_SYNTAX})")
    return net_from_values({k: v.strip() for k, v in values.items()}, where=f"net {text!r}")


def net_from_dict(d: dict) -> NetSpec:
    """{"tap": ..., "mac": ..., "queues": ..., "mtu": ..., "rom": ...} (a config file's form)."""
    where = f"net {d!r}"
    check_dict(d, where=where, known=NET_KEYS, required="tap", missing="no tap=NAME")
    return net_from_values(d, where=where)


def net_from_values(values: dict, *, where: str) -> NetSpec:
    from virtio.backends.tap import TapError, check_tap_name  # (loaded with the first NIC)
    from virtio.net_common import MAX_QUEUE_PAIRS

    try:
        check_tap_name(values["tap"])
    except TapError as err:
        raise ConfigError(f"{where}: {err}") from None
    mac = None
    if "mac" in values:
        try:
            mac = parse_mac(values["mac"])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    queues = parse_count(values["queues"], where, "queues", MAX_QUEUE_PAIRS) if "queues" in values else None
    mtu = parse_mtu(values["mtu"], where) if "mtu" in values else None
    if "rom" in values and not values["rom"]:
        raise ConfigError(f"{where}: rom= needs a PATH (or off)")
    return NetSpec(tap=values["tap"], mac=mac, queues=queues, mtu=mtu, rom=values.get("rom"))


def parse_mtu(value, where: str) -> int:
    """mtu=N: a whole number from MIN_MTU (68, what IPv4 needs) to MAX_MTU (65535)."""
    from virtio.net_common import MAX_MTU, MIN_MTU

    try:
        mtu = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 10)
    except ValueError:
        mtu = 0
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ConfigError(f"{where}: mtu={value!r} is not a number from {MIN_MTU} to {MAX_MTU}")
    return mtu
