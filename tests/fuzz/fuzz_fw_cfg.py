"""Fuzz target: fw_cfg (vmm/devices/fw_cfg.py): selector and data port accesses, and DMA
transfers whose control blocks the input lays out in guest memory.

    python -m tests.fuzz.fuzz_fw_cfg [libFuzzer flags] [tests/fuzz/corpus/fuzz_fw_cfg]

Items: the signature, ID and directory, two legacy items, a read-only and a writable file.
Asserts:
  * every read fits its size; the signature and the items never change but the writable file
    (whose length never changes either);
  * a DMA transfer writes guest memory only in its control word (4 bytes at the block) and,
    for a READ, inside [address, address + length); a WRITE or SKIP only the control word;
    nothing outside RAM (the memory's guards);
  * the control word left is 0 or the error bit.
"""

from __future__ import annotations

import struct

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.guestmem import CheckedMemory
    from tests.fuzz.ops import accesses
    from vmm.devices import fw_cfg as fc

RAM = 0x4000
MEM = CheckedMemory(RAM)
ITEMS = {0x05: b"\x01\x00", 0x8003: bytes(range(40))}
FILES = {"etc/fuzz-ro": bytes(range(200)), "etc/fuzz-rw": bytes(64)}
CONTROLS = (fc.FW_CFG_DMA_CTL_READ, fc.FW_CFG_DMA_CTL_WRITE, fc.FW_CFG_DMA_CTL_SKIP, 0)


def _device() -> fc.FwCfg:
    fw = fc.FwCfg(MEM)
    for selector, data in ITEMS.items():
        fw.add_item(selector, data)
    fw.add_file("etc/fuzz-ro", FILES["etc/fuzz-ro"])
    fw.add_file("etc/fuzz-rw", FILES["etc/fuzz-rw"], writable=True)
    return fw


def _address(fdp: atheris.FuzzedDataProvider) -> int:
    return fdp.ConsumeIntInRange(0, RAM + 32) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def _dma(fdp: atheris.FuzzedDataProvider, fw: fc.FwCfg) -> None:
    """Lay out a control block, start it through the DMA registers, check what it wrote."""
    block = _address(fdp)
    control = CONTROLS[fdp.ConsumeIntInRange(0, 3)] | (fdp.ConsumeIntInRange(0, 0x22) << 16 | fc.FW_CFG_DMA_CTL_SELECT
                                                        if fdp.ConsumeBool() else 0)
    if not fdp.ConsumeIntInRange(0, 7):
        control = fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
    length = fdp.ConsumeIntInRange(0, 300) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
    address = _address(fdp)
    if MEM.contains(block, 16):
        MEM.pack(fc.DMA_ACCESS, block, control, length, address)
    before = MEM.snapshot()
    if fdp.ConsumeBool():
        fw.write(fc.DMA_OFFSET, 8, int.from_bytes((block & (1 << 64) - 1).to_bytes(8, "big"), "little"))
    else:
        for offset, half in ((fc.DMA_OFFSET, block >> 32), (fc.DMA_LOW_OFFSET, block & 0xFFFFFFFF)):
            fw.write(offset, 4, int.from_bytes((half & 0xFFFFFFFF).to_bytes(4, "big"), "little"))
    allowed = [(block, 4)]
    if control & fc.FW_CFG_DMA_CTL_READ and MEM.contains(block, 16):
        allowed.append((address, length))
    MEM.check_writes(before, allowed, "a fw_cfg DMA transfer")
    if MEM.contains(block, 4) and MEM.snapshot() != before:
        check(struct.unpack(">I", MEM.read(block, 4))[0] in (0, fc.FW_CFG_DMA_CTL_ERROR), "control word left")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    MEM.clear()
    fw = _device()
    for op in accesses(fdp, [(4, fc.SELECTOR_OFFSET, fc.SELECTOR_OFFSET + 1), (4, fc.DATA_OFFSET, fc.DATA_OFFSET),
                             (1, 0, 12)], max_ops=32):
        if fdp.ConsumeIntInRange(0, 3):
            if op.write and op.offset == fc.SELECTOR_OFFSET and fdp.ConsumeBool():
                fw.write(op.offset, 2, fdp.ConsumeIntInRange(0, 0x22) | fdp.ConsumeIntInRange(0, 3) << 14)
            else:
                op.apply(fw)
        else:
            _dma(fdp, fw)
    fw.write(fc.SELECTOR_OFFSET, 2, fc.FW_CFG_SIGNATURE)
    check(bytes(fw.read(fc.DATA_OFFSET, 1) for _ in range(4)) == fc.SIGNATURE, "the signature changed")
    check(fw.file_data("etc/fuzz-ro") == FILES["etc/fuzz-ro"], "a read-only file changed")
    check(len(fw.file_data("etc/fuzz-rw")) == len(FILES["etc/fuzz-rw"]), "a writable file changed length")
    for selector, item in ITEMS.items():
        fw.write(fc.SELECTOR_OFFSET, 2, selector)
        check(bytes(fw.read(fc.DATA_OFFSET, 1) for _ in item) == item, f"item {selector:#x} changed")


if __name__ == "__main__":
    harness.main(one_input)
