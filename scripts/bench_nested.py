#!/usr/bin/env python3
"""pyvmm and QEMU side by side in the nested KVM: the stock kit kernel with its own drivers.

    python3 scripts/bench_nested.py [--seconds 10] [--only disk,net] [--json bench-nested.json]

Run on any host: it starts L1 (scripts/nested.py: Debian 12's kernel under QEMU's TCG, whose /dev/kvm
runs guest kernel mode) and runs itself there with --inside, so both VMMs meet the same L1, the same
kernel and initramfs, the same `quiet` command line and 2 vCPUs (boot times: scripts/bench_boot.py,
whose way of booting each VMM this shares):
- disk: fio in the guest on /dev/vda (a raw image on L1's ext4 /tmp, the VMMs' default caching):
  sequential read and write 1 MiB qd16, random read and write 4 KiB qd32; against fio run by L1 itself
  on the same image (the host's own limit); QEMU with virtio-blk-pci.
- net: iperf3 from the guest to a server in a network namespace made for it, and back (-R), over a tap
  in that namespace; against iperf3 over loopback in L1; QEMU with virtio-net-pci and vhost off.
Prints a table and writes JSON.  Everything in L1, the guests' CPUs included, runs under TCG: compare
the columns with each other (ratios), never with figures from hardware.  Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench_boot import FAILED_BOOTS, VMMS, GuestFailed, boot, run_in_l1

MiB = 1 << 20
CPUS, MEM = 2, "1G"
HOST_IP, GUEST_IP, MAC = "10.0.9.1", "10.0.9.2", "52:54:00:00:09:02"
FIO_JOBS = [  # name, rw, block size, depth
    ("seq-read-1M-qd16", "read", "1M", 16),
    ("seq-write-1M-qd16", "write", "1M", 16),
    ("rand-read-4K-qd32", "randread", "4k", 32),
    ("rand-write-4K-qd32", "randwrite", "4k", 32),
]
# fio's terse format, version 3 (1-based fields): read KiB/s 7, read IOPS 8; write KiB/s 48, write IOPS 49
TERSE_READ, TERSE_WRITE = (6, 7), (47, 48)


def vmm_argv(name: str, command: str, **kw) -> list[str]:
    return VMMS[name](command, mem=MEM, mac=MAC, **kw)


# -- disk ------------------------------------------------------------------------------------------
def fio_line(target: str, rw: str, bs: str, depth: int, seconds: int) -> str:
    return (f"fio --name=b --filename={target} --rw={rw} --bs={bs} --iodepth={depth} --direct=1 "
            f"--ioengine=libaio --size=256M --runtime={seconds} --time_based --output-format=terse --terse-version=3")


def parse_terse(line: str, rw: str) -> tuple[float, float]:
    """(MiB/s, IOPS) of one job's terse line."""
    fields = line.strip().split(";")
    bw, iops = TERSE_WRITE if "write" in rw else TERSE_READ
    return int(fields[bw]) / 1024, float(fields[iops])


def guest_fio_script(seconds: int) -> str:
    return "; ".join(f"echo FIO-{name}=$({fio_line('/dev/vda', rw, bs, depth, seconds)})"
                     for name, rw, bs, depth in FIO_JOBS)


def bench_disk(seconds: int, workdir: Path) -> list[dict]:
    image = workdir / "bench.img"
    with open(image, "wb") as f:  # written, not sparse: reads see data on both sides
        for _ in range(384):
            f.write(os.urandom(MiB))
    rows = []
    results: dict[str, dict[str, tuple[float, float]]] = {"L1 itself": {}}
    for name, rw, bs, depth in FIO_JOBS:
        out = subprocess.run(fio_line(str(image), rw, bs, depth, seconds).split(), capture_output=True,
                             text=True, check=True).stdout
        results["L1 itself"][name] = parse_terse(out, rw)
    for vmm in ("pyvmm", "qemu-q35"):
        console = boot(vmm_argv(vmm, guest_fio_script(seconds), disk=str(image)))["console"]
        results[vmm] = {name: parse_terse(re.search(rf"FIO-{name}=(\S+)", console).group(1), rw)
                        for name, rw, _, _ in FIO_JOBS}
    for name, _, _, _ in FIO_JOBS:
        row = {"workload": name}
        for who, by_job in results.items():
            row[who] = {"MiB_s": round(by_job[name][0], 1), "iops": round(by_job[name][1])}
        rows.append(row)
    image.unlink()
    return rows


# -- net -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def namespace_with_tap(tap: str = "tap0"):
    """A network namespace of our own: the tap, the host side's address and the iperf3 server inside."""
    ns = f"pvb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = None
    try:
        def sh(*cmd):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", tap)
        sh("ip", "link", "set", tap, "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-B", HOST_IP],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        yield ns, tap
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def iperf_mbits(text: str) -> float:
    """The receiver's rate from iperf3's plain summary (-f m)."""
    m = re.search(r"([\d.]+) Mbits/sec.*receiver", text)
    if not m:
        raise GuestFailed(f"no iperf3 summary in:\n{text[-800:]}")
    return float(m.group(1))


def bench_net(seconds: int) -> list[dict]:
    guest = "; ".join([
        "ip link set eth0 up", f"ip addr add {GUEST_IP}/24 dev eth0", "sleep 1",
        f"echo UP=$(iperf3 -c {HOST_IP} -t {seconds} -f m | grep receiver)",
        f"echo DOWN=$(iperf3 -c {HOST_IP} -t {seconds} -f m -R | grep receiver)",
    ])
    results: dict[str, dict[str, float]] = {}
    with namespace_with_tap() as (ns, tap):
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-t", str(seconds), "-f", "m"], capture_output=True,
                             text=True) if _loopback_server() else None
        if out is not None:
            rate = iperf_mbits(out.stdout)
            results["L1 itself"] = {"guest-to-host": rate, "host-to-guest": rate}
        for vmm in ("pyvmm", "qemu-q35"):
            console = boot(["ip", "netns", "exec", ns, *vmm_argv(vmm, guest, tap=tap)])["console"]
            results[vmm] = {"guest-to-host": iperf_mbits(re.search(r"UP=(.*)", console).group(1)),
                            "host-to-guest": iperf_mbits(re.search(r"DOWN=(.*)", console).group(1))}
    return [{"direction": d, **{who: {"Mbit_s": round(r[d], 1)} for who, r in results.items()}}
            for d in ("guest-to-host", "host-to-guest")]


_loopback: list = []


def _loopback_server() -> bool:
    """An iperf3 server on L1's loopback, for its own limit (stopped at exit)."""
    if not _loopback:
        _loopback.append(subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        time.sleep(1)
    return _loopback[0].poll() is None


# -- the table ---------------------------------------------------------------------------------------
def table(results: dict) -> str:
    lines = []
    if "disk" in results:
        lines.append(f"{'disk':<20}{'L1 itself':>16}{'pyvmm':>16}{'qemu-q35':>16}{'pyvmm/qemu':>12}{'pyvmm/L1':>10}")
        for r in results["disk"]:
            cell = {w: f"{r[w]['MiB_s']:.1f}M {r[w]['iops']}/s" for w in ("L1 itself", "pyvmm", "qemu-q35")}
            lines.append(f"{r['workload']:<20}{cell['L1 itself']:>16}{cell['pyvmm']:>16}{cell['qemu-q35']:>16}"
                         f"{r['pyvmm']['iops'] / max(r['qemu-q35']['iops'], 1):>12.2f}"
                         f"{r['pyvmm']['iops'] / max(r['L1 itself']['iops'], 1):>10.2f}")
    if "net" in results:
        lines.append("")
        lines.append(f"{'net Mbit/s':<16}{'L1 loopback':>12}{'pyvmm':>10}{'qemu-q35':>10}{'pyvmm/qemu':>12}")
        for r in results["net"]:
            lo = r.get("L1 itself", {}).get("Mbit_s", float("nan"))
            lines.append(f"{r['direction']:<16}{lo:>12.1f}{r['pyvmm']['Mbit_s']:>10.1f}{r['qemu-q35']['Mbit_s']:>10.1f}"
                         f"{r['pyvmm']['Mbit_s'] / max(r['qemu-q35']['Mbit_s'], 0.001):>12.2f}")
    return "\n".join(lines)


def inside(args) -> int:
    results: dict = {"where": "nested KVM (L1: Debian 12 kernel under QEMU TCG)", "cpus": CPUS, "mem": MEM}
    only = set(args.only.split(","))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-nested-", dir="/tmp") as work:
            if "disk" in only:
                results["disk"] = bench_disk(args.seconds, Path(work))
            if "net" in only:
                results["net"] = bench_net(args.seconds)
    except GuestFailed as error:
        print(f"bench_nested: {error}", file=sys.stderr)
        return 1
    finally:
        for server in _loopback:
            server.kill()
    results["failed_boots"] = FAILED_BOOTS
    print(table(results))
    for name, failures in FAILED_BOOTS.items():
        print(f"{name}: {len(failures)} boot(s) failed and were tried again (in the JSON)")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="pyvmm vs QEMU, side by side in the nested KVM")
    p.add_argument("--seconds", type=int, default=10, help="each fio job's and iperf3 run's length")
    p.add_argument("--only", default="disk,net", help="which of disk,net to run")
    p.add_argument("--json", default="bench-nested.json")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in L1
    args = p.parse_args(argv)
    if not set(args.only.split(",")) <= {"disk", "net"} or args.seconds < 1:
        print("bench_nested: --only takes disk,net; --seconds at least 1", file=sys.stderr)
        return 2
    if args.inside or os.environ.get("PYVMM_IN_NESTED") == "1":
        return inside(args)
    if not shutil.which("qemu-system-x86_64"):
        print("bench_nested: qemu-system-x86_64 is needed (apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    args_in = ["--seconds", str(args.seconds), "--only", args.only]
    status = run_in_l1(Path(__file__).resolve(), args_in, args.json)
    if status == 0:
        print(f"bench_nested: wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
