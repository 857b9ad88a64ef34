"""virtio-blk under the stock kit kernel's own driver, byte-exact both ways: guest kernel mode must run
natively (the `native` marker): directly on VT-x / AMD-V, inside the nested KVM elsewhere.

Several checks share one boot where each failure stays clear: every check prints its own line."""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import time

import pytest

from tests.support import stock

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.native]
MiB = 1 << 20


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image(path, size: int, head: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return str(path)


def read_at(path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


# The guest's part of the byte-exact check: the host's pattern read back; two regions written (direct
# and buffered, each from /dev/urandom), their sha256 printed; the queues its driver made.
EXACT = ("echo HOSTDATA=$(dd if=/dev/vda bs=1M count=16 2>/dev/null | sha256sum | cut -d' ' -f1); "
         "dd if=/dev/urandom of=/tmp/d bs=1M count=8 2>/dev/null; "
         "dd if=/tmp/d of=/dev/vda bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null && "
         "echo DIRECT=$(sha256sum /tmp/d | cut -d' ' -f1); "
         "dd if=/dev/urandom of=/tmp/b bs=1M count=8 2>/dev/null; "
         "dd if=/tmp/b of=/dev/vda bs=1M seek=48 2>/dev/null && sync && "
         "echo BUFFERED=$(sha256sum /tmp/b | cut -d' ' -f1); "
         "echo QUEUES=$(ls /sys/block/vda/mq | wc -l)")


# fio's own check of what it wrote (crc32c of every block, read back), past the regions above.
FIO = ("fio --name=verify --filename=/dev/vda --offset=64M --size=128M --rw=randwrite --bs=4k --direct=1 "
       "--ioengine=libaio --iodepth=32 --verify=crc32c --verify_fatal=1 --numjobs=1 --output-format=terse "
       ">/dev/null && echo FIO-OK")


# 1 and 2 vCPUs (one queue, then two); four vCPUs boot in test_stock_kernel_native.py.  A 4-vCPU guest
# here cost CI's nested KVM ~1-2 minutes more, and there it is the likeliest to die of the emulated SVM's
# triple faults (tests/support/relay.py), each costing a fresh L1.
@pytest.mark.parametrize("cpus,cache", [(1, "writeback"), (2, "none")])
def test_data_moves_byte_exact_both_ways_with_one_queue_per_vcpu(tmp_path, cpus, cache):
    host = pattern(16 * MiB, cpus)
    img = image(tmp_path / "d.img", 256 * MiB, host)
    run = stock.run_in_guest(f"{EXACT}; {FIO}", cpus=cpus, mem="512M", args=["--disk", f"{img},cache={cache}"],
                             timeout=540)  # fio takes minutes in the nested KVM
    assert (run.rc, run.status) == (0, 0), run.out[-2000:]
    assert "FIO-OK" in run.out, run.out[-2000:]
    assert f"HOSTDATA={sha(host)}" in run.out  # host -> guest
    direct = re.search(r"DIRECT=([0-9a-f]{64})", run.out).group(1)
    buffered = re.search(r"BUFFERED=([0-9a-f]{64})", run.out).group(1)
    assert sha(read_at(img, 32 * MiB, 8 * MiB)) == direct  # guest -> host, O_DIRECT
    assert sha(read_at(img, 48 * MiB, 8 * MiB)) == buffered  # guest -> host, page cache + sync
    assert f"QUEUES={cpus}" in run.out  # multiqueue: one per vCPU


@pytest.mark.skipif(shutil.which("e2fsck") is None or shutil.which("debugfs") is None, reason="needs e2fsprogs")
def test_three_disks_read_only_discard_and_mkfs_ext4(tmp_path):
    """One boot, three disks, each check on its own line: vda read-only with the size and serial we
    gave (the guest's writes refused,
    its data intact), vdb discarded (holes punched in the image), vdc made ext4 by the guest's
    mkfs.ext4 with files written and a clean poweroff (the host's e2fsck -fn finds it clean)."""
    ro_data = pattern(4 * MiB, 7)
    ro = image(tmp_path / "ro.img", 8 * MiB, ro_data)
    rw_data = pattern(64 * MiB, 8)
    rw = image(tmp_path / "rw.img", 64 * MiB, rw_data)  # fully allocated: discard frees it
    fs = image(tmp_path / "fs.img", 128 * MiB)
    allocated_before = os.stat(rw).st_blocks * 512
    guest = "; ".join([
        "echo SIZE=$(cat /sys/block/vda/size) SERIAL=$(cat /sys/block/vda/serial)",
        "echo RO=$(cat /sys/block/vda/ro) RW=$(cat /sys/block/vdb/ro)",
        "dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null && echo RO-WRITE-OK || echo RO-REFUSED",
        "echo RODATA=$(dd if=/dev/vda bs=1M count=4 2>/dev/null | sha256sum | cut -d' ' -f1)",
        "echo MAXDISCARD=$(cat /sys/block/vdb/queue/discard_max_bytes)",
        "blkdiscard -o 0 -l 33554432 /dev/vdb && sync && echo DISCARDED",
        "echo ZEROS=$(dd if=/dev/vdb bs=1M count=32 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c)",
        "mkfs.ext4 -q -F /dev/vdc && mkdir /m && mount -t ext4 /dev/vdc /m && echo MKFS-OK",
        "dd if=/dev/urandom of=/m/blob bs=1M count=20 2>/dev/null && mkdir /m/dir",
        "echo hello-from-the-guest > /m/dir/note && echo BLOB=$(sha256sum /m/blob | cut -d' ' -f1)",
        "umount /m && echo UMOUNTED",
    ])
    run = stock.run_in_guest(guest, cpus=2, args=["--disk", f"{ro},readonly=on,serial=pyvmm-serial-7",
                                                  "--disk", rw, "--disk", fs])
    assert (run.rc, run.status) == (0, 0), run.out[-2000:]
    assert f"SIZE={8 * MiB // 512} SERIAL=pyvmm-serial-7" in run.out  # the size and serial we gave
    # read-only
    assert "RO=1 RW=0" in run.out and "RO-REFUSED" in run.out
    assert f"RODATA={sha(ro_data)}" in run.out and read_at(ro, 0, 4 * MiB) == ro_data
    # discard
    assert int(re.search(r"MAXDISCARD=(\d+)", run.out).group(1)) > 0
    assert "DISCARDED" in run.out and "ZEROS=0" in run.out
    freed = allocated_before - os.stat(rw).st_blocks * 512
    assert freed >= 30 * MiB, f"discard freed {freed} bytes of the image"  # holes punched on the host
    assert read_at(rw, 0, 32 * MiB) == bytes(32 * MiB) and read_at(rw, 32 * MiB, 32 * MiB) == rw_data[32 * MiB:]
    # mkfs.ext4, files, clean unmount and poweroff
    assert "MKFS-OK" in run.out and "UMOUNTED" in run.out, run.out[-2000:]
    fsck = subprocess.run(["e2fsck", "-fn", fs], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    blob = subprocess.run(["debugfs", "-R", "cat /blob", fs], capture_output=True).stdout
    assert len(blob) == 20 * MiB and f"BLOB={sha(blob)}" in run.out
    note = subprocess.run(["debugfs", "-R", "cat /dir/note", fs], capture_output=True, text=True).stdout
    assert note == "hello-from-the-guest\n"


def test_what_sync_returned_for_survives_sigkill_of_pyvmm(tmp_path):
    """The guest writes, syncs and says so; pyvmm is killed at once: the image holds it all
    (FLUSH completes only after fdatasync)."""
    img = image(tmp_path / "k.img", 64 * MiB)
    guest = ("dd if=/dev/urandom of=/tmp/x bs=1M count=16 2>/dev/null; dd if=/tmp/x of=/dev/vda bs=1M 2>/dev/null; "
             "sync; echo SYNCED=$(sha256sum /tmp/x | cut -d' ' -f1); sleep 600")
    proc = subprocess.Popen(stock.pyvmm_argv(guest, args=["--disk", img]), cwd=stock.ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out, digest = b"", None
    deadline = time.monotonic() + stock.BOOT_TIMEOUT
    try:
        while digest is None and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
                found = re.search(rb"SYNCED=([0-9a-f]{64})", out)
                digest = found.group(1).decode() if found else None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert digest, out[-2000:].decode(errors="replace")
    assert sha(read_at(img, 0, 16 * MiB)) == digest
