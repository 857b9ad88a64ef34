"""virtio-console's control messages (OASIS virtio 1.2, 5.3.6.2), as bytes on the control queues.

    struct virtio_console_control {
        le32 id;      /* port number */
        le16 event;   /* VIRTIO_CONSOLE_* */
        le16 value;
    };

The driver sends exactly this on the control transmitq; the device sends it on the control
receiveq, followed for PORT_NAME by the name's bytes.  `parse_control` checks what the driver
sent (it is untrusted: any length, any id, any event); `pack_control` makes what the device sends.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Control events (5.3.6.2)
VIRTIO_CONSOLE_DEVICE_READY = 0
VIRTIO_CONSOLE_DEVICE_ADD = 1
VIRTIO_CONSOLE_DEVICE_REMOVE = 2
VIRTIO_CONSOLE_PORT_READY = 3
VIRTIO_CONSOLE_CONSOLE_PORT = 4
VIRTIO_CONSOLE_RESIZE = 5
VIRTIO_CONSOLE_PORT_OPEN = 6
VIRTIO_CONSOLE_PORT_NAME = 7

EVENT_NAMES = {
    VIRTIO_CONSOLE_DEVICE_READY: "DEVICE_READY",
    VIRTIO_CONSOLE_DEVICE_ADD: "DEVICE_ADD",
    VIRTIO_CONSOLE_DEVICE_REMOVE: "DEVICE_REMOVE",
    VIRTIO_CONSOLE_PORT_READY: "PORT_READY",
    VIRTIO_CONSOLE_CONSOLE_PORT: "CONSOLE_PORT",
    VIRTIO_CONSOLE_RESIZE: "RESIZE",
    VIRTIO_CONSOLE_PORT_OPEN: "PORT_OPEN",
    VIRTIO_CONSOLE_PORT_NAME: "PORT_NAME",
}

VIRTIO_CONSOLE_CONTROL = struct.Struct("<IHH")
assert VIRTIO_CONSOLE_CONTROL.size == 8


class ControlError(ValueError):
    """A control message the driver got wrong (its chain is returned, nothing else happens)."""


@dataclass(frozen=True)
class ControlMessage:
    id: int
    event: int
    value: int

    def __str__(self) -> str:
        return f"{EVENT_NAMES.get(self.event, f'event {self.event}')}(port {self.id}, value {self.value})"


def parse_control(data: bytes) -> ControlMessage:
    """The driver's message in `data`: exactly 8 bytes (the driver sends nothing after it)."""
    if len(data) != VIRTIO_CONSOLE_CONTROL.size:
        raise ControlError(f"control message of {len(data)} bytes, not {VIRTIO_CONSOLE_CONTROL.size}")
    return ControlMessage(*VIRTIO_CONSOLE_CONTROL.unpack(data))


def pack_control(port: int, event: int, value: int = 0, payload: bytes = b"") -> bytes:
    """A device-to-driver message (PORT_NAME carries the name as `payload`, without a NUL)."""
    return VIRTIO_CONSOLE_CONTROL.pack(port, event, value) + payload
