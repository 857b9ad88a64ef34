"""What a virtio device has done, per queue: requests, bytes, errors, the driver's notifications
and the interrupts sent back.  Each queue is served by one I/O thread at a time, so each counter has
one writer; readers (the management API) add them up whenever they like."""

from __future__ import annotations

from dataclasses import dataclass, fields

COUNTERS = ("requests", "bytes", "errors", "notifications", "interrupts")


@dataclass
class QueueCounters:
    requests: int = 0       # chains completed (for virtio-net: frames)
    bytes: int = 0          # payload bytes moved, either way
    errors: int = 0         # requests failed or dropped for what the driver or the backend did
    notifications: int = 0  # the driver's kicks of this queue (its ioeventfd's count)
    interrupts: int = 0     # used-buffer notifications sent to the driver

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def totals(queues: list[QueueCounters]) -> dict[str, int]:
    """The sum over a device's queues."""
    out = dict.fromkeys(COUNTERS, 0)
    for q in queues:
        for name in COUNTERS:
            out[name] += getattr(q, name)
    return out
