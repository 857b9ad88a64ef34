"""The host side of the serial console: where guest output goes, where input comes from.

Output goes to a file descriptor (stdout or a file).  Input comes from stdin; when
stdin is a terminal it is put in raw mode (restored on every exit path) and
Ctrl-A x quits, as in QEMU (Ctrl-A Ctrl-A sends a literal Ctrl-A, Ctrl-A h helps).
"""

from __future__ import annotations

import atexit
import os
import sys
import termios
import threading
import tty

ESCAPE = 0x01  # Ctrl-A
HELP = b"\r\nC-a x  quit pyvmm\r\nC-a C-a  send C-a\r\nC-a h  this help\r\n"


class OutputSink:
    """Thread-safe writer of guest console bytes to a file descriptor."""

    def __init__(self, fd: int, *, close: bool = False):
        self.fd = fd
        self._close = close
        self._lock = threading.Lock()
        self.bytes_written = 0

    @classmethod
    def to_file(cls, path: str) -> "OutputSink":
        return cls(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644), close=True)

    def __call__(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    continue
                except OSError:
                    return  # the reader went away (closed pipe): drop console output, keep the VM
                view = view[n:]
                self.bytes_written += n

    def close(self) -> None:
        if self._close and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TerminalInput:
    """Reads stdin for the guest; raw mode on a tty; the Ctrl-A escape."""

    def __init__(self, fd: int, *, feed, quit, echo):
        self.fd = fd
        self.feed = feed  # bytes -> None: into the UART
        self.quit = quit  # () -> None
        self.echo = echo  # bytes -> None: messages to the user's terminal
        self.is_tty = os.isatty(fd)
        self._saved = None
        self._escape = False
        self.eof = False

    def __enter__(self) -> "TerminalInput":
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            atexit.register(self.restore)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            return
        self.feed(self.filter(data) if self.is_tty else data)

    def filter(self, data: bytes) -> bytes:
        """Strip and act on Ctrl-A escapes; returns what goes to the guest."""
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    self.quit()
                    break
                if b == ESCAPE:
                    out.append(ESCAPE)
                elif b in (ord("h"), ord("?")):
                    self.echo(HELP)
                continue
            if b == ESCAPE:
                self._escape = True
                continue
            out.append(b)
        return bytes(out)


def stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return None
