"""The exit profile of `pyvmm run --stats`: where a guest waits on pyvmm.

Per vCPU, for each kind of exit and where it went (the device the port-I/O or MMIO bus gives
the port or address to, and that port or address): how many, and how long pyvmm spent on them
in Python; the time inside KVM_RUN; the wall time (time.time()) of the first KVM_RUN.

A vCPU thread with stats calls a `TimedRun` where it would call `Vcpu.run`; without stats it
calls `Vcpu.run` itself, so the profile costs nothing when off.  The time charged to an exit
runs from KVM_RUN's return to the next KVM_RUN: all the Python work of that exit (the bus,
the device, the loop).  The time in KVM_RUN includes decoding its exit (vmm/kvm/vcpu.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from time import perf_counter_ns

from .kvm import exits

EXIT_KINDS = {
    exits.IoIn: "io-in", exits.IoOut: "io-out", exits.MmioRead: "mmio-read", exits.MmioWrite: "mmio-write",
    exits.Hlt: "hlt", exits.Interrupted: "interrupted", exits.SystemEvent: "system-event",
    exits.Shutdown: "shutdown", exits.InternalError: "internal-error", exits.FailEntry: "fail-entry",
    exits.Unknown: "unknown",
}
TABLE_ROWS = 25  # per vCPU on stderr; the JSON has them all


@dataclass
class ExitRow:
    """The exits of one kind at one place."""
    kind: str          # one of EXIT_KINDS' values
    device: str        # the bus's name for the device ("serial", "unassigned"); "" for exits without a place
    address: int | None  # the port or MMIO address; None for exits without a place
    count: int = 0
    total_ns: int = 0  # time in Python on them

    @property
    def where(self) -> str:
        return "" if self.address is None else f"{self.device} {self.address:#x}"


@dataclass
class VcpuExitStats:
    """One vCPU's exit profile (written by its thread only)."""
    vcpu: int
    rows: dict[tuple, ExitRow] = field(default_factory=dict)  # (kind, device, address) -> row
    kvm_run_ns: int = 0
    kvm_runs: int = 0
    first_kvm_run_wall: float | None = None

    def record(self, kind: str, device: str, address: int | None, ns: int) -> None:
        row = self.rows.get((kind, device, address))
        if row is None:
            row = self.rows[(kind, device, address)] = ExitRow(kind, device, address)
        row.count += 1
        row.total_ns += ns

    def sorted_rows(self) -> list[ExitRow]:
        """Most time first."""
        return sorted(self.rows.values(), key=lambda r: (-r.total_ns, -r.count, r.kind, r.where))

    @property
    def exits(self) -> int:
        return sum(r.count for r in list(self.rows.values()))

    @property
    def handling_ns(self) -> int:
        return sum(r.total_ns for r in list(self.rows.values()))


class TimedRun:
    """`Vcpu.run` that records into `stats`: the time inside it, and for each exit its kind, its
    place on `pio` or `mmio` and the time until the next call.  `finish()` charges the last exit."""

    def __init__(self, run, stats: VcpuExitStats, *, pio, mmio):
        self._run, self.stats, self._pio, self._mmio = run, stats, pio, mmio
        self._pending = None  # the exit being handled, returned at _returned_ns
        self._returned_ns = 0

    def __call__(self):
        self.finish()
        stats = self.stats
        if stats.first_kvm_run_wall is None:
            stats.first_kvm_run_wall = time.time()
        start = perf_counter_ns()
        ex = self._run()
        self._returned_ns = end = perf_counter_ns()
        stats.kvm_run_ns += end - start
        stats.kvm_runs += 1
        self._pending = ex
        return ex

    def finish(self) -> None:
        if self._pending is not None:
            ns = perf_counter_ns() - self._returned_ns
            self.stats.record(*self.place(self._pending), ns)
            self._pending = None

    def place(self, ex) -> tuple[str, str, int | None]:
        """(kind, device, address) of an exit."""
        kind = EXIT_KINDS.get(type(ex), type(ex).__name__.lower())
        if isinstance(ex, (exits.IoIn, exits.IoOut)):
            return kind, self._pio.name_at(ex.port), ex.port
        if isinstance(ex, (exits.MmioRead, exits.MmioWrite)):
            return kind, self._mmio.name_at(ex.addr), ex.addr
        return kind, "", None


def render_table(stats: VcpuExitStats, *, limit: int = TABLE_ROWS) -> str:
    """The profile of one vCPU as a text table: the `limit` rows with the most time, the totals,
    and KVM_RUN."""
    rows = stats.sorted_rows()
    shown, rest = rows[:limit], rows[limit:]
    where_width = max([len("where")] + [len(r.where) for r in shown])
    kind_width = max([len("kind"), len("KVM_RUN")] + [len(r.kind) for r in shown])

    def line(kind: str, where: str, count: int, ns: int) -> str:
        per_exit = f"{ns / count / 1e3:10.1f}" if count else f"{'-':>10}"
        return f"  {kind:<{kind_width}}  {where:<{where_width}}  {count:>9}  {ns / 1e6:11.3f}  {per_exit}"

    out = [f"vcpu{stats.vcpu}: {stats.exits} exits, {stats.handling_ns / 1e6:.3f} ms in pyvmm on them, "
           f"{stats.kvm_run_ns / 1e6:.3f} ms in KVM_RUN",
           f"  {'kind':<{kind_width}}  {'where':<{where_width}}  {'count':>9}  {'total ms':>11}  {'µs/exit':>10}"]
    out += [line(r.kind, r.where, r.count, r.total_ns) for r in shown]
    if rest:
        out.append(line(f"({len(rest)} more rows)", "", sum(r.count for r in rest), sum(r.total_ns for r in rest)))
    out.append(line("total", "", stats.exits, stats.handling_ns))
    out.append(line("KVM_RUN", "", stats.kvm_runs, stats.kvm_run_ns))
    return "\n".join(out)


def vcpu_json(stats: VcpuExitStats) -> dict:
    """One vCPU's profile as JSON-able data, every row, most time first."""
    return {"vcpu": stats.vcpu, "first_kvm_run_wall": stats.first_kvm_run_wall,
            "kvm_run_ns": stats.kvm_run_ns, "kvm_runs": stats.kvm_runs,
            "exits": stats.exits, "handling_ns": stats.handling_ns,
            "rows": [{"kind": r.kind, "device": r.device, "address": r.address, "where": r.where,
                      "count": r.count, "total_ns": r.total_ns} for r in stats.sorted_rows()]}


def report_json(boots: list[list[VcpuExitStats]], *, process_start_wall: float | None,
                main_start_wall: float | None) -> dict:
    """The profiles of every boot so far (one list of vCPUs each), with when the process and
    pyvmm's main() started: vcpus[0]'s first_kvm_run_wall less these is the time to the first
    guest instruction."""
    return {"process_start_wall": process_start_wall, "main_start_wall": main_start_wall,
            "boots": [{"vcpus": [vcpu_json(s) for s in vcpus]} for vcpus in boots]}


def write_report(path: str, report: dict) -> None:
    import json  # only with --stats=PATH: a plain start loads no more than it needs

    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def process_start_wall() -> float | None:
    """When this process started, as a time.time() (to the kernel's clock tick, 10 ms at USER_HZ
    100): field 22 of /proc/self/stat, clock ticks since boot.  None where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_start
