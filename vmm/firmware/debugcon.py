"""The debug console at port 0x402 (QEMU's isa-debugcon), where SeaBIOS writes its log."""

from __future__ import annotations

import logging
import threading

from .image import FirmwareError

log = logging.getLogger(__name__)

DEBUGCON_PORT = 0x402
DEBUGCON_READBACK = 0xE9  # what SeaBIOS's qemu_debug_preinit expects to read back


class DebugConsole:
    """QEMU's isa-debugcon at port 0x402: bytes written go to `sink`, a read returns 0xE9.

    `sink(bytes)` gets whole lines (and what is left at close)."""

    def __init__(self, sink):
        self._sink = sink
        self._line = bytearray()
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK if size == 1 else (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[:1] if offset == 0 else b""
        if not data:
            return
        with self._lock:
            self._line += data
            if data != b"\n" and len(self._line) < 4096:
                return
            line, self._line = bytes(self._line), bytearray()
        self._sink(line)

    def flush(self) -> None:
        with self._lock:
            line, self._line = bytes(self._line), bytearray()
        if line:
            self._sink(line)


def debug_sink(path: str | None):
    """Where firmware debug output goes: a file (--firmware-log), else the log at INFO (-v) with a
    'firmware:' prefix, else nowhere (None: leave the port unclaimed so the firmware skips it).
    Returns (sink, close) or None."""
    if path is not None:
        try:
            f = open(path, "ab", buffering=0)
        except OSError as e:
            raise FirmwareError(f"--firmware-log: cannot open {path}: {e.strerror}") from None
        return f.write, f.close
    if log.isEnabledFor(logging.INFO):
        return (lambda line: log.info("firmware: %s", line.decode("latin-1").rstrip("\r\n"))), (lambda: None)
    return None
