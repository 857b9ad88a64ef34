"""A Machine as JSON-ready data: what GET /vm and GET /vm/counters answer."""

from __future__ import annotations

import dataclasses
import os

from ..exit_stats import EXIT_KINDS


def _jsonable(value):
    """Config values as JSON takes them: dataclasses as dicts, tuples as lists, the rest as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def virtio_devices(machine) -> list[tuple[str, int, object]]:
    """(id, PCI slot, VirtioDevice) of each virtio device, ids as blk0, net0, rng0... in slot order."""
    out, seen = [], {}
    for slot, pci_dev in enumerate(machine.pci.devices):
        device = getattr(pci_dev, "device", None)
        if device is None or not hasattr(device, "counter_totals"):
            continue
        kind = device.name.removeprefix("virtio-")
        n = seen.get(kind, 0)
        seen[kind] = n + 1
        out.append((f"{kind}{n}", slot, device))
    return out


def vm_info(machine, *, name: str, api_socket: str | None) -> dict:
    """GET /vm: state, uptime, the configuration, the vCPUs and the devices."""
    config = machine.config
    return {
        "name": name,
        "pid": os.getpid(),
        "state": machine.state,
        "uptime_s": round(machine.uptime(), 3),
        "paused_s": round(machine.paused_time(), 3),
        "cpus": config.cpus,
        "memory": config.mem_size,
        "api_socket": api_socket,
        "config": _jsonable(config),
        "vcpus": [{"id": t.vcpu.id, "thread": t.name, "running": t.is_alive(), "exits": t.exits}
                  for t in machine.threads],
        "devices": [{"id": ident, "type": device.name, "pci_slot": slot, "queues": len(device.queues),
                     "driver_ok": bool(device.active), "status": device.status}
                    for ident, slot, device in virtio_devices(machine)],
    }


def vm_counters(machine) -> dict:
    """GET /vm/counters: per virtio device requests, bytes, errors, notifications, interrupts (and
    its own detail); per vCPU its exits by kind."""
    return {
        "devices": {ident: {"type": device.name, **device.counter_totals()}
                    for ident, _, device in virtio_devices(machine)},
        "vcpus": {str(t.vcpu.id): {"exits": t.exits, "by_kind": exits_by_kind(t.exit_counts)}
                  for t in machine.threads},
    }


def exits_by_kind(counts: dict) -> dict[str, int]:
    return {EXIT_KINDS.get(kind, kind.__name__): n for kind, n in sorted(dict(counts).items(), key=lambda kv: -kv[1])}
