"""Fakes for the fuzz targets: a disk in a bytearray, interrupt routing without KVM.

`MemDisk` is a BlockBackend (virtio/backends) over a bytearray that checks, through a
CheckedMemory, that every memoryview it is handed lies inside the buffers a target allows,
and fails an operation with OSError when told to.  `FakeIrq` / `FakeVector` give MSI-X
what vmm/irq.py's IrqRouter gives (allocate, program, trigger, pending, set_line) with no
eventfd: they record the state for the targets to check.
"""

from __future__ import annotations

import errno


class MemDisk:
    """A BlockBackend of `size` bytes; `readable` / `writable`: where views may lie (set by the
    target per input), `fail`: the errno of the next operations (0: none)."""

    logical_block_size = physical_block_size = 512
    supports_discard = supports_write_zeroes = True

    def __init__(self, mem, size: int, *, read_only: bool = False):
        self.mem, self.size, self.read_only = mem, size, read_only
        self.data = bytearray(size)
        self.readable: list[tuple[int, int]] = []
        self.writable: list[tuple[int, int]] = []
        self.fail = 0

    def _check(self, offset: int, length: int) -> None:
        if not 0 <= offset <= offset + length <= self.size:
            raise AssertionError(f"disk access {offset:#x}+{length:#x} beyond the disk's {self.size:#x}")
        if self.fail:
            raise OSError(self.fail, "injected")

    def readv(self, views, offset: int) -> None:
        self.mem.check_views(views, self.writable, "a disk read's buffer")
        self._check(offset, sum(len(v) for v in views))
        for v in views:
            v[:] = self.data[offset : offset + len(v)]
            offset += len(v)

    def writev(self, views, offset: int) -> None:
        self.mem.check_views(views, self.readable, "a disk write's buffer")
        self._check(offset, sum(len(v) for v in views))
        for v in views:
            self.data[offset : offset + len(v)] = v
            offset += len(v)

    def flush(self) -> None:
        self._check(0, 0)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, True)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)

    def close(self) -> None:
        pass


INJECTED_ERRORS = (0, errno.EIO, errno.ENOSPC)


class FakeVector:
    """An MSI vector: its programmed (address, data, masked), triggers delivered or pending."""

    def __init__(self) -> None:
        self.address = self.data = 0
        self.masked = True
        self.pending = False
        self.delivered = 0

    def program(self, address: int, data: int, masked: bool) -> None:
        self.address, self.data, self.masked = address, data, masked
        if self.pending and not masked and address:
            self.pending = False
            self.delivered += 1

    def trigger(self) -> None:
        if self.masked or not self.address:
            self.pending = True
        else:
            self.delivered += 1


class FakeIrq:
    def __init__(self) -> None:
        self.vectors: list[FakeVector] = []
        self.lines: dict[int, bool] = {}

    def allocate(self) -> FakeVector:
        self.vectors.append(FakeVector())
        return self.vectors[-1]

    def commit(self) -> None:
        pass

    def set_line(self, gsi: int, level: bool) -> None:
        self.lines[gsi] = level


class FakeVm:
    """ioeventfd registrations by (address, length), as KVM would refuse a duplicate."""

    def __init__(self) -> None:
        self.ioeventfds: dict[tuple[int, int], int] = {}

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch=None, pio=False, deassign=False) -> None:
        key = (addr, length)
        if deassign:
            if self.ioeventfds.pop(key, None) != fd:
                raise AssertionError(f"ioeventfd at {addr:#x} removed but not registered")
        else:
            if key in self.ioeventfds:
                raise AssertionError(f"ioeventfd at {addr:#x} registered twice")
            self.ioeventfds[key] = fd


def tiny_device_class():
    """A VirtioDevice of 2 queues and 8 config bytes with no threads (virtio/device.py imported
    late, so a target's instrumentation sees it first)."""
    from virtio.device import VirtioDevice

    class TinyDevice(VirtioDevice):
        device_id = 2
        name = "fuzz-virtio"

        def __init__(self, mem):
            super().__init__(mem, num_queues=2, queue_size=64, features=1 << 3)
            self.config = bytearray(range(8))

        def config_bytes(self) -> bytes:
            return bytes(self.config)

        def write_config(self, offset: int, size: int, value: int) -> None:
            if 0 <= offset and offset + size <= len(self.config):
                self.config[offset : offset + size] = value.to_bytes(size, "little")

    return TinyDevice
