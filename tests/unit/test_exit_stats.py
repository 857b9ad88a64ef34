"""vmm/exit_stats.py: what a vCPU's exits are recorded as, the table and the JSON (pyvmm run --stats)."""

import json
import time

from vmm import exit_stats
from vmm.bus import Bus
from vmm.exit_stats import ExitRow, TimedRun, VcpuExitStats, render_table, report_json, vcpu_json
from vmm.kvm import exits
from vmm.kvm.structs import KVM_SYSTEM_EVENT_SHUTDOWN
from vmm.lifecycle import Lifecycle
from vmm.vcpu import VcpuThread


class Device:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def buses():
    pio, mmio = Bus("pio"), Bus("mmio")
    pio.register(0x3F8, 8, Device(), "serial")
    mmio.register(0xD0000000, 0x1000, Device(), "virtio-blk 00:01.0 bar0")
    return pio, mmio


class ScriptedVcpu:
    """A vCPU whose KVM_RUN returns the exits given, then the guest's power-off."""

    id = 0

    def __init__(self, script):
        self.script = list(script) + [exits.SystemEvent(type=KVM_SYSTEM_EVENT_SHUTDOWN, data=())]

    def run(self):
        return self.script.pop(0)

    def complete_io_in(self, data):
        pass

    def complete_mmio_read(self, data):
        pass


def counts(stats):
    return {(r.kind, r.where): r.count for r in stats.rows.values()}


def test_timed_run_records_kind_place_and_time_of_each_exit():
    pio, mmio = buses()
    script = [exits.IoOut(0x3F8, 1, b"a"), exits.IoOut(0x3F8, 1, b"b"), exits.IoIn(0x3FD, 1, 1),
              exits.MmioWrite(0xD0000014, b"\1\0\0\0"), exits.MmioRead(0xD0000000, 4), exits.IoOut(0x80, 1, b"\0"),
              exits.Hlt(), exits.Interrupted()]
    vcpu, stats = ScriptedVcpu(script), VcpuExitStats(0)
    run = TimedRun(vcpu.run, stats, pio=pio, mmio=mmio)
    before = time.time()
    returned = [run() for _ in range(len(script))]
    run.finish()
    assert returned == script  # the exits themselves, unchanged
    assert before <= stats.first_kvm_run_wall <= time.time()
    assert counts(stats) == {("io-out", "serial 0x3f8"): 2, ("io-in", "serial 0x3fd"): 1,
                             ("mmio-write", "virtio-blk 00:01.0 bar0 0xd0000014"): 1,
                             ("mmio-read", "virtio-blk 00:01.0 bar0 0xd0000000"): 1,
                             ("io-out", "unassigned 0x80"): 1, ("hlt", ""): 1, ("interrupted", ""): 1}
    assert stats.exits == stats.kvm_runs == len(script)
    assert stats.kvm_run_ns > 0 and all(r.total_ns > 0 for r in stats.rows.values())
    run.finish()  # nothing left to charge
    assert stats.exits == len(script)


def test_a_vcpu_thread_with_stats_records_every_exit_until_it_ends():
    pio, mmio = buses()
    serial = pio.find(0x3F8).device
    vcpu = ScriptedVcpu([exits.IoOut(0x3F8, 1, b"h"), exits.IoOut(0x3F8, 1, b"i")])
    stats, lifecycle = VcpuExitStats(0), Lifecycle()
    t = VcpuThread(vcpu, pio=pio, mmio=mmio, mem=None, lifecycle=lifecycle, stats=stats)
    t.start()
    t.join(5)
    assert serial.writes == [(0, 1, ord("h")), (0, 1, ord("i"))]
    assert counts(stats) == {("io-out", "serial 0x3f8"): 2, ("system-event", ""): 1}  # the power-off too
    assert t.exits == stats.kvm_runs == 3
    lifecycle.close()


def make_stats():
    s = VcpuExitStats(1, kvm_run_ns=5_000_000, kvm_runs=7, first_kvm_run_wall=1000.5)
    s.record("io-out", "serial", 0x3F8, 1_000)
    s.record("io-out", "serial", 0x3F8, 3_000)
    s.record("mmio-read", "pci-ecam", 0xE0000000, 2_000_000)
    s.record("hlt", "", None, 2_000)
    return s


def test_rows_sort_by_time_and_the_totals_add_up():
    s = make_stats()
    assert [r.where for r in s.sorted_rows()] == ["pci-ecam 0xe0000000", "serial 0x3f8", ""]
    assert s.exits == 4 and s.handling_ns == 2_006_000
    assert ExitRow("io-out", "serial", 0x3F8).where == "serial 0x3f8"


def test_table_has_a_row_per_place_then_totals_and_kvm_run():
    lines = render_table(make_stats()).splitlines()
    assert lines[0] == "vcpu1: 4 exits, 2.006 ms in pyvmm on them, 5.000 ms in KVM_RUN"
    assert lines[1].split() == ["kind", "where", "count", "total", "ms", "µs/exit"]
    assert lines[2].split() == ["mmio-read", "pci-ecam", "0xe0000000", "1", "2.000", "2000.0"]
    assert lines[3].split() == ["io-out", "serial", "0x3f8", "2", "0.004", "2.0"]
    assert lines[4].split() == ["hlt", "1", "0.002", "2.0"]
    assert lines[5].split() == ["total", "4", "2.006", "501.5"]
    assert lines[6].split() == ["KVM_RUN", "7", "5.000", "714.3"]


def test_table_shows_the_rows_with_most_time_and_sums_the_rest():
    lines = render_table(make_stats(), limit=1).splitlines()
    assert lines[2].split()[:2] == ["mmio-read", "pci-ecam"]
    assert lines[3].split() == ["(2", "more", "rows)", "3", "0.006", "2.0"]
    assert lines[4].split()[0] == "total" and len(lines) == 6


def test_json_has_every_row_and_the_wall_times():
    report = report_json([[make_stats()], [VcpuExitStats(0)]], process_start_wall=999.0, main_start_wall=999.5)
    report = json.loads(json.dumps(report))  # JSON-able as it is
    assert (report["process_start_wall"], report["main_start_wall"]) == (999.0, 999.5)
    first = report["boots"][0]["vcpus"][0]
    assert first == vcpu_json(make_stats())
    assert {k: first[k] for k in ("vcpu", "first_kvm_run_wall", "kvm_run_ns", "kvm_runs", "exits", "handling_ns")} \
        == {"vcpu": 1, "first_kvm_run_wall": 1000.5, "kvm_run_ns": 5_000_000, "kvm_runs": 7, "exits": 4,
            "handling_ns": 2_006_000}
    assert first["rows"][1] == {"kind": "io-out", "device": "serial", "address": 0x3F8, "where": "serial 0x3f8",
                                "count": 2, "total_ns": 4_000}
    assert first["rows"][2]["address"] is None
    assert report["boots"][1]["vcpus"][0]["rows"] == []


def test_write_report(tmp_path):
    path = tmp_path / "stats.json"
    exit_stats.write_report(str(path), {"boots": []})
    assert json.loads(path.read_text()) == {"boots": []}


def test_process_start_is_before_now():
    start = exit_stats.process_start_wall()
    assert start is not None and time.time() - 24 * 3600 < start <= time.time() + 0.05


def test_bus_names_its_devices():
    pio, _ = buses()
    pio.register(0x70, 2, Device())
    assert pio.name_at(0x3FD) == "serial"
    assert pio.name_at(0x71) == "Device"  # no name given: the class's
    assert pio.name_at(0x80) == "unassigned"
