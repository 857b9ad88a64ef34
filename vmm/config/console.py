"""--console-device serial|virtio and --port name=NAME,socket=PATH|file=PATH: virtio-console.

--console-device virtio puts the guest's console on hvc0, port 0 of a virtio-console device,
while --console still says where it goes; the default kernel command line then names both
consoles (console=ttyS0 console=hvc0: the kernel's early messages on the serial port, hvc0 the
console once its driver is loaded).  Each --port adds a named port to the same device: the guest
sees /sys/class/virtio-ports/vportNpM/name and /dev/virtio-ports/NAME.  socket=PATH: pyvmm
listens on the Unix socket PATH, one client at a time; file=PATH: the guest's output is appended
to PATH."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .options import ConfigError, check_dict, split_options

CONSOLE_DEVICES = ("serial", "virtio")
PORT_SPEC_SYNTAX = "name=NAME,socket=PATH or name=NAME,file=PATH"
PORT_KEYS = ("name", "socket", "file")
MAX_NAMED_PORTS = 31  # virtio/console.py's MAX_PORTS
PORT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # a file name in /dev/virtio-ports
SUN_PATH_MAX = 107  # struct sockaddr_un's sun_path, less its NUL


@dataclass(frozen=True)
class PortSpec:
    """One named port: its name and its host side (exactly one of socket and file)."""

    name: str
    socket: str | None = None
    file: str | None = None


def default_cmdline(console_device: str) -> str:
    return "console=ttyS0 console=hvc0" if console_device == "virtio" else "console=ttyS0"


def parse_console_device(value) -> str:
    if value not in CONSOLE_DEVICES:
        raise ConfigError(f"--console-device {value!r}: use {' or '.join(CONSOLE_DEVICES)}")
    return value


def parse_port_spec(text: str) -> PortSpec:
    """`name=NAME,socket=PATH` or `name=NAME,file=PATH`; ConfigError says what is wrong."""
    _, values = split_options(text, what="port", syntax=PORT_SPEC_SYNTAX, known=PORT_KEYS)
    return port_from_values(values, where=f"port {text!r}")


def port_from_dict(d: dict) -> PortSpec:
    where = f"port {d!r}"
    check_dict(d, where=where, known=PORT_KEYS, required="name", missing="no name=NAME")
    return port_from_values(d, where=where)


def port_from_values(values: dict, *, where: str) -> PortSpec:
    name = str(values.get("name", ""))
    if not PORT_NAME.fullmatch(name):
        raise ConfigError(f"{where}: name={name!r} is not 1 to 64 letters, digits, '.', '_' or '-' "
                          f"(not starting with '.')")
    ends = [key for key in ("socket", "file") if key in values]
    if len(ends) != 1:
        raise ConfigError(f"{where}: give one of socket=PATH and file=PATH (expected {PORT_SPEC_SYNTAX})")
    path = str(values[ends[0]])
    if not path:
        raise ConfigError(f"{where}: {ends[0]}= needs a PATH")
    if ends[0] == "socket" and len(path.encode()) > SUN_PATH_MAX:
        raise ConfigError(f"{where}: a Unix socket path is at most {SUN_PATH_MAX} bytes")
    return PortSpec(name=name, **{ends[0]: path})


def check_ports(ports: list[PortSpec]) -> tuple[PortSpec, ...]:
    """The ports of one VM: distinct names and socket paths, at most MAX_NAMED_PORTS."""
    if len(ports) > MAX_NAMED_PORTS:
        raise ConfigError(f"--port: {len(ports)} ports, at most {MAX_NAMED_PORTS}")
    for key in ("name", "socket"):
        seen = [getattr(p, key) for p in ports if getattr(p, key) is not None]
        twice = sorted({v for v in seen if seen.count(v) > 1})
        if twice:
            raise ConfigError(f"--port: {key} {twice[0]!r} given twice")
    return tuple(ports)
