"""The driver guest's job protocol (tests/support/driver.py <-> tests/guest/driver/job.h), and
that the guest builds cleanly into an ELF pyvmm's program loader accepts."""

import re
import shutil
import subprocess

import pytest

from kernel.elf import ET_EXEC, parse_elf
from tests.support import driver as D
from vmm.memory import GuestMemory

JOB_H = D.DRIVER_DIR / "job.h"
needs_gcc = pytest.mark.skipif(not D.have_gcc(), reason="gcc is needed to build the driver guest")


# ---- encoding and decoding -------------------------------------------------------------------
def test_cmd_layout_is_64_bytes_at_the_agreed_offsets():
    c = D.Cmd(op=0x11, dev=2, sector=0x1122334455667788, length=0x99, buffer=0x4000000, queue=3, depth=4,
              count=0xAABBCCDD00112233, result=0x101, aux=0x80000001, value=0xFEDCBA9876543210)
    raw = c.pack()
    assert len(raw) == D.CMD_SIZE == 64
    field = lambda off, n: int.from_bytes(raw[off:off + n], "little")  # noqa: E731
    assert (field(0, 4), field(4, 4), field(8, 8), field(16, 8), field(24, 8)) == (
        0x11, 2, 0x1122334455667788, 0x99, 0x4000000)
    assert (field(32, 4), field(36, 4), field(40, 8), field(48, 4), field(52, 4), field(56, 8)) == (
        3, 4, 0xAABBCCDD00112233, 0x101, 0x80000001, 0xFEDCBA9876543210)
    assert D.Cmd.unpack(raw) == c


def test_job_header():
    cmds = [D.report(7), D.blk_init(), D.poweroff()]
    raw = D.encode_job(cmds, tsc_khz=2_500_000, timeout_ms=1234, quiet=True)
    assert len(raw) == 64 + 3 * 64
    assert raw[:4] == b"PVJB"
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 64, 4)]
    assert words[:9] == [D.JOB_MAGIC, 1, 3, D.R_NOT_RUN, 0, 0, 2_500_000, 1234, D.JOB_F_QUIET]
    assert words[9:] == [0] * 7
    assert [D.Cmd.unpack(raw, 64 + 64 * i) for i in range(3)] == cmds
    assert all(c.result == D.R_NOT_RUN for c in cmds)  # "not run" until the guest says otherwise


def test_decode_reads_what_the_guest_wrote():
    raw = bytearray(D.encode_job([D.blk_init(event_idx=True), D.blk_read(8, 4096, 0x4000000)]))
    raw[12:24] = (0x101).to_bytes(4, "little") + (2).to_bytes(4, "little") + (1).to_bytes(4, "little")
    init = D.Cmd.unpack(raw, 64)
    init.result, init.value, init.count, init.sector, init.aux = 0, 0x130007244, 0x120007244, 16384, 0xF
    raw[64:128] = init.pack()
    rd = D.Cmd.unpack(raw, 128)
    rd.result, rd.value, rd.aux = D.R_IOERR, 1, 1
    raw[128:192] = rd.pack()
    job = D.decode_job(bytes(raw))
    assert (job.status, job.cmds_done, job.progress) == (0x101, 2, 1)
    assert not job.ok
    i, r = job.cmds
    assert i.ok and i.device_features == 0x130007244 and i.driver_features == 0x120007244
    assert i.capacity == 16384 and i.device_status == 0xF
    assert not r.ok and r.error == "virtio IOERR" and r.name == "blk-read"
    with pytest.raises(AssertionError, match="virtio IOERR"):
        job.check()


def test_decode_rejects_a_foreign_block_and_encode_a_too_long_job():
    with pytest.raises(ValueError, match="magic"):
        D.decode_job(bytes(128))
    with pytest.raises(ValueError, match="holds"):
        D.encode_job([D.nop()] * (D.JOB_MAX_CMDS + 1))
    assert D.JOB_MAX_CMDS == 16383


def test_job_round_trip_through_guest_memory():
    with GuestMemory(64 << 20) as mem:
        cmds = [D.report(1), D.blk_write(0, 1 << 20, D.DATA_START, depth=8)]
        D.write_job(mem, cmds, tsc_khz=1000)
        job = D.read_job(mem)
        assert job.cmds == cmds and job.status == D.R_NOT_RUN and job.cmds_done == 0
        mem.write_int(D.JOB_ADDR + 12, 4, 0)
        mem.write_int(D.JOB_ADDR + 16, 4, 2)
        for i in range(2):
            mem.write_int(D.JOB_ADDR + 64 + 64 * i + 48, 4, 0)
        assert D.read_job(mem).ok


def test_command_helpers_set_the_flags():
    c = D.blk_init(1, queues=2, queue_size=128, event_idx=True, indirect=True, msix=False, driver_ok=False,
                   config_to=0x3000000, cont=True)
    assert (c.op, c.dev, c.queue, c.depth, c.buffer) == (D.OP_BLK_INIT, 1, 2, 128, 0x3000000)
    assert c.aux == (D.F_INIT_EVENT_IDX | D.F_INIT_INDIRECT | D.F_INIT_NO_MSIX | D.F_INIT_NO_DRIVER_OK
                     | D.F_CONTINUE)
    r = D.blk_read(16, 4 << 20, D.DATA_START, depth=4, request_size=64 << 10, no_interrupt=True, seg_size=4096)
    assert (r.sector, r.length, r.buffer, r.depth, r.count) == (16, 4 << 20, D.DATA_START, 4, 64 << 10)
    assert r.aux == D.F_NO_INTERRUPT | (12 << D.F_SEG_SHIFT_POS)
    assert (r.aux & D.F_SEG_SHIFT_MASK) >> D.F_SEG_SHIFT_POS == 12
    b = D.blk_bench(1000, 4096, D.DATA_START, write=True, random=True, marks=True, depth=32)
    assert (b.count, b.length, b.depth) == (1000, 4096, 32)
    assert b.aux == D.F_WRITE | D.F_RANDOM | D.F_MARKS
    assert D.blk_write_zeroes(0, 4096, unmap=True).aux == D.F_UNMAP
    assert D.blk_garbage(D.GARBAGE_LOOP, wait_ms=50, cont=True).aux == D.GARBAGE_LOOP | D.F_CONTINUE
    assert D.report(0x1_0000_0001).value == 1
    with pytest.raises(ValueError):
        D.blk_read(0, 512, D.DATA_START, seg_size=3000)
    with pytest.raises(ValueError):
        D.blk_garbage(D.GARBAGE_MAX + 1)


def test_result_text():
    assert D.result_text(D.R_OK) == "ok"
    assert D.result_text(D.R_NO_DEVICE) == "no such device"
    assert D.result_text(D.R_VIRTIO_STATUS + 7) == "virtio status 7"
    assert D.result_text(0x777) == "error 0x777"


# ---- the C side agrees -----------------------------------------------------------------------
def _c_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9A-Fa-f]+|\d+)(?:u|ul|ull|UL|ULL|u)?\b",
                         JOB_H.read_text(), re.M):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def test_every_constant_in_job_h_matches_the_python_side():
    defines = _c_defines()
    assert len(defines) > 60
    mismatched = {k: (v, getattr(D, k, None)) for k, v in defines.items() if getattr(D, k, None) != v}
    assert not mismatched


@needs_gcc
def test_c_structs_have_the_python_layout(tmp_path):
    fields = ["op", "dev", "sector", "length", "buffer", "queue", "depth", "count", "result", "aux", "value"]
    hfields = ["magic", "version", "ncmds", "status", "cmds_done", "progress", "tsc_khz", "timeout_ms", "flags"]
    src = tmp_path / "layout.c"
    src.write_text('#include <stdio.h>\n#include <stddef.h>\n#include "job.h"\nint main(void) {\n'
                   + "".join(f'printf("cmd.{f} %zu %zu\\n", offsetof(struct cmd, {f}), '
                             f'sizeof(((struct cmd *)0)->{f}));\n' for f in fields)
                   + "".join(f'printf("job.{f} %zu %zu\\n", offsetof(struct job, {f}), '
                             f'sizeof(((struct job *)0)->{f}));\n' for f in hfields)
                   + 'printf("job.cmds %zu 0\\n", offsetof(struct job, cmds));\nreturn 0; }\n')
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(D.DRIVER_DIR), "-o", str(exe), str(src)], check=True)
    got = dict((name, (int(o), int(s))) for name, o, s in
               (line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                        check=True).stdout.splitlines()))
    # the Python structs, field by field
    expected, off = {}, 0
    for f, ch in zip(fields, D.CMD.format.lstrip("<")):
        size = {"I": 4, "Q": 8}[ch]
        expected[f"cmd.{f}"] = (off, size)
        off += size
    for i, f in enumerate(hfields):
        expected[f"job.{f}"] = (4 * i, 4)
    expected["job.cmds"] = (D.JOB_HEADER_SIZE, 0)
    assert got == expected


# ---- the guest builds ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver_elf(tmp_path_factory):
    if not D.have_gcc():
        pytest.skip("gcc is needed to build the driver guest")
    return D.build_driver(tmp_path_factory.mktemp("driver"))


def test_guest_builds_with_wall_werror_into_a_loadable_elf(driver_elf):
    image = parse_elf(driver_elf.read_bytes())
    assert image.e_type == ET_EXEC
    assert image.low >= 0x400000                    # above pyvmm's page tables and stacks
    assert image.high <= D.ARENA_START              # below the guest's arena
    assert "-Wall" in D.CFLAGS and "-Werror" in D.CFLAGS and "-mgeneral-regs-only" in D.CFLAGS


def test_guest_uses_no_sse_registers(driver_elf):
    if not shutil.which("objdump"):
        pytest.skip("objdump not installed")
    text = subprocess.run(["objdump", "-d", str(driver_elf)], capture_output=True, text=True, check=True).stdout
    assert "xmm" not in text and "ymm" not in text


def test_build_is_cached_and_reports_compiler_errors(driver_elf, tmp_path):
    mtime = driver_elf.stat().st_mtime_ns
    assert D.build_driver(driver_elf.parent) == driver_elf and driver_elf.stat().st_mtime_ns == mtime
    with pytest.raises(RuntimeError, match="building the driver guest failed"):
        D.build_driver(tmp_path, extra_cflags=["-include", "/nonexistent.h"])
