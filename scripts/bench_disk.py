#!/usr/bin/env python3
"""Disk throughput: pyvmm's virtio-blk driven by the driver guest, against the host's own limit
(fio on the same file, same request sizes and depths) and QEMU's virtio-blk-pci driven by the same
driver guest where QEMU can run it here.

    python3 scripts/bench_disk.py [--dirs /dev/shm,/var/tmp] [--size 1G] [--json bench-disk.json]
                                  [--profile] [--no-qemu]

Workloads (as the issue names them): sequential read and write with 1 MiB requests, 16 in flight;
random read and write with 4 KiB requests, 32 in flight.  Prints a table and writes a JSON file.
Not a test: these machines are noisy, so nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import driver as D  # noqa: E402
from vmm.config import DiskSpec, VmConfig, parse_size  # noqa: E402
from vmm.machine import Machine  # noqa: E402

MiB = 1 << 20


@dataclass
class Workload:
    name: str
    write: bool
    random: bool
    request: int
    depth: int
    requests: int  # how many requests the guest issues (and fio: --number_ios)


def workloads(size: int, small_requests: int) -> list[Workload]:
    big = size // MiB
    return [
        Workload("seq-read-1M-qd16", False, False, MiB, 16, big),
        Workload("seq-write-1M-qd16", True, False, MiB, 16, big),
        Workload("rand-read-4K-qd32", False, True, 4096, 32, small_requests),
        Workload("rand-write-4K-qd32", True, True, 4096, 32, small_requests),
    ]


@dataclass
class Result:
    where: str
    workload: str
    runner: str  # pyvmm, fio (host limit), qemu
    seconds: float
    mb_s: float
    iops: float
    cpu_s_per_gb: float | None
    note: str = ""


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_image(path: Path, size: int) -> None:
    """A fully written image (holes would make reads unrealistically cheap)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


# -- pyvmm ----------------------------------------------------------------------------------
def run_pyvmm(driver: str, image: Path, w: Workload, profile: cProfile.Profile | None, log: Path) -> Result:
    m = Machine(VmConfig(program=driver, console=f"file:{log}", mem_size=256 * MiB,
                         disks=[DiskSpec(str(image), queues=1)]))
    try:
        dev = m.disks[0]
        if profile is not None:  # profile the device's I/O thread, request by request
            plain = dev.process_queue

            def profiled(index: int) -> None:
                profile.enable()
                try:
                    plain(index)
                finally:
                    profile.disable()

            dev.process_queue = profiled
        khz = D.guest_tsc_khz(m)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        job = D.run_driver(m, [
            D.blk_init(event_idx=True, indirect=True, queues=1),
            D.blk_bench(w.requests, w.request, D.DATA_START, write=w.write, random=w.random, depth=w.depth),
        ], timeout=600, timeout_ms=120_000, tsc_khz=khz, quiet=True).check()
        cpu1, wall1 = cpu_seconds(), time.perf_counter()
    finally:
        m.close()
    cycles = job.cmds[1].value
    seconds = cycles / (khz * 1000) if khz else wall1 - wall0
    total = w.requests * w.request
    # process CPU over the whole run (VM set-up included): an upper bound per GB
    return Result(image.parent.as_posix(), w.name, "pyvmm", seconds, total / seconds / 1e6, w.requests / seconds,
                  (cpu1 - cpu0) / (total / 1e9))


# -- the host's own limit ---------------------------------------------------------------------
def run_fio(image: Path, w: Workload) -> Result:
    rw = {(False, False): "read", (True, False): "write", (False, True): "randread", (True, True): "randwrite"}
    cmd = ["fio", "--name=limit", f"--filename={image}", f"--rw={rw[w.write, w.random]}", f"--bs={w.request}",
           f"--iodepth={w.depth}", "--ioengine=io_uring", "--direct=0", f"--size={image.stat().st_size}",
           f"--number_ios={w.requests}", "--randrepeat=0", "--norandommap", "--output-format=json",
           "--invalidate=0"]  # read the page cache as pyvmm does, not the disk under it
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if w.write else "read"]
    seconds = side["runtime"] / 1000
    total = side["io_bytes"]
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * seconds
    return Result(image.parent.as_posix(), w.name, "fio (host)", seconds, total / seconds / 1e6,
                  side["total_ios"] / seconds, cpu / (total / 1e9), "io_uring, buffered, page cache kept")


def median(runs: list[Result]) -> Result:
    """The run with the median throughput (these machines are noisy)."""
    return sorted(runs, key=lambda r: r.mb_s)[len(runs) // 2]


# -- QEMU -----------------------------------------------------------------------------------
def run_qemu(image: Path, w: Workload, work: Path) -> Result:
    import importlib.util

    spec = importlib.util.spec_from_file_location("qemu_driver", ROOT / "scripts" / "qemu_driver.py")
    if spec is None or not (ROOT / "scripts" / "qemu_driver.py").exists():
        raise RuntimeError("scripts/qemu_driver.py is not there")
    q = importlib.util.module_from_spec(spec)
    sys.modules["qemu_driver"] = q  # dataclasses look their module up there
    spec.loader.exec_module(q)
    return q.bench_result(image, w, work, Result)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", default="/dev/shm,/var/tmp", help="where to put the image (comma-separated)")
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="image size (default 1G)")
    ap.add_argument("--small-requests", type=int, default=100_000, help="4 KiB requests per random run")
    ap.add_argument("--json", default="bench-disk.json", help="where to write the results")
    ap.add_argument("--profile", action="store_true", help="profile the I/O thread on the 4 KiB random read run")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-"))
    driver = str(D.build_driver(work))
    results: list[Result] = []
    notes: list[str] = []
    profile_text = ""
    try:
        for where in args.dirs.split(","):
            image = Path(where) / f"pyvmm-bench-{os.getpid()}.img"
            print(f"== {image} ({args.size >> 20} MiB)", file=sys.stderr)
            make_image(image, args.size)
            try:
                for w in workloads(args.size, args.small_requests):
                    results.append(median([run_pyvmm(driver, image, w, None, work / "console.log")
                                           for _ in range(args.repeat)]))
                    if args.profile and w.name.startswith("rand-read"):  # a separate, slower run
                        prof = cProfile.Profile()
                        run_pyvmm(driver, image, w, prof, work / "console.log")
                        s = io.StringIO()
                        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
                        profile_text += f"--- {where} {w.name}: I/O thread, by own time\n{s.getvalue()}"
                    if shutil.which("fio"):
                        results.append(median([run_fio(image, w) for _ in range(args.repeat)]))
                    if not args.no_qemu:
                        try:
                            results.append(median([run_qemu(image, w, work) for _ in range(args.repeat)]))
                        except Exception as e:  # say why, once
                            note = f"QEMU not measured: {e}"
                            if note not in notes:
                                notes.append(note)
                    print(f"   {w.name}: done", file=sys.stderr)
            finally:
                image.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_table(results)
    for n in notes:
        print(n)
    if profile_text:
        print(profile_text)
    Path(args.json).write_text(json.dumps({"results": [asdict(r) for r in results], "notes": notes,
                                           "ratios": ratios(results)}, indent=2))
    print(f"wrote {args.json}")
    return 0


def ratios(results: list[Result]) -> list[dict]:
    out = []
    for r in results:
        if r.runner != "pyvmm":
            continue
        for other in results:
            if other.where == r.where and other.workload == r.workload and other.runner != "pyvmm":
                out.append({"where": r.where, "workload": r.workload, "vs": other.runner,
                            "ratio": round(r.mb_s / other.mb_s, 3) if other.mb_s else None})
    return out


def print_table(results: list[Result]) -> None:
    print(f"{'where':<10} {'workload':<20} {'runner':<11} {'MB/s':>9} {'IOPS':>10} {'CPU s/GB':>9}  vs pyvmm")
    for r in results:
        base = next((p for p in results if p.runner == "pyvmm" and p.where == r.where and p.workload == r.workload),
                    None)
        ratio = f"{base.mb_s / r.mb_s:.2f}x" if base and r.runner != "pyvmm" and r.mb_s else ""
        cpu = f"{r.cpu_s_per_gb:.2f}" if r.cpu_s_per_gb is not None else "-"
        print(f"{r.where:<10} {r.workload:<20} {r.runner:<11} {r.mb_s:9.0f} {r.iops:10.0f} {cpu:>9}  {ratio}")


if __name__ == "__main__":
    sys.exit(main())
