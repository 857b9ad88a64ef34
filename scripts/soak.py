#!/usr/bin/env python3
"""A soak of pyvmm with the stock kit kernel in the nested KVM: does anything leak or go wrong over time?

    python3 scripts/soak.py [--cycles 100] [--minutes 10] [--json soak.json]

Not a test (it runs for most of an hour); it prints a table and writes JSON, and exits 1 when a check
fails.  It starts L1 (scripts/nested.py, where guest kernel mode runs natively) and runs itself there.

1. cycles: ONE pyvmm process (`--on-reboot restart`) boots the kit --cycles times with a disk and a NIC
   (a tap in a network namespace of its own).  Each boot bumps a counter kept in the disk's first
   sector, writes 4 MiB at 1 MiB with O_DIRECT and reads it back (sha256), pings the host side, and
   reboots (`reboot -f`: pyvmm makes a new VM) - or powers off after the last.  At every ready line the
   process's file descriptors, threads and resident memory besides guest RAM are sampled.
2. concurrent: two pyvmm processes at once, each with a disk and a NIC in a namespace of its own, loop
   fio --verify on the disk and iperf3 to the host side for --minutes; sampled every 15 s; then SIGTERM.

Checks: every cycle's disk and ping came back right; the counter reached --cycles (nothing lost across
reboots); after a warm-up (3 cycles; 30 s after a VM's first round of I/O) the descriptors and threads of each process
never change and its resident memory besides guest RAM grows by less than RSS_SLACK_KIB; pyvmm's stderr
has no line with "error" or "Traceback"; both concurrent VMs ran to SIGTERM and exited 0 on it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench_boot import ROOT, resident_split, run_in_l1

MEM, CPUS = "512M", 2
HOST_IP, GUEST_IP = "10.0.7.1", "10.0.7.2"
WARMUP_CYCLES, WARMUP_S = 3, 30  # boots / seconds after the first round of I/O, before sampling counts
RSS_SLACK_KIB = 4096  # allocator noise: Python's arenas, thread stacks touched once
SAMPLE_EVERY_S = 15
CYCLE_BOUND_S = 420  # one boot, its I/O and its reboot in a loaded L1 (~50 s usually); past it: stuck
ERROR_LINE = re.compile(r"error|traceback", re.IGNORECASE)


def pyvmm_argv(command: str, disk: str, tap: str, *extra: str) -> list[str]:
    append = "quiet pyvmm.cmd=" + base64.b64encode(command.encode()).decode()
    return [str(ROOT / ".venv" / "bin" / "python"), "-m", "vmm.cli", "run", "--cpus", str(CPUS), "--mem", MEM,
            "--disk", disk, "--net", f"tap={tap}", *extra, "--append", append]


@contextlib.contextmanager
def namespace_with_tap(servers: bool = False):
    """A network namespace of our own with tap0 (multi-queue: a queue pair per vCPU; the host side
    at HOST_IP), and optionally an iperf3 server there; deleted afterwards.  Nothing leaves it."""
    ns = f"pyvmm-soak-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = None
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr", "multi_queue"],
                    ["ip", "addr", "add", f"{HOST_IP}/24", "dev", "tap0"], ["ip", "link", "set", "tap0", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        if servers:
            server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-B", HOST_IP],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield ns
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def sample(pid: int) -> dict | None:
    """The process's open descriptors, threads and resident KiB besides guest RAM (None once gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        if re.search(r"^State:\s+Z", status, re.M):
            return None  # exited, not yet reaped
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    except (OSError, AttributeError):
        return None
    rss = resident_split(pid) or {}
    return {"t": round(time.monotonic(), 1), "fds": fds, "threads": threads, "rest_kib": rss.get("rest_kib")}


def where_stuck(pid: int, console: list[str], stderr_lines: list[str]) -> dict:
    """What a pyvmm that stopped making progress was doing: each thread's name, state and kernel
    stack (root), the console's and stderr's last lines."""
    threads = {}
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            name = (task / "comm").read_text().strip()
            state = re.search(r"^State:\s+(.*)$", (task / "status").read_text(), re.M).group(1)
            stack = (task / "stack").read_text().split("\n")[:6] if os.access(task / "stack", os.R_OK) else []
        except (OSError, AttributeError):
            continue
        threads[f"{task.name} {name}"] = {"state": state, "stack": [line.split(" ", 1)[-1] for line in stack if line]}
    return {"threads": threads, "console": [line.rstrip() for line in console[-15:]],
            "stderr": [line.rstrip() for line in stderr_lines[-10:]]}


def flat(samples: list[dict]) -> dict:
    """Whether descriptors and threads never changed and the rest of RSS grew by less than the slack."""
    rss = [s["rest_kib"] for s in samples if s.get("rest_kib") is not None]
    result = {"samples": len(samples), "fds": sorted({s["fds"] for s in samples}),
              "threads": sorted({s["threads"] for s in samples}),
              "rest_kib_first_last_max": [rss[0], rss[-1], max(rss)] if rss else None}
    result["ok"] = (len(samples) >= 2 and len(result["fds"]) == 1 and len(result["threads"]) == 1
                    and bool(rss) and max(rss) - rss[0] < RSS_SLACK_KIB)
    return result


def stream(proc: subprocess.Popen, on_line) -> threading.Thread:
    def pump():
        for line in proc.stdout:
            on_line(line.replace("\r", ""))

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


# -- 1: boot / reboot cycles in one process ------------------------------------------------------------------
def cycle_command(cycles: int) -> str:
    return "; ".join([
        "n=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\\000'); n=$(( ${n:-0} + 1 ))",
        "printf %s $n | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null",
        "dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null",
        "dd if=/tmp/x of=/dev/vda bs=1M seek=1 oflag=direct 2>/dev/null",
        "a=$(sha256sum < /tmp/x); b=$(dd if=/dev/vda bs=1M skip=1 count=4 iflag=direct 2>/dev/null | sha256sum)",
        '[ "$a" = "$b" ] && echo DISK-OK || echo DISK-BAD',
        f"ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0",
        f"ping -c 2 -W 5 {HOST_IP} >/dev/null && echo NET-OK || echo NET-BAD",
        "echo CYCLE=$n",
        f"[ $n -ge {cycles} ] || reboot -f",
    ])


def run_cycles(cycles: int, work: Path) -> dict:
    disk = work / "cycles.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    samples, seen, stderr_lines, console = [], [], [], []
    state = {"disk_ok": 0, "net_ok": 0, "last": None}
    start = time.monotonic()
    stuck = None
    with namespace_with_tap() as ns:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *pyvmm_argv(cycle_command(cycles), str(disk), "tap0",
                                                                        "--on-reboot", "restart")],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace")

        def on_line(line: str) -> None:
            console.append(line)
            del console[:-40]
            if "PYVMM-READY" in line:
                s = sample(proc.pid)
                if s:
                    samples.append(s)
            state["disk_ok"] += "DISK-OK" in line
            state["net_ok"] += "NET-OK" in line
            if m := re.search(r"CYCLE=(\d+)", line):
                seen.append(int(m.group(1)))
                print(f"  cycle {m.group(1)}: {time.monotonic() - start:.0f} s, {samples[-1] if samples else ''}",
                      flush=True)

        out = stream(proc, on_line)
        err = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
        err.start()
        status = None
        while status is None:
            try:
                status = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                last = samples[-1]["t"] if samples else start
                if time.monotonic() - max(last, start) > CYCLE_BOUND_S:
                    stuck = where_stuck(proc.pid, console, stderr_lines)
                    print(f"  stuck: no ready line for {CYCLE_BOUND_S} s:\n{json.dumps(stuck, indent=1)}", flush=True)
                    proc.send_signal(signal.SIGTERM)
                    try:
                        status = proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        status = f"killed: no exit 60 s after SIGTERM (then {proc.wait()})"
        out.join(10)
        err.join(10)
    errors = [line.rstrip() for line in stderr_lines if ERROR_LINE.search(line)]
    steady = flat(samples[WARMUP_CYCLES:])
    ok = (status == 0 and seen == list(range(1, cycles + 1)) and state["disk_ok"] == cycles
          and state["net_ok"] == cycles and steady["ok"] and not errors and stuck is None)
    return {"cycles": cycles, "exit_status": status, "counter": seen[-1] if seen else 0, "stuck": stuck,
            "disk_ok": state["disk_ok"], "net_ok": state["net_ok"], "seconds": round(time.monotonic() - start),
            "steady": steady, "first_samples": samples[:WARMUP_CYCLES], "error_lines": errors[:20],
            "stderr_tail": [x.rstrip() for x in stderr_lines[-10:]], "ok": ok}


# -- 2: two VMs doing I/O at once --------------------------------------------------------------------------
LOAD = "; ".join([
    f"ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0; sleep 1",
    "while true; do "
    "fio --name=s --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --direct=1 --ioengine=libaio "
    "--iodepth=16 --verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null && echo FIO-OK || echo FIO-BAD; "
    f"iperf3 -c {HOST_IP} -t 10 >/dev/null && echo IPERF-OK || echo IPERF-BAD; "
    "done",
])


def count_results(vm: dict, line: str) -> None:
    """Count the guest's result lines; the first one marks the VM as up (its devices all started)."""
    for key in ("FIO-OK", "FIO-BAD", "IPERF-OK", "IPERF-BAD"):
        if key in line:
            vm["counts"][key] = vm["counts"].get(key, 0) + 1
            vm["up_at"] = vm["up_at"] or time.monotonic()


def run_concurrent(minutes: float, work: Path) -> dict:
    results = []
    with contextlib.ExitStack() as stack:
        vms = []
        for i in range(2):
            ns = stack.enter_context(namespace_with_tap(servers=True))
            disk = work / f"load{i}.img"
            with open(disk, "wb") as f:
                f.truncate(128 << 20)
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *pyvmm_argv(LOAD, str(disk), "tap0")], cwd=ROOT,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, errors="replace")
            vm = {"proc": proc, "samples": [], "counts": {}, "stderr": [], "up_at": None}
            stream(proc, lambda line, vm=vm: count_results(vm, line))
            threading.Thread(target=lambda vm=vm: vm["stderr"].extend(vm["proc"].stderr), daemon=True).start()
            vms.append(vm)
        start = time.monotonic()
        while time.monotonic() - start < minutes * 60:
            time.sleep(SAMPLE_EVERY_S)
            for vm in vms:
                if (s := sample(vm["proc"].pid)) is not None:
                    vm["samples"].append(s)
            print(f"  {time.monotonic() - start:.0f} s: " + "; ".join(
                f"{vm['counts']} {vm['samples'][-1] if vm['samples'] else 'gone'}" for vm in vms), flush=True)
        for vm in vms:
            vm["proc"].send_signal(signal.SIGTERM)
        for vm in vms:
            try:
                status = vm["proc"].wait(timeout=60)
            except subprocess.TimeoutExpired:
                vm["proc"].kill()
                status = f"killed: no exit 60 s after SIGTERM (then {vm['proc'].wait()})"
            up = vm["up_at"] or float("inf")  # samples once the guest's first round of I/O is done
            warm = [s for s in vm["samples"] if s["t"] >= up + WARMUP_S]
            errors = [line.rstrip() for line in vm["stderr"] if ERROR_LINE.search(line)]
            steady = flat(warm)
            c = vm["counts"]
            ok = (status == 0 and steady["ok"] and not errors and c.get("FIO-OK", 0) > 0 and c.get("IPERF-OK", 0) > 0
                  and not c.get("FIO-BAD") and not c.get("IPERF-BAD"))
            results.append({"exit_status_on_sigterm": status, "counts": c, "steady": steady,
                            "error_lines": errors[:20], "stderr_tail": [x.rstrip() for x in vm["stderr"][-10:]],
                            "ok": ok})
    return {"minutes": minutes, "vms": results, "ok": all(r["ok"] for r in results)}


# -- the table and the two sides of L1 ---------------------------------------------------------------------
def table(results: dict) -> str:
    lines = []
    if c := results.get("cycles"):
        st = c["steady"]
        lines += [f"{'cycles':<12}{'boots':>6}{'disk ok':>9}{'ping ok':>9}{'fds':>14}{'threads':>12}"
                  f"{'rest RSS KiB first/last/max':>30}{'errors':>8}{'ok':>5}",
                  f"{'one process':<12}{c['counter']:>6}{c['disk_ok']:>9}{c['net_ok']:>9}{str(st['fds']):>14}"
                  f"{str(st['threads']):>12}{str(st['rest_kib_first_last_max']):>30}{len(c['error_lines']):>8}"
                  f"{'yes' if c['ok'] else 'NO':>5}"]
    if cc := results.get("concurrent"):
        lines += ["", f"{'concurrent':<12}{'fio ok':>7}{'iperf ok':>9}{'fds':>14}{'threads':>12}"
                      f"{'rest RSS KiB first/last/max':>30}{'exit':>6}{'errors':>8}{'ok':>5}"]
        for i, vm in enumerate(cc["vms"]):
            st = vm["steady"]
            lines.append(f"{'VM ' + str(i):<12}{vm['counts'].get('FIO-OK', 0):>7}{vm['counts'].get('IPERF-OK', 0):>9}"
                         f"{str(st['fds']):>14}{str(st['threads']):>12}{str(st['rest_kib_first_last_max']):>30}"
                         f"{str(vm['exit_status_on_sigterm']):>6}{len(vm['error_lines']):>8}{'yes' if vm['ok'] else 'NO':>5}")
    return "\n".join(lines)


def inside(args) -> int:
    results: dict = {"where": "nested KVM (L1: Debian 12 kernel under QEMU TCG)", "cpus": CPUS, "mem": MEM}
    with tempfile.TemporaryDirectory(prefix="soak-", dir="/tmp") as work:
        if args.cycles:
            print(f"soak: {args.cycles} boot/reboot cycles in one pyvmm process", flush=True)
            results["cycles"] = run_cycles(args.cycles, Path(work))
        if args.minutes:
            print(f"soak: two VMs doing disk and network I/O for {args.minutes} minutes", flush=True)
            results["concurrent"] = run_concurrent(args.minutes, Path(work))
    print(table(results))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(part.get("ok") for part in (results.get("cycles", {"ok": True}),
                                                   results.get("concurrent", {"ok": True}))) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="pyvmm soak in the nested KVM: reboot cycles, then two VMs under load")
    p.add_argument("--cycles", type=int, default=100, help="boot/reboot cycles in one process (0: skip)")
    p.add_argument("--minutes", type=float, default=10, help="minutes of two VMs doing I/O at once (0: skip)")
    p.add_argument("--json", default="soak.json")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in L1
    args = p.parse_args(argv)
    if args.cycles < 0 or args.minutes < 0 or (args.cycles == 0 and args.minutes == 0):
        print("soak: --cycles and --minutes are counts of at least 0, not both 0", file=sys.stderr)
        return 2
    if args.inside or os.environ.get("PYVMM_IN_NESTED") == "1":
        return inside(args)
    if not shutil.which("qemu-system-x86_64"):
        print("soak: qemu-system-x86_64 is needed (apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    status = run_in_l1(Path(__file__).resolve(), ["--cycles", str(args.cycles), "--minutes", str(args.minutes)],
                       args.json)
    if Path(args.json).exists():
        print(table(json.loads(Path(args.json).read_text())))
        print(f"soak: wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
