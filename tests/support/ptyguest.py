"""pyvmm run on a pseudo-terminal, driven as a user at a terminal would: type lines, wait for text.

    guest = PtyGuest.start(["--console-device", "virtio"])
    guest.expect(b"PYVMM-READY", 180)
    guest.type("echo T''TY=$(tty)")              # the quotes keep our own typing from matching
    m = guest.expect_re(rb"TTY=(\\S+)", 30)
    guest.type("poweroff -f"); assert guest.wait(30) == 0
    guest.kill()                                    # in a finally: never leaves pyvmm behind
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PtyGuest:
    def __init__(self, pid: int, fd: int):
        self.pid, self.fd = pid, fd
        self.output = b""  # everything the terminal showed
        self._seen = 0  # where the next expect starts looking
        self.status: int | None = None

    @classmethod
    def start(cls, args: list[str], *, mem: str = "512M") -> "PtyGuest":
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "vmm.cli", "run", "--mem", mem, *args])
        return cls(pid, fd)

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], max(timeout, 0))[0]:
            return False
        try:
            self.output += os.read(self.fd, 65536)
        except OSError:  # pyvmm has exited
            return False
        return True

    def expect_re(self, pattern: bytes, timeout: float) -> re.Match:
        """The first match of `pattern` in what the terminal shows from here on."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.output, self._seen)
            if m:
                self._seen = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(left) and self.exited()):
                raise AssertionError(f"{pattern!r} not seen within {timeout} s; the terminal showed last:\n"
                                     f"{self.output[-3000:].decode(errors='replace')}")

    def expect(self, text: bytes, timeout: float) -> None:
        self.expect_re(re.escape(text), timeout)

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def exited(self) -> bool:
        if self.status is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def wait(self, timeout: float) -> int | None:
        """pyvmm's exit status, or None if it is still running after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.exited() and time.monotonic() < deadline:
            self._read(0.2)
        return self.status

    def kill(self) -> None:
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)
