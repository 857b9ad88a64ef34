"""--vsock: a virtio-vsock device, `cid=N,socket=PATH` (Firecracker's hybrid vsock on the host side).

cid is the guest's context ID: 3 to 2^32-2 (0-2 are the hypervisor's, the local loopback's and
the host's; 2^32-1 is VMADDR_CID_ANY).  PATH is where host programs connect (`CONNECT <port>`),
and PATH_<port> where a host program listens for the guest's connections to CID 2, port <port>
(virtio/backends/vsock_unix.py).  A Unix socket path holds at most 107 bytes; PATH_<port> needs
up to 11 more."""

from __future__ import annotations

from dataclasses import dataclass

from .options import ConfigError, check_dict, split_options

VSOCK_SPEC_SYNTAX = "cid=N,socket=PATH"
VSOCK_KEYS = ("cid", "socket")
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
PORT_SUFFIX_MAX = len("_4294967295")


@dataclass(frozen=True)
class VsockSpec:
    """The vsock device as the configuration describes it."""

    cid: int
    socket: str


def parse_vsock_spec(text: str) -> VsockSpec:
    """Parse `cid=N,socket=PATH`; ConfigError says what is wrong."""
    _, values = split_options(text, what="vsock", syntax=VSOCK_SPEC_SYNTAX, known=VSOCK_KEYS)
    return vsock_from_values(values, where=f"vsock {text!r}")


def vsock_from_dict(d: dict) -> VsockSpec:
    """{"cid": ..., "socket": ...} (a config file's form)."""
    where = f"vsock {d!r}"
    check_dict(d, where=where, known=VSOCK_KEYS, required="socket", missing="no socket=PATH")
    return vsock_from_values(d, where=where)


def vsock_from_values(values: dict, *, where: str) -> VsockSpec:
    from virtio.vsock_packet import MAX_GUEST_CID, MIN_GUEST_CID  # (the device's limits, loaded with it)

    if "cid" not in values:
        raise ConfigError(f"{where}: no cid=N (expected {VSOCK_SPEC_SYNTAX})")
    cid = values["cid"]
    try:
        cid = cid if isinstance(cid, int) and not isinstance(cid, bool) else int(str(cid).strip(), 10)
    except ValueError:
        cid = -1
    if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
        raise ConfigError(f"{where}: cid={values['cid']!r} is not a number from {MIN_GUEST_CID} to {MAX_GUEST_CID}")
    path = str(values.get("socket", ""))
    if not path:
        raise ConfigError(f"{where}: no socket=PATH (expected {VSOCK_SPEC_SYNTAX})")
    if len(path.encode()) + PORT_SUFFIX_MAX > SUN_PATH_MAX:
        raise ConfigError(f"{where}: socket path is too long for a Unix socket with _PORT after it "
                          f"(at most {SUN_PATH_MAX - PORT_SUFFIX_MAX} bytes)")
    return VsockSpec(cid=cid, socket=path)
