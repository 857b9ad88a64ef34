"""The stock kit kernel, booted fully: guest kernel mode must run natively (the `native` marker):
directly on hosts with VT-x / AMD-V, inside the nested KVM elsewhere (tests/support/relay.py)."""

import base64
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.native]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_TIMEOUT = 120


def run_in_guest(command: str, *, cpus: int = 1, mem: str = "512M", timeout: int = BOOT_TIMEOUT, args=(),
                 append: str = ""):
    cmd64 = base64.b64encode(command.encode()).decode()
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--cpus", str(cpus), "--mem", mem, *args,
                        "--append", f"{append} pyvmm.cmd={cmd64}".strip()], cwd=ROOT, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    out = r.stdout.replace("\r", "")
    assert "PYVMM-READY" in out, out[-3000:] + r.stderr
    m = re.search(r"PYVMM-EXIT=(\d+)", out)
    assert m, out[-3000:] + r.stderr
    between = out.split("PYVMM-READY", 1)[1].split("PYVMM-EXIT=", 1)[0]
    return r.returncode, int(m.group(1)), between


@pytest.mark.parametrize("cpus,mem,mem_kib_min", [(1, "256M", 200_000), (2, "1G", 900_000), (4, "4G", 3_800_000)])
def test_cpus_memory_and_clock(cpus, mem, mem_kib_min):
    rc, status, out = run_in_guest(
        "echo NPROC=$(nproc); grep MemTotal /proc/meminfo; "
        "echo CLOCK=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)", cpus=cpus, mem=mem)
    assert rc == 0 and status == 0  # the /init powers off after the command: pyvmm exits 0
    assert f"NPROC={cpus}" in out
    mem_kib = int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))
    assert mem_kib_min <= mem_kib <= {"256M": 262144, "1G": 1 << 20, "4G": 4 << 20}[mem]
    assert "CLOCK=kvm-clock" in out


def test_poweroff_exit_status_is_zero():
    rc, status, _ = run_in_guest("true")
    assert (rc, status) == (0, 0)


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


# -- virtio-blk with the guest's own drivers -----------------------------------------------------
def test_vda_has_the_size_and_serial_we_gave(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    os.truncate(img, 96 << 20)
    rc, status, out = run_in_guest("echo SIZE=$(cat /sys/block/vda/size); echo SERIAL=$(cat /sys/block/vda/serial)",
                                   args=["--disk", f"{img},serial=pyvmm-serial-7"])
    assert (rc, status) == (0, 0)
    assert f"SIZE={(96 << 20) // 512}" in out
    assert "SERIAL=pyvmm-serial-7" in out


@pytest.mark.parametrize("cpus,cache", [(1, "writeback"), (2, "none")])
def test_fio_verify_on_vda(tmp_path, cpus, cache):
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    rc, status, out = run_in_guest(
        "fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=128M --direct=1 --ioengine=libaio "
        "--iodepth=32 --verify=crc32c --verify_fatal=1 --numjobs=1 --output-format=terse >/dev/null && echo FIO-OK",
        cpus=cpus, args=["--disk", f"{img},cache={cache}"], timeout=300)
    assert (rc, status) == (0, 0), out[-2000:]
    assert "FIO-OK" in out


def test_boots_with_root_on_virtio_blk(tmp_path):
    from tests.support.rootfs import build_rootfs_image
    from vmm import kit

    root = build_rootfs_image(kit.kit_initrd(), tmp_path / "root.img")
    rc, status, out = run_in_guest("mount | grep ' / '", args=["--disk", str(root)], append="pyvmm.root=/dev/vda")
    assert (rc, status) == (0, 0)
    assert "/dev/vda on / type ext4" in out
