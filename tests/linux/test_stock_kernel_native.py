"""The stock kit kernel, booted fully: guest kernel mode must run natively (the `native` marker):
directly on hosts with VT-x / AMD-V, inside the nested KVM elsewhere (tests/support/relay.py)."""

import os
import pty
import re
import select
import signal
import sys
import time

import pytest

from tests.support import stock

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.native]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_TIMEOUT = stock.BOOT_TIMEOUT


def run_in_guest(command: str, *, timeout: int = BOOT_TIMEOUT, **kw):
    run = stock.run_in_guest(command, timeout=timeout, **kw)
    return run.rc, run.status, run.out


# What Debian's 6.1 kernel prints when it takes each of KVM's paravirtual hooks (arch/x86/kernel/kvm.c,
# kvmclock.c), given the CPUID leaf 0x40000001 features pyvmm passes on from KVM; some only with >1 CPU.
PV_LINES = {
    "kvm-clock": "kvm-clock: Using msrs",
    "PV TLB flush": "KVM setup pv remote TLB flush",
    "PV spinlocks": "PV spinlocks enabled",
    "PV IPIs": "setup PV IPIs",
    "PV sched yield": "setup PV sched yield",
}
SMP_ONLY = ("PV TLB flush", "PV spinlocks", "PV IPIs", "PV sched yield")


@pytest.mark.parametrize("cpus,mem,mem_kib_min", [(1, "256M", 200_000), (2, "1G", 900_000),
                                                  (4, "4G", 3_800_000)])
def test_cpus_memory_clock_and_kvms_paravirtual_hooks(cpus, mem, mem_kib_min):
    rc, status, out = run_in_guest(
        "echo NPROC=$(nproc); grep MemTotal /proc/meminfo; "
        "echo CLOCK=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); dmesg",
        cpus=cpus, mem=mem)
    assert rc == 0 and status == 0  # the /init powers off after the command: pyvmm exits 0
    assert f"NPROC={cpus}" in out
    mem_kib = int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))
    assert mem_kib_min <= mem_kib <= {"256M": 262144, "1G": 1 << 20, "4G": 4 << 20}[mem]
    assert "CLOCK=kvm-clock" in out and "Hypervisor detected: KVM" in out
    wanted = {name: line for name, line in PV_LINES.items() if cpus > 1 or name not in SMP_ONLY}
    missing = [name for name, line in wanted.items() if line not in out]
    assert not missing, f"the guest did not take {missing} from KVM:\n{out[-4000:]}"


def test_interactive_shell_on_a_pty():
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "vmm.cli", "run", "--mem", "512M"])
    buf = b""

    def read_until(token: bytes, timeout: float) -> bytes:
        nonlocal buf
        deadline = time.monotonic() + timeout
        while token not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{token!r} not seen; last output: {buf[-2000:]!r}")
            if select.select([fd], [], [], left)[0]:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    break
        return buf

    try:
        read_until(b"PYVMM-READY", BOOT_TIMEOUT)
        time.sleep(1)
        os.write(fd, b"echo hel''lo\r")  # the quotes keep the echo of our own typing from matching
        read_until(b"hello", 30)
        os.write(fd, b"poweroff -f\r")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(st) == 0
                return
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    os.read(fd, 4096)
                except OSError:
                    pass
        pytest.fail("pyvmm did not exit after poweroff -f")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


# -- virtio-blk with the guest's own drivers (more in test_stock_kernel_disk.py) ----------------
def test_boots_with_root_on_virtio_blk(tmp_path):
    from tests.support.rootfs import build_rootfs_image
    from vmm import kit

    root = build_rootfs_image(kit.kit_initrd(), tmp_path / "root.img")
    rc, status, out = run_in_guest("mount | grep ' / '", args=["--disk", str(root)], append="pyvmm.root=/dev/vda")
    assert (rc, status) == (0, 0)
    assert "/dev/vda on / type ext4" in out
