"""The driver guest's job protocol (tests/support/driver.py <-> tests/guest/driver/job.h), and
that the guest builds cleanly into an ELF pyvmm's program loader accepts."""

import re
import struct
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


# ---- virtio-net ops ----------------------------------------------------------------------------
def test_net_op_codes_follow_blk_and_match_the_guest_names():
    net_ops = {k: v for k, v in vars(D).items() if k.startswith("OP_NET_")}
    assert sorted(net_ops.values()) == list(range(0x20, 0x20 + len(net_ops)))
    assert D.OP_NET_INIT == 0x20 and D.OP_BLK_CONFIG == 0x1B     # blk codes unchanged
    # main.c's op_name() says the same names as OP_NAMES (console lines <-> Cmd.name)
    main_c = (D.DRIVER_DIR / "main.c").read_text()
    named = {m.group(1): m.group(2) for m in re.finditer(r'case (OP_[A-Z_]+): return "([a-z-]+)";', main_c)}
    assert set(net_ops) <= set(named)
    assert all(D.OP_NAMES[getattr(D, k)] == v for k, v in named.items())


def test_net_init_helper():
    c = D.net_init(1, pairs=2, queue_size=128, offloads=True, mrg_rxbuf=True, event_idx=True, mq=True,
                   rx_pool=0x9000000, rx_buf_size=4096, rx_buffers=64, rx_seg_size=1024, cont=True)
    assert (c.op, c.dev, c.queue, c.depth, c.buffer, c.length, c.count) == (
        D.OP_NET_INIT, 1, 2, 128, 0x9000000, 4096, 64)
    assert c.aux == (D.F_INIT_EVENT_IDX | D.ALL_OFFLOADS | D.F_NET_MRG_RXBUF | D.F_NET_CTRL_VQ | D.F_NET_MQ
                     | (10 << D.F_NET_RX_SEG_SHIFT_POS) | D.F_CONTINUE)
    assert D.ALL_OFFLOADS == 0x3F0
    assert D.net_init(guest_tso4=True, msix=False, driver_ok=False).aux == (
        D.F_NET_GUEST_TSO4 | D.F_INIT_NO_MSIX | D.F_INIT_NO_DRIVER_OK)
    assert D.net_init().queue == 1 and D.net_init().aux == 0
    with pytest.raises(ValueError):
        D.net_init(pairs=D.NET_MAX_PAIRS + 1)
    with pytest.raises(ValueError):
        D.net_init(rx_seg_size=1000)


def test_net_init_outputs_decode():
    c = D.Cmd(D.OP_NET_INIT, sector=0x0001_563412005452, queue=2 | 4 << 16, depth=256 | 1500 << 16,
              length=2048, buffer=0x8100000, value=1 << 32, count=1 << 32, aux=0xF)
    assert c.mac == bytes.fromhex("525400123456") and c.link_status == D.VIRTIO_NET_S_LINK_UP
    assert (c.pairs, c.max_pairs, c.queue_size, c.mtu) == (2, 4, 256, 1500)
    assert (c.rx_buf_size, c.rx_pool_end, c.device_status) == (2048, 0x8100000, 0xF)
    tx = D.Cmd(D.OP_NET_TX, value=10, sector=12345, count=15140)
    bench = D.Cmd(D.OP_NET_BENCH, value=12345, sector=10, count=15140)
    assert (tx.frames, tx.cycles, tx.frame_bytes) == (bench.frames, bench.cycles, bench.frame_bytes) == (
        10, 12345, 15140)


def test_net_tx_helpers_pack_the_header_fields():
    t = D.net_tx(D.DATA_START, 9014, 100, depth=8, csum=(34, 16), gso=D.VIRTIO_NET_HDR_GSO_TCPV4, mss=1448,
                 hdr_len=66, seq_offset=70, first_seq=0xFFFFFFFE, csum_fix=50, split_hdr=True, seg_size=4096,
                 no_interrupt=True)
    assert (t.op, t.buffer, t.length, t.count, t.depth) == (D.OP_NET_TX, D.DATA_START, 9014, 100, 8)
    assert t.sector == 34 | 16 << 16 | 1448 << 32 | 66 << 48
    assert t.value == 70 | 50 << 16 | 0xFFFFFFFE << 32
    assert t.aux == (D.F_NET_TX_CSUM | D.F_NET_TX_SEQ | D.F_NET_SPLIT_HDR | D.F_NO_INTERRUPT
                     | 12 << D.F_SEG_SHIFT_POS | D.VIRTIO_NET_HDR_GSO_TCPV4 << D.F_NET_GSO_POS)
    plain = D.net_tx(D.DATA_START, 60)
    assert (plain.sector, plain.value, plain.aux, plain.count, plain.depth) == (0, 0, 0, 1, 1)
    lst = D.net_tx_list(D.DATA_START, 5, area_size=1 << 20, depth=4, cont=True)
    assert (lst.op, lst.count, lst.length, lst.aux) == (D.OP_NET_TX, 5, 1 << 20, D.F_NET_TX_LIST | D.F_CONTINUE)
    b = D.net_bench_tx(1000, 1514, D.DATA_START, depth=64, marks=True)
    assert (b.op, b.count, b.length, b.depth, b.aux) == (D.OP_NET_BENCH, 1000, 1514, 64, D.F_MARKS)
    for bad in (dict(seq_offset=58), dict(seq_offset=10, csum_fix=41), dict(mss=1 << 16), dict(gso=256)):
        with pytest.raises(ValueError):
            D.net_tx(D.DATA_START, 60, **bad)
    # the flag bits of the TX ops do not collide with the blk request flags they share
    shared = D.F_NO_INTERRUPT | D.F_DIRECT | D.F_ALWAYS_KICK | D.F_MARKS | D.F_SEG_SHIFT_MASK | D.F_CONTINUE
    own = D.F_NET_TX_CSUM | D.F_NET_TX_SEQ | D.F_NET_TX_LIST | D.F_NET_SPLIT_HDR | D.F_NET_BENCH_RX | D.F_NET_GSO_MASK
    assert shared & own == 0
    assert (D.F_NET_ECHO | D.F_NET_TIMEOUT_OK | D.F_NET_ANY_QUEUE) & shared == 0


def test_net_rx_and_other_helpers():
    r = D.net_rx(10, D.DATA_START, max_bytes=1 << 20, area_size=2 << 20, queue=1, echo=True, timeout_ms=500,
                 timeout_ok=True)
    assert (r.op, r.count, r.length, r.buffer, r.sector, r.queue, r.depth) == (
        D.OP_NET_RX, 10, 1 << 20, D.DATA_START, 2 << 20, 1, 500)
    assert r.aux == D.F_NET_ECHO | D.F_NET_TIMEOUT_OK
    assert D.net_rx(timeout_ok=True, any_queue=True).aux == D.F_NET_TIMEOUT_OK | D.F_NET_ANY_QUEUE
    with pytest.raises(ValueError):
        D.net_rx()
    br = D.net_bench_rx(max_bytes=100 << 20, any_queue=True)
    assert (br.op, br.count, br.length, br.aux) == (D.OP_NET_BENCH, 0, 100 << 20, D.F_NET_BENCH_RX | D.F_NET_ANY_QUEUE)
    assert D.net_stop_rx(1).aux == 0 and D.net_resume_rx(1).aux == D.F_NET_RESUME
    assert D.net_stop_rx().op == D.net_resume_rx().op == D.OP_NET_STOP_RX
    c = D.net_ctrl(D.VIRTIO_NET_CTRL_MQ, D.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, D.DATA_START, 2)
    assert (c.op, c.value, c.buffer, c.length) == (D.OP_NET_CTRL, 4, D.DATA_START, 2)
    assert D.net_ctrl(1, 1).value == 0x101
    with pytest.raises(ValueError):
        D.net_ctrl(0, 0, D.DATA_START, D.NET_CTRL_MAX_DATA + 1)
    assert [D.net_config(buffer=5).op, D.net_reset().op, D.net_status().op] == [
        D.OP_NET_CONFIG, D.OP_NET_RESET, D.OP_NET_STATUS]


def test_net_records_round_trip_and_alignment():
    hdr = D.NetHdr(flags=D.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=D.VIRTIO_NET_HDR_GSO_TCPV6, hdr_len=74,
                   gso_size=1440, csum_start=54, csum_offset=16, num_buffers=0)
    assert len(hdr.pack()) == 12 and D.NetHdr.unpack(hdr.pack()) == hdr
    raw = D.pack_net_records([b"\x01" * 61, (b"\x02" * 64, hdr), D.NetFrame(b"", D.NetHdr()), b"\x03" * 3])
    # 24-byte head, data, zero padding to 8
    assert len(raw) == (24 + 64) + (24 + 64) + 24 + 32
    assert raw[24 + 61:88] == bytes(3)
    head = D.NET_REC.unpack_from(raw, 88)
    assert head[0] == 64 and head[4] == hdr.pack()
    frames = D.parse_net_records(raw)
    assert [f.data for f in frames] == [b"\x01" * 61, b"\x02" * 64, b"", b"\x03" * 3]
    assert frames[1].hdr == hdr and frames[0].hdr == D.NetHdr()
    assert len(D.parse_net_records(raw, 2)) == 2
    with pytest.raises(ValueError, match="runs past"):
        D.parse_net_records(raw[:-8])
    with pytest.raises(ValueError, match="head"):
        D.parse_net_records(raw[:10])
    # RX fields: as the guest writes them
    rec = D.NET_REC.pack(5, 1, 3, 17, D.NetHdr(num_buffers=3).pack()) + b"hello" + bytes(3)
    (f,) = D.parse_net_records(rec)
    assert (f.data, f.queue, f.nbufs, f.used_len, f.hdr.num_buffers) == (b"hello", 1, 3, 17, 3)
    with GuestMemory(128 << 20) as mem:
        mem.write(D.DATA_START, rec)
        done = D.Cmd(D.OP_NET_RX, length=len(rec))
        assert D.read_net_records(mem, D.DATA_START, done) == [f]
        assert D.read_net_records(mem, D.DATA_START, D.Cmd(D.OP_NET_RX)) == []


def _udp4_frame(payload: bytes) -> bytes:
    """Ethernet + IPv4 + UDP with correct checksums."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    udp_len = 8 + len(payload)
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst))
    ip[10:12] = (~D.csum16(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    udp = bytearray(struct.pack(">HHHH", 1234, 5678, udp_len, 0) + payload)
    pseudo = src + dst + struct.pack(">BBH", 0, 17, udp_len)
    udp[6:8] = ((~D.csum16(pseudo + bytes(udp)) & 0xFFFF) or 0xFFFF).to_bytes(2, "big")
    return bytes.fromhex("02000000000202000000000108 00".replace(" ", "")) + bytes(ip) + bytes(udp)


def _udp4_ok(frame: bytes) -> bool:
    ip, udp = frame[14:34], frame[34:]
    pseudo = ip[12:20] + struct.pack(">BBH", 0, 17, len(udp))
    return D.csum16(ip) == 0xFFFF and D.csum16(pseudo + udp) == 0xFFFF


@pytest.mark.parametrize("seq_offset", [42, 43, 50, 61])
def test_seq_frame_keeps_the_udp_checksum_right(seq_offset):
    template = _udp4_frame(bytes(range(7, 7 + 40)))
    assert len(template) == 82 and _udp4_ok(template)
    seen = set()
    for i, first in [(0, 0), (1, 0), (5, 0xFFFFFFFD), (1000, 0x12345678), (3, 0xFEDCBA98)]:
        f = D.seq_frame(template, i, seq_offset, first_seq=first, csum_fix=40)
        assert f[seq_offset:seq_offset + 4] == ((first + i) & 0xFFFFFFFF).to_bytes(4, "big")
        changed = {k for k in range(len(f)) if f[k] != template[k]}
        assert changed <= set(range(seq_offset, seq_offset + 4)) | {40, 41}
        assert _udp4_ok(f), (i, first)
        seen.add(f)
    assert len(seen) == 5
    # without csum_fix only the four bytes change; a zero UDP checksum stays zero
    f = D.seq_frame(template, 7, seq_offset)
    assert [k for k in range(len(f)) if f[k] != template[k]] == [
        k for k in range(seq_offset, seq_offset + 4) if f[k] != template[k]]
    nocsum = template[:40] + b"\0\0" + template[42:]
    assert D.seq_frame(nocsum, 9, seq_offset, csum_fix=40)[40:42] == b"\0\0"


@needs_gcc
def test_c_net_record_has_the_python_layout(tmp_path):
    src = tmp_path / "rec.c"
    fields = ["len", "queue", "nbufs", "used_len", "hdr"]
    src.write_text('#include <stdio.h>\n#include <stddef.h>\n#include "job.h"\nint main(void) {\n'
                   + "".join(f'printf("%zu %zu\\n", offsetof(struct net_rec, {f}), '
                             f'sizeof(((struct net_rec *)0)->{f}));\n' for f in fields)
                   + 'printf("%zu 0\\n", sizeof(struct net_rec));\nreturn 0; }\n')
    exe = tmp_path / "rec"
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(D.DRIVER_DIR), "-o", str(exe), str(src)], check=True)
    got = [tuple(map(int, line.split())) for line in
           subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()]
    assert got == [(0, 4), (4, 2), (6, 2), (8, 4), (12, 12), (D.NET_REC_SIZE, 0)]
    assert D.NET_REC.format == "<IHHI12s"


@needs_gcc
def test_the_guests_sequence_patch_agrees_with_seq_frame(tmp_path):
    # net.c's seq_patch/csum_update compiled for the host (the rest of the guest left unlinked)
    src = tmp_path / "seq.c"
    src.write_text('#include "net.c"\n#include <stdio.h>\n'
                   "int main(void) {\n"
                   "    unsigned hdr[4]; unsigned long long i; static u8 f[65536];\n"
                   "    while (fread(hdr, 4, 4, stdin) == 4 && fread(&i, 8, 1, stdin) == 1) {\n"
                   "        if (fread(f, 1, hdr[0], stdin) != hdr[0]) return 1;\n"
                   "        struct txrun t = {0};\n"
                   "        t.seq_off = hdr[1]; t.csum_off = hdr[2]; t.seq = hdr[3];\n"
                   "        seq_patch(&t, f, i);\n"
                   "        fwrite(f, 1, hdr[0], stdout);\n"
                   "    }\n"
                   "    return 0;\n}\n")
    exe = tmp_path / "seq"
    subprocess.run(["gcc", "-O2", "-w", "-no-pie", "-I", str(D.DRIVER_DIR), "-o", str(exe), str(src),
                    "-Wl,--unresolved-symbols=ignore-all"], check=True)
    template = _udp4_frame(bytes(range(100, 164)))
    cases = [(off, fix, first, i) for off in (42, 43, 60, 101) for fix in (0, 40)
             for first, i in ((0, 0), (0xFFFFFFFF, 1), (0x8000FFFF, 77), (123, 4000))]
    cases.append((20, 40, 5, 6))           # the IPv4 header's addresses (the UDP pseudo header)
    cases.append((44, 34, 7, 8))           # a checksum field elsewhere (no RFC 1624 special case)
    stdin = b"".join(struct.pack("<4IQ", len(template), off, fix, first, i) + template
                     for off, fix, first, i in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, check=True).stdout
    n = len(template)
    for k, (off, fix, first, i) in enumerate(cases):
        assert out[k * n:(k + 1) * n] == D.seq_frame(template, i, off, first_seq=first, csum_fix=fix), (off, fix)
