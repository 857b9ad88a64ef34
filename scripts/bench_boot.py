#!/usr/bin/env python3
"""How fast pyvmm gets a guest going, beside QEMU with the same kernel, initramfs and command line.

    python3 scripts/bench_boot.py [--runs 5] [--boots 3] [--only start,boot] [--json bench-boot.json]

- start (on this host): process start (its exec) to the first guest entry of a vCPU thread, the
  first guest instruction, for pyvmm, QEMU `-M microvm` and QEMU `-M q35`, from KVM's kvm_entry and
  the scheduler's exec tracepoints (tracefs, as root: nothing stops the VMM), else by strace.
  Warm: page cache, pyvmm's caches (decompressed kernel, KVM-mode verdict)
  and byte code in place, after one run not counted.  Cold: once, after dropping the page cache (root)
  with pyvmm's caches and byte code empty.  pyvmm's own figure (`--stats`, no tracer) beside it.
- boot (in the nested KVM of ../shared/README.md, both VMMs in the same L1): from start to the
  console's first line, to the kit's PYVMM-READY line, and to the VMM's exit after `poweroff -f`; the
  VMM's resident memory at the ready line, split into guest RAM (the mapping that holds it) and the
  rest; pyvmm's exit profile (`--stats`) of a boot.  One boot of each VMM first, not counted (page
  cache, byte code, caches).
Medians and spread (min-max), ratios to QEMU microvm.  Prints a table and writes JSON.  Not a test:
nothing asserts.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPUS, MEM = 2, "512M"
VMM_NAMES = ("pyvmm", "qemu-microvm", "qemu-q35")
# QEMU -cpu host: this host's KVM refuses MSR 0x10a (IA32_ARCH_CAPABILITIES) (../shared/README.md)
QEMU_CPU = "host,-arch-capabilities"


def kit() -> tuple[str, str]:
    from vmm import kit as k

    return str(k.kit_kernel()), str(k.kit_initrd())


def append_for(command: str) -> str:
    """The kit's /init runs the base64 command of pyvmm.cmd= after its ready line (scripts/guestkit.py)."""
    return "quiet pyvmm.cmd=" + base64.b64encode(command.encode()).decode()


def pyvmm_argv(command: str, disk: str | None = None, tap: str | None = None, mac: str | None = None,
               stats: str | None = None, mem: str = MEM) -> list[str]:
    argv = [sys.executable, "-m", "vmm.cli", "run", "--cpus", str(CPUS), "--mem", mem]
    if disk:
        argv += ["--disk", disk]
    if tap:
        argv += ["--net", f"tap={tap}" + (f",mac={mac}" if mac else "")]
    if stats:
        argv += [f"--stats={stats}"]
    return argv + ["--append", append_for(command)]


def qemu_argv(command: str, machine: str = "q35", disk: str | None = None, tap: str | None = None,
              mac: str | None = None, cpu: str = "host", mem: str = MEM) -> list[str]:
    kernel, initrd = kit()
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", cpu, "-smp", str(CPUS), "-m", mem,
            "-M", machine, "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 " + append_for(command),
            "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio"]
    if disk:
        argv += ["-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0"]
    if tap:
        argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                 "-device", "virtio-net-pci,netdev=n0" + (f",mac={mac}" if mac else "")]
    return argv


VMMS = {
    "pyvmm": pyvmm_argv,
    "qemu-microvm": lambda command, **kw: qemu_argv(command, "microvm,acpi=on", **kw),
    "qemu-q35": qemu_argv,
}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# -- start: process start to the first guest instruction, on this host ---------------------------------
TRACEFS = Path("/sys/kernel/tracing")
# A vCPU's KVM_RUN loads the guest's FPU state (kvm_fpu), then enters the guest (kvm_entry, which a
# software KVM such as this host's kvm_pvm does not fire): the first of them marks the first instruction.
GUEST_ENTRY_EVENTS = ("kvm_entry", "kvm_fpu")


def first_kvm_run(argv: list[str], env: dict, timeout: float = 30) -> tuple[float, str]:
    """(seconds from the process's exec to the first guest entry of a vCPU thread, the method).  The
    VMM is killed then.  By KVM's own tracepoints where tracefs can be had (root): no tracer stops
    the process; else by strace (which stops it at each ioctl and each new thread: slower, and more
    so for a VMM with more of them).  A vCPU thread: another than the first (pyvmm's KVM-mode probe
    runs guest code on the main thread)."""
    if _tracefs_usable():
        return _first_entry_ftrace(argv, env, timeout), "ftrace kvm_entry/kvm_fpu"
    return _first_entry_strace(argv, env, timeout), "strace KVM_RUN"


def _tracefs_usable() -> bool:
    if not (TRACEFS / "instances").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
    return os.access(TRACEFS / "instances", os.W_OK) and (TRACEFS / "events" / "kvm" / "kvm_entry").is_dir()


def _first_entry_ftrace(argv: list[str], env: dict, timeout: float) -> float:
    instance = TRACEFS / "instances" / f"pyvmm-bench-{os.getpid()}"
    instance.mkdir()
    try:
        for event in ("sched/sched_process_exec", "kvm/kvm_entry", "kvm/kvm_fpu"):
            (instance / "events" / event / "enable").write_text("1")
        (instance / "tracing_on").write_text("1")
        return _watch(argv, env, timeout, lambda proc: _ftrace_first(instance / "trace", proc.pid))
    finally:
        (instance / "tracing_on").write_text("0")
        instance.rmdir()


def _ftrace_first(trace: Path, pid: int) -> float | None:
    """From the trace: the exec of `pid`, then its first guest entry from a thread other than `pid`."""
    start = None
    for line in trace.read_text(errors="replace").splitlines():
        if line.startswith("#") or ": " not in line:
            continue
        head, event = line.split(": ", 1)[0], line.split(": ", 2)[1] if line.count(": ") >= 2 else ""
        task, stamp = head.split()[0], float(head.split()[-1])
        tid = int(task.rsplit("-", 1)[1])
        if start is None and event == "sched_process_exec" and f" pid={pid} " in line + " ":
            start = stamp
        elif start is not None and event in GUEST_ENTRY_EVENTS and tid != pid:
            return stamp - start
    return None


def _first_entry_strace(argv: list[str], env: dict, timeout: float) -> float:
    with tempfile.NamedTemporaryFile(prefix="bench-boot-", suffix=".trace") as trace:
        command = ["strace", "-f", "-ttt", "--seccomp-bpf", "-e", "trace=execve,ioctl", "-o", trace.name, *argv]
        return _watch(command, env, timeout, lambda proc: _strace_first(Path(trace.name).read_text(errors="replace")))


def _strace_first(trace: str) -> float | None:
    lines = trace.splitlines()
    if not lines:
        return None
    main_pid, start = lines[0].split()[0], float(lines[0].split()[1])
    for line in lines:
        words = line.split()
        if len(words) > 2 and words[0] != main_pid and "KVM_RUN" in line:
            return float(words[1]) - start
    return None


def _watch(argv: list[str], env: dict, timeout: float, found) -> float:
    """Start argv; poll found(proc) until it gives a figure; kill the process group."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            seconds = found(proc)
            if seconds is not None:
                return seconds
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited ({proc.returncode}) before its first guest entry")
            time.sleep(0.02)
        raise RuntimeError(f"{argv[0]}: no guest entry within {timeout:.0f} s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pyvmm_self_report(env: dict) -> float | None:
    """pyvmm's own figure, with no tracer: from just before it is started to the wall time of its
    first KVM_RUN (--stats=PATH's JSON; the guest stopped at once by SIGTERM)."""
    with tempfile.TemporaryDirectory(prefix="bench-boot-stats-") as tmp:
        stats = Path(tmp) / "stats.json"
        launched = time.time()
        proc = subprocess.Popen(pyvmm_argv("true", stats=str(stats)) + ["--console", "none"], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if not stats.exists():
            return None
        boots = json.loads(stats.read_text()).get("boots") or [{}]
        first = [v["first_kvm_run_wall"] for v in boots[0].get("vcpus", []) if v.get("first_kvm_run_wall")]
        return min(first) - launched if first else None


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_start(runs: int) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-boot-cache-") as warm_dir:
        warm_env = {**os.environ, "XDG_CACHE_HOME": warm_dir, "PYTHONPYCACHEPREFIX": f"{warm_dir}/pycache",
                    "PYVMM_KIT_DIR": str(Path(kit()[0]).parent)}
        warm_env.pop("PYTHONDONTWRITEBYTECODE", None)
        for name in VMM_NAMES:
            argv = _start_argv(name)
            first_kvm_run(argv, warm_env)  # fills the caches: not counted
            warm, method = [], ""
            for _ in range(runs):
                seconds, method = first_kvm_run(argv, warm_env)
                warm.append(seconds * 1000)
            with tempfile.TemporaryDirectory(prefix="bench-boot-cold-") as cold_dir:
                cold_env = {**warm_env, "XDG_CACHE_HOME": cold_dir, "PYTHONPYCACHEPREFIX": f"{cold_dir}/pycache"}
                dropped = drop_page_cache()
                cold = first_kvm_run(argv, cold_env)[0] * 1000
            results[name] = {"warm_ms": spread(warm), "cold_ms": cold, "page_cache_dropped": dropped,
                             "method": method}
            print(f"  start {name}: warm median {statistics.median(warm):.0f} ms "
                  f"({min(warm):.0f}-{max(warm):.0f}), cold {cold:.0f} ms ({method})", flush=True)
        own = [pyvmm_self_report(warm_env) for _ in range(runs)]
        own = [v * 1000 for v in own if v is not None]
        if own:
            results["pyvmm"]["self_reported_ms"] = spread(own)
    return results


def _start_argv(name: str) -> list[str]:
    if name == "pyvmm":
        return pyvmm_argv("true") + ["--console", "none"]
    machine = "microvm,acpi=on" if name == "qemu-microvm" else "q35"
    return qemu_argv("true", machine, cpu=QEMU_CPU)


# -- boot: the stock kernel to its ready line and to poweroff, in the nested KVM ------------------------
class GuestFailed(RuntimeError):
    pass


BOOT_TRIES = 3  # a boot that dies (L1's emulated SVM now and then kills an SMP guest) is tried again
FAILED_BOOTS: dict[str, list[str]] = {}  # VMM -> the end of each failed try's console


def boot(argv: list[str], timeout: float = 600, env: dict | None = None) -> dict:
    """Run a VMM to its exit, at most BOOT_TRIES times; of the first try that ran the guest's command:
    first_line_s (the console's first line: the kernel's, `quiet` keeps it late), ready_s, exit_s (all
    from start), console, and rss (at the ready line: guest RAM and the rest, KiB).
    Each failed try is kept in FAILED_BOOTS."""
    for attempt in range(BOOT_TRIES):
        try:
            return _boot_once(argv, timeout, env)
        except GuestFailed as error:
            name = "pyvmm" if "vmm.cli" in argv else "qemu"
            FAILED_BOOTS.setdefault(name, []).append(str(error)[-600:])
            print(f"  a {name} boot failed (try {attempt + 1} of {BOOT_TRIES}): {str(error).splitlines()[-1]}",
                  flush=True)
            if attempt == BOOT_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def _boot_once(argv: list[str], timeout: float, env: dict | None) -> dict:
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    first, first_text, ready, rss, lines = None, None, None, None, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if first is None and line.strip():
                first, first_text = time.monotonic() - start, line.strip()[:200]
            if ready is None and "PYVMM-READY" in line:
                ready = time.monotonic() - start
                rss = resident_split(proc.pid)
            if time.monotonic() - start > timeout:
                raise GuestFailed(f"{argv[0]} ran past {timeout:.0f} s")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console = "".join(lines).replace("\r", "")
    if "PYVMM-EXIT=0" not in console:
        raise GuestFailed(f"{argv[0]}: the guest did not finish its command:\n{console[-1500:]}")
    return {"first_line_s": first, "first_line": first_text, "ready_s": ready, "exit_s": time.monotonic() - start, "console": console,
            "rss": rss}


def resident_split(pid: int) -> dict | None:
    """Resident KiB of a process: in its largest mapping (guest RAM: pyvmm's memfd, QEMU's anonymous
    RAM block) and in all the others."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    maps, size, rss = [], 0, 0
    for line in text.splitlines():
        word = line.split()[0] if line.split() else ""
        if word == "Size:":
            size = int(line.split()[1])
        elif word == "Rss:":
            rss = int(line.split()[1])
            maps.append((size, rss))
    if not maps:
        return None
    largest = max(maps)
    return {"guest_ram_kib": largest[1], "rest_kib": sum(r for _, r in maps) - largest[1]}


def shmem_thp() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        return "unknown"
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), text.strip())


def bench_boot(boots: int, stats_path: Path) -> dict:
    env = dict(os.environ)
    results: dict = {"l1_shmem_thp": shmem_thp()}
    for name in VMM_NAMES:
        argv_for = VMMS[name]
        boot(argv_for("true"), env=env)  # page cache, byte code, pyvmm's caches: not counted
        runs = [boot(argv_for("true"), env=env) for _ in range(boots)]
        results[name] = {
            "first_line_s": spread([r["first_line_s"] for r in runs]),
            "first_line": runs[-1]["first_line"],  # (QEMU's own warnings count: see what it was)
            "ready_s": spread([r["ready_s"] for r in runs]),
            "exit_s": spread([r["exit_s"] for r in runs]),
            "rss_at_ready_kib": [r["rss"] for r in runs],
        }
        print(f"  boot {name}: ready {results[name]['ready_s']['median']:.1f} s, "
              f"exit {results[name]['exit_s']['median']:.1f} s, rss {runs[-1]['rss']}", flush=True)
    boot(pyvmm_argv("true", stats=str(stats_path)), env=env)
    if stats_path.exists():
        results["pyvmm_exit_profile"] = json.loads(stats_path.read_text())
    return results


# -- the table ---------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    lines = []
    start = results.get("start")
    if start:
        base = start["qemu-microvm"]["warm_ms"]["median"]
        lines.append(f"start (this host): process start -> first guest instruction (a vCPU's first entry; "
                     f"{start['pyvmm'].get('method', 'strace KVM_RUN')})")
        lines.append(f"{'':<16}{'warm ms':>10}{'min-max':>14}{'cold ms':>10}{'vs microvm':>12}")
        for name in VMM_NAMES:
            r = start[name]
            w = r["warm_ms"]
            lines.append(f"{name:<16}{w['median']:>10.0f}{w['min']:>7.0f}-{w['max']:<6.0f}{r['cold_ms']:>10.0f}"
                         f"{w['median'] / base:>12.2f}")
        own = start["pyvmm"].get("self_reported_ms")
        if own:
            lines.append(f"pyvmm by itself (--stats, no tracer): median {own['median']:.0f} ms "
                         f"({own['min']:.0f}-{own['max']:.0f})")
    booted = results.get("boot")
    if booted:
        base = booted["qemu-microvm"]["exit_s"]["median"]
        lines.append("")
        lines.append(f"boot (nested KVM, L1 shmem THP: {booted['l1_shmem_thp']}): the kit kernel, "
                     f"{CPUS} vCPUs, {MEM}")
        lines.append(f"{'':<16}{'1st line s':>11}{'ready s':>9}{'exit s':>9}{'exit vs microvm':>17}"
                     f"{'RSS guest RAM':>15}{'RSS rest':>10}")
        for name in VMM_NAMES:
            r = booted[name]
            rss = r["rss_at_ready_kib"][-1] or {}
            first = r.get("first_line_s", {}).get("median") or float("nan")
            lines.append(f"{name:<16}{first:>11.1f}{r['ready_s']['median']:>9.1f}{r['exit_s']['median']:>9.1f}"
                         f"{r['exit_s']['median'] / base:>17.2f}"
                         f"{rss.get('guest_ram_kib', 0) / 1024:>13.1f}M{rss.get('rest_kib', 0) / 1024:>9.1f}M")
    return "\n".join(lines)


# -- running it all --------------------------------------------------------------------------------------
def run_in_l1(script: Path, args: list[str], json_out: str, env: dict | None = None) -> int:
    """Run `script --inside args` in the nested KVM (scripts/nested.py) with pyvmm's virtual environment;
    its JSON (written to the share) is copied to json_out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pyvmm_nested", ROOT / "scripts" / "nested.py")
    nested = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = nested
    spec.loader.exec_module(nested)
    with tempfile.TemporaryDirectory(prefix="bench-l1-share-") as share:
        out = Path(share) / "results.json"
        venv = ROOT / ".venv" / "bin" / "python"  # pyvmm's dependencies (scripts/setup.sh)
        python = str(venv) if venv.exists() else sys.executable
        command = [python, str(script), "--inside", *args, "--json", str(out)]
        opts = nested.Options(cwd=str(ROOT), env=env or {"PYTHONDONTWRITEBYTECODE": "1"}, stall_timeout=300)
        status = nested.run(command, opts, share=Path(share))
        if out.exists():
            shutil.copy(out, json_out)
    return status


def inside(args) -> int:
    """In L1: the boot part, its JSON to --json."""
    if args.shmem_thp:
        Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").write_text(args.shmem_thp + "\n")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-boot-", dir="/tmp") as work:
            results = bench_boot(args.boots, Path(work) / "stats.json")
    except GuestFailed as error:
        print(f"bench_boot: {error}", file=sys.stderr)
        return 1
    results["failed_boots"] = FAILED_BOOTS
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="pyvmm vs QEMU: start-up on this host, boot in the nested KVM")
    p.add_argument("--runs", type=int, default=5, help="start-up runs per VMM (warm; the median is shown)")
    p.add_argument("--boots", type=int, default=3, help="boots per VMM in the nested KVM")
    p.add_argument("--only", default="start,boot", help="which of start,boot to run")
    p.add_argument("--shmem-thp", choices=("never", "advise"), default=None,
                   help="set L1's /sys/kernel/mm/transparent_hugepage/shmem_enabled first (default: leave it)")
    p.add_argument("--json", default="bench-boot.json")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in L1
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"start", "boot"} or args.runs < 1 or args.boots < 1:
        print("bench_boot: --only takes start,boot; --runs and --boots at least 1", file=sys.stderr)
        return 2
    if args.inside:
        return inside(args)
    for tool in ("qemu-system-x86_64", "strace"):
        if not shutil.which(tool):
            print(f"bench_boot: {tool} is needed (apt-get install qemu-system-x86 strace)", file=sys.stderr)
            return 2
    results: dict = {"cpus": CPUS, "mem": MEM, "kernel": kit()[0], "initrd": kit()[1]}
    if "start" in only:
        results["start"] = bench_start(args.runs)
    if "boot" in only:
        with tempfile.NamedTemporaryFile(prefix="bench-boot-l1-", suffix=".json") as l1_json:
            l1_args = ["--boots", str(args.boots)] + (["--shmem-thp", args.shmem_thp] if args.shmem_thp else [])
            # In L1: pyvmm's caches and byte code on L1's scratch /tmp (the host's / is read-only there)
            env = {"XDG_CACHE_HOME": "/tmp/bench-boot-cache", "PYTHONPYCACHEPREFIX": "/tmp/bench-boot-pycache",
                   "PYVMM_KIT_DIR": str(Path(kit()[0]).parent)}
            status = run_in_l1(Path(__file__).resolve(), l1_args, l1_json.name, env)
            text = Path(l1_json.name).read_text()
            if status != 0 or not text:
                print(f"bench_boot: the boot part in the nested KVM failed (status {status})", file=sys.stderr)
                return 1
            results["boot"] = json.loads(text)
    print(table(results))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench_boot: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
