"""The stock kit kernel on a host whose KVM emulates guest kernel mode (no VT-x/AMD-V).

There the kernel gets through its early boot and stops at an instruction the
emulator lacks.  Everything it prints before that is checked against what pyvmm
built: the command line, the e820 map, the KVM paravirt detection, every ACPI
table with our OEM id, the IOAPIC, the CPU count; then pyvmm must report the stop
cleanly (the vCPU registers, exit status 1) within a bounded time.
"""

import os
import re
import subprocess
import sys
import time

import pytest

from kernel.e820 import build_e820
from vmm.memory import layout
from vmm.pci.layout import DEFAULT_LAYOUT

pytestmark = [pytest.mark.linux, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_COUNTS = (1, 2)
MEM = 512 << 20
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 pyvmm.test=emulated"
BOUND_S = 400  # the whole early boot takes about 70-90 s here


@pytest.fixture(scope="module")
def boots(kernel_mode_native, tmp_path_factory):
    """Boot with 1 and 2 vCPUs at once (each keeps one host core busy emulating)."""
    if kernel_mode_native:
        pytest.skip("guest kernel mode is native here: the full-boot tests in test_stock_kernel_native.py apply")
    d = tmp_path_factory.mktemp("boots")
    procs = {}
    for n in CPU_COUNTS:
        log = d / f"console-{n}.log"
        procs[n] = (log, time.monotonic(), subprocess.Popen(
            [sys.executable, "-m", "vmm.cli", "run", "--cpus", str(n), "--mem", "512M", "--cmdline", CMDLINE,
             "--console", f"file:{log}"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    results = {}
    for n, (log, start, p) in procs.items():
        try:
            out, err = p.communicate(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"pyvmm with {n} vCPUs did not end within {BOUND_S} s; console:\n{log.read_text()[-3000:]}")
        results[n] = dict(rc=p.returncode, stderr=err, console=log.read_text(errors="replace"),
                          seconds=time.monotonic() - start)
        last = [l for l in results[n]["console"].splitlines() if l.startswith("[")][-1:]
        print(f"\n{n} vCPU(s): stopped after {results[n]['seconds']:.0f} s; last line: {last}")
    return results


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_banner_and_command_line(boots, cpus):
    console = boots[cpus]["console"]
    assert re.search(r"Linux version 6\.1\.\S+-cloud-amd64", console)
    # pyvmm adds clearcpuid= for the features this KVM cannot hide through CPUID
    assert re.search(r"Command line: " + re.escape(CMDLINE) + r"( clearcpuid=\S+)?\n", console)


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_e820_is_the_map_pyvmm_built(boots, cpus):
    names = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable"}
    expected = [f"BIOS-e820: [mem {e.addr:#018x}-{e.addr + e.size - 1:#018x}] {names[e.type]}"
                for e in build_e820(layout(MEM), DEFAULT_LAYOUT.e820_reserved())]
    assert any("0x00000000e0000000" in line and "reserved" in line for line in expected)  # ECAM
    seen = re.findall(r"BIOS-e820: \[mem 0x[0-9a-f]+-0x[0-9a-f]+\] [A-Za-z ]+?(?=\n)", boots[cpus]["console"])
    assert seen == expected


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_kvm_paravirt_detection_and_kvm_clock(boots, cpus):
    console = boots[cpus]["console"]
    assert "Hypervisor detected: KVM" in console
    assert "kvm-clock: Using msrs" in console
    assert "clocksource: kvm-clock:" in console
    assert "Booting paravirtualized kernel on KVM" in console


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_every_acpi_table_has_our_oem_id(boots, cpus):
    tables = re.findall(r"ACPI: (RSDP|XSDT|FACP|DSDT|APIC|MCFG) 0x[0-9A-F]+ [0-9A-F]+ \(v\d+ (\S+)", boots[cpus]["console"])
    names = {t for t, _ in tables}
    assert {"RSDP", "XSDT", "FACP", "DSDT", "APIC"} <= names
    assert all(oem == "PYVMM" for _, oem in tables), tables


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_ioapic_and_cpu_count_from_the_madt(boots, cpus):
    console = boots[cpus]["console"]
    assert re.search(r"IOAPIC\[0\]: apic_id \d+, version \d+, address 0xfec00000, GSI 0-23", console)
    assert "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 high edge)" in console
    assert "Using ACPI (MADT) for SMP configuration information" in console
    assert f"smpboot: Allowing {cpus} CPUs, 0 hotplug CPUs" in console


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_emulator_stop_is_reported_cleanly(boots, cpus):
    b = boots[cpus]
    assert b["rc"] == 1
    assert "Traceback" not in b["stderr"]
    assert "KVM internal error" in b["stderr"]
    assert re.search(r"RIP=[0-9a-f]{16}", b["stderr"]) and "code at RIP:" in b["stderr"]
    assert b["seconds"] < BOUND_S
