"""Plain tables for `pyvmm ls`, `info` and `counters`: columns padded to their widest cell."""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def human_bytes(n) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def ls_table(vms: list[dict]) -> str:
    rows = [[vm.get("name"), vm.get("pid", "-"), vm.get("state"), vm.get("cpus", "-"),
             human_bytes(vm.get("memory")), duration(vm.get("uptime_s"))] for vm in vms]
    return table(["NAME", "PID", "STATE", "CPUS", "MEMORY", "UPTIME"], rows)


def info_text(vm: dict) -> str:
    head = table(["", ""], [["name", vm["name"]], ["pid", vm["pid"]], ["state", vm["state"]],
                            ["uptime", duration(vm["uptime_s"])], ["paused", duration(vm["paused_s"])],
                            ["cpus", vm["cpus"]], ["memory", human_bytes(vm["memory"])],
                            ["api socket", vm.get("api_socket")]]).split("\n", 1)[1]
    vcpus = table(["VCPU", "THREAD", "RUNNING", "EXITS"],
                  [[v["id"], v["thread"], "yes" if v["running"] else "no", v["exits"]] for v in vm["vcpus"]])
    devices = table(["DEVICE", "TYPE", "PCI SLOT", "QUEUES", "DRIVER"],
                    [[d["id"], d["type"], d["pci_slot"], d["queues"], "ready" if d["driver_ok"] else "-"]
                     for d in vm["devices"]]) if vm["devices"] else "no virtio devices"
    return f"{head}\n\n{vcpus}\n\n{devices}"


def counters_text(counters: dict) -> str:
    devices = table(["DEVICE", "TYPE", "REQUESTS", "BYTES", "ERRORS", "NOTIFICATIONS", "INTERRUPTS"],
                    [[ident, d["type"], d["requests"], d["bytes"], d["errors"], d["notifications"], d["interrupts"]]
                     for ident, d in counters["devices"].items()]) if counters["devices"] else "no virtio devices"
    vcpus = table(["VCPU", "EXITS", "BY KIND"],
                  [[ident, v["exits"], " ".join(f"{k}={n}" for k, n in v["by_kind"].items())]
                   for ident, v in counters["vcpus"].items()])
    return f"{devices}\n\n{vcpus}"
