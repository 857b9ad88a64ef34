"""The guest's console as a program sees it through the Python API: what the guest wrote (the
last KEEP bytes, and a wait for a text to appear), and a way to type into it.

    with Machine(cfg) as vm:
        vm.wait_for("PYVMM-READY", timeout=60)
        vm.console.write(b"uname -r\\n")
        print(vm.console.read())

It sits between the console device (the 16550A, or hvc0) and the sink --console names, so the
guest's output still goes where the user said; keeping it costs one call per write the device
makes.  Errors of the API (VmTimeout, VmStopped) carry the console's last lines."""

from __future__ import annotations

import threading
import time
from typing import Callable

KEEP = 1 << 20      # bytes of output kept
TAIL_LINES = 30     # console lines an error carries
FEED_WAIT = 0.002   # seconds between tries while the guest's receive buffer is full


class VmError(Exception):
    """The VM did not do what was asked; `tail` is the end of its console."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(f"{message}\n--- the guest's console, last lines ---\n{tail}" if tail else message)
        self.tail = tail


class VmTimeout(VmError):
    """A wait ran out of time."""


class VmStopped(VmError):
    """The VM stopped while something was expected of it."""

    def __init__(self, message: str, tail: str = "", exit_code: int | None = None):
        super().__init__(message, tail)
        self.exit_code = exit_code


class GuestConsole:
    def __init__(self, sink: Callable[[bytes], None]):
        self._sink = sink
        self._buf = bytearray()
        self._dropped = 0       # bytes that fell off the front of _buf (the stream's offset of _buf[0])
        self._read_at = 0       # stream offset read() has reached
        self._changed = threading.Condition()
        self._feed: Callable[[bytes], int] | None = None

    # -- what the console device calls ------------------------------------------------------
    def __call__(self, data: bytes) -> None:
        self._sink(data)
        with self._changed:
            self._buf += data
            if len(self._buf) > KEEP:
                cut = len(self._buf) - KEEP
                del self._buf[:cut]
                self._dropped += cut
            self._changed.notify_all()

    def connect_input(self, feed: Callable[[bytes], int]) -> None:
        """Where write() types: the device's feed(data) -> bytes taken."""
        self._feed = feed

    # -- the program's side --------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes the guest has written so far."""
        return self._dropped + len(self._buf)

    def text(self, start: int = 0) -> str:
        """What the guest wrote from stream offset `start` (as far as it is kept), as text."""
        with self._changed:
            return bytes(self._buf[max(0, start - self._dropped):]).decode("utf-8", "replace")

    def between(self, start: int, end: int) -> str:
        """What the guest wrote from stream offset `start` to `end`, as text."""
        with self._changed:
            begin = max(0, start - self._dropped)
            return bytes(self._buf[begin : max(begin, end - self._dropped)]).decode("utf-8", "replace")

    def read(self) -> str:
        """What the guest wrote since the last read()."""
        with self._changed:
            out = bytes(self._buf[max(0, self._read_at - self._dropped):])
            self._read_at = self.offset
        return out.decode("utf-8", "replace")

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.text().replace("\r", "").splitlines()[-lines:])

    def write(self, data: bytes | str, timeout: float = 10.0) -> None:
        """Type `data` into the guest's console, as fast as its receive buffer takes it."""
        if self._feed is None:
            raise VmError("this VM's console takes no input")
        data = data.encode() if isinstance(data, str) else bytes(data)
        deadline = time.monotonic() + timeout
        while data:
            taken = self._feed(data)
            data = data[taken:]
            if data:
                if time.monotonic() > deadline:
                    raise VmTimeout(f"the guest did not read its console input within {timeout:g} s", self.tail())
                time.sleep(FEED_WAIT)

    def wait_for(self, text: str, timeout: float, *, start: int = 0,
                 stopped: Callable[[], int | None] = lambda: None) -> int:
        """Wait until `text` appears in the output from stream offset `start`; the offset just
        past it.  VmTimeout, or VmStopped once `stopped()` gives an exit status."""
        needle = text.encode()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                begin = max(0, start - self._dropped)
                at = self._buf.find(needle, begin)
                if at >= 0:
                    return self._dropped + at + len(needle)
                code = stopped()
                if code is not None:
                    raise VmStopped(f"the VM stopped (exit status {code}) before {text!r} appeared", self.tail(),
                                    code)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmTimeout(f"{text!r} did not appear within {timeout:g} s", self.tail())
                self._changed.wait(min(left, 0.1))
