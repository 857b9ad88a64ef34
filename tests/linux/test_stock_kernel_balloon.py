"""virtio-balloon under the stock kit kernel's own driver (virtio_balloon), in one boot: inflate by
256 MiB while the guest runs (the guest's MemTotal drops, and so does the host's resident guest
RAM: the blocks of the memfd, measured through /proc), deflate (the guest can allocate it again,
and it faults back in), free page reporting (256 MiB freed in the guest leaves the host within
seconds), statistics at the set interval.  With the default seccomp filter on.

The target is changed and the balloon read through `pyvmm run`'s management API (PUT and GET
/vm/balloon on its --api-socket); the guest's script and the test take turns through lines on the
console."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time

import pytest

from tests.support import stock
from tests.support.memfd import memfd_resident
from vmm.api import client

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.native]
MiB = 1 << 20
BALLOON = 256 * MiB

# The guest's side.  A tmpfs of its own (the root's would stop at half the RAM); `hold` fills the
# free memory but for f2 and a margin, so that the pages the balloon takes are ones the guest has
# used (resident on the host): they come free when f2 is emptied, once the balloon has started.
# Until then the guest starts no process (the shell's builtins only: `read` of /proc/meminfo, a
# timed `read` of a FIFO as its sleep): the balloon takes the free memory down to the watermark,
# where a fork can find the guest out of memory ("System is deadlocked on memory", seen once).
GUEST = r"""
kb() { awk -v k="$1:" '$1 == k {print $2}' /proc/meminfo; }
until_total() { n=0; while [ $(kb MemTotal) $1 $2 ] && [ $n -lt 400 ]; do sleep 0.5; n=$((n+1)); done; }
mkdir -p /b && mount -t tmpfs -o size=2G none /b
T0=$(kb MemTotal)
echo MEMTOTAL0=$T0 FEATURES=$(cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features)
HOLD=$(( $(kb MemFree) / 1024 - 64 - 288 ))
dd if=/dev/zero of=/b/hold bs=1M count=$HOLD 2>/dev/null
dd if=/dev/zero of=/b/f2 bs=1M count=288 2>/dev/null
mkfifo /b/tick
echo STEP-INFLATE HOLD=$HOLD MemFree=$(kb MemFree)
n=0
while read -r k v u < /proc/meminfo && [ "$v" -ge $((T0 - 64)) ] && [ $n -lt 600 ]; do read -t 1 x <> /b/tick; n=$((n+1)); done
: > /b/f2
echo F2-REMOVED
rm /b/f2 /b/tick
until_total -gt $((T0 - 262144 + 2048))
echo INFLATED MemTotal=$(kb MemTotal) MemFree=$(kb MemFree)
until_total -lt $((T0 - 2048))
echo DEFLATED MemTotal=$(kb MemTotal) MemFree=$(kb MemFree)
sleep 3
dd if=/dev/zero of=/b/f3 bs=1M count=256 2>/dev/null && echo ALLOC-OK MemFree=$(kb MemFree)
echo HOLDING
sleep 3
rm /b/f3
echo FREED MemFree=$(kb MemFree)
sleep 20
echo GUEST-DONE
"""


class ControlledVm:
    """`pyvmm run` of the kit with its API at `api_socket`: its console lines as they come."""

    def __init__(self, argv: list[str], api_socket: str):
        self.proc = subprocess.Popen([*argv, "--api-socket", api_socket], cwd=stock.ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                     bufsize=1)
        self.api_socket = api_socket
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read_console, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_console(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.replace("\r", "").rstrip("\n"))
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_line(self, marker: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hit = next((line for line in self.lines if line.startswith(marker)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._changed.wait(2.0):
                    self._changed.release()
                    try:
                        for reader in self._readers:
                            reader.join(timeout=10)  # (all the output of a process that ended)
                    finally:
                        self._changed.acquire()
                    raise AssertionError(f"no {marker!r} on the console (exit status {self.proc.poll()}); it ended:\n"
                                         + "\n".join(self.lines[-40:]) + "\nstderr:\n" + "".join(self.stderr[-20:]))
                self._changed.wait(min(left, 1.0))

    def set_target(self, size: int) -> dict:
        return client.call(self.api_socket, "PUT", "/vm/balloon", {"target": size}, timeout=30)

    def balloon_info(self) -> dict:
        return client.call(self.api_socket, "GET", "/vm/balloon", timeout=30)

    def resident(self) -> int:
        return memfd_resident(self.proc.pid)

    def wait_actual(self, size: int, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.balloon_info()
            if info["actual"] == size or time.monotonic() > deadline:
                return info
            time.sleep(0.25)


def field(line: str, name: str) -> int:
    return int(line.split(f"{name}=")[1].split()[0])


def test_balloon_inflate_deflate_free_page_reporting_and_statistics(tmp_path):
    argv = stock.pyvmm_argv(GUEST, cpus=2, mem="768M", args=["--balloon", "stats=1,free-page-reporting=on"])
    vm = ControlledVm(argv, str(tmp_path / "api.sock"))
    notes = []
    try:
        start = vm.wait_line("MEMTOTAL0=")
        t0 = field(start, "MEMTOTAL0")
        features = start.split("FEATURES=")[1]
        assert features[1] == "1" and features[5] == "1", features  # STATS_VQ and PAGE_REPORTING taken

        # inflate by 256 MiB
        vm.wait_line("STEP-INFLATE")
        before = vm.resident()
        vm.set_target(BALLOON)
        info = vm.wait_actual(BALLOON)
        after = vm.resident()
        assert info["actual"] == BALLOON and info["inflated"] >= BALLOON, info
        inflated = vm.wait_line("INFLATED")
        notes.append(f"inflate: host resident {before / MiB:.0f} -> {after / MiB:.0f} MiB, {inflated}, "
                     f"reported so far {info['reported'] / MiB:.0f} MiB")
        assert t0 - field(inflated, "MemTotal") >= BALLOON // 1024 - 2048  # the guest's RAM shrank
        assert 0.85 * BALLOON <= before - after <= BALLOON + 128 * MiB, notes

        # deflate: the guest gets it back and can use it
        vm.set_target(0)
        info = vm.wait_actual(0)
        assert info["actual"] == 0, info
        vm.wait_line("DEFLATED")
        deflated = vm.resident()
        alloc = vm.wait_line("ALLOC-OK")
        vm.wait_line("HOLDING")
        time.sleep(1)
        holding = vm.resident()
        notes.append(f"deflate: {alloc}, host resident {deflated / MiB:.0f} -> {holding / MiB:.0f} MiB "
                     f"with 256 MiB more in use")
        assert holding - deflated >= 192 * MiB, notes  # what the guest took back faulted in

        # free page reporting: 256 MiB freed in the guest leave the host within seconds
        vm.wait_line("FREED")
        freed_at = time.monotonic()
        now = holding
        while holding - now < 192 * MiB and time.monotonic() - freed_at < 20:
            time.sleep(0.25)
            now = vm.resident()
        took = time.monotonic() - freed_at
        notes.append(f"free page reporting: host resident {holding / MiB:.0f} -> {now / MiB:.0f} MiB in {took:.1f} s")
        assert holding - now >= 192 * MiB, notes

        # statistics at the set interval (1 s)
        vm.wait_line("GUEST-DONE")
        stats = vm.balloon_info()["stats"]
        gaps = [b - a for a, b in zip(stats["updates"], stats["updates"][1:])]
        notes.append(f"statistics: {len(stats['updates'])} updates, median gap {statistics.median(gaps):.2f} s, "
                     f"total-memory {stats.get('total-memory')}")
        assert len(gaps) >= 10 and 0.8 <= statistics.median(gaps) <= 1.6, notes
        assert stats["total-memory"] > 0 and "free-memory" in stats, stats
        assert vm.proc.wait(timeout=120) == 0
        assert any("PYVMM-EXIT=0" in line for line in vm.lines), vm.lines[-20:]
    except AssertionError:
        print("the console ended:", *vm.lines[-40:], "stderr:", *vm.stderr[-20:], sep="\n")
        raise
    finally:
        if vm.proc.poll() is None:
            vm.proc.kill()
            vm.proc.wait()
        print("\n".join(notes))
