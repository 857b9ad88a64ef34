"""Running `pyvmm run` as a subprocess for the firmware tests: its console output collected with the
time since start, line by line and as it came, so tests can check what was printed and when."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)
    chunks: list[tuple[float, str]] = field(default_factory=list)  # the raw output as it came
    rc: int | None = None
    wall: float = 0.0

    def first(self, pattern: str) -> tuple[float, str] | None:
        rx = re.compile(pattern)
        for t, line in self.lines:
            if rx.search(line):
                return t, line
        return None

    def line_time(self, pattern: str) -> float | None:
        """When a whole (cleaned) line first matched `pattern`."""
        hit = self.first(pattern)
        return hit[0] if hit else None

    def time_of(self, pattern: str) -> float | None:
        """When the output first matched `pattern`, to the read: also inside a line not yet
        ended (iPXE prints its progress dots after "Configuring (net0 ...)")."""
        text, ends = "", []
        for t, chunk in self.chunks:
            text += chunk
            ends.append((len(text), t))
        m = re.search(pattern, text)
        if m is None:
            return None
        return next(t for end, t in ends if end >= m.end())

    def text(self) -> str:
        return "\n".join(f"{t:7.2f} {line}" for t, line in self.lines)


def clean(raw: bytes) -> str:
    text = raw.decode("latin-1").replace("\x08 \x08", "").replace("\r", "")
    return re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", text)  # SeaBIOS's sercon and iPXE's colours


def run_pyvmm(args: list[str], *, timeout: float, netns: str | None = None, stop_at: str | None = None) -> Run:
    """Run `pyvmm run ARGS` (in a network namespace if given), collecting stdout and stderr line by
    line with timestamps; kill it after `timeout` s or once a line matches `stop_at`."""
    cmd = [sys.executable, "-m", "vmm.cli", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    run = Run()
    start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    buf = b""
    stop = re.compile(stop_at) if stop_at else None
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                break
            ready, _, _ = select.select([p.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            now = time.monotonic() - start
            run.chunks.append((now, chunk.decode("latin-1")))
            *complete, buf = buf.split(b"\n")
            if stop and stop.search(clean(buf)):  # a line still without its newline
                complete.append(buf)
                buf = b""
            lines = [clean(raw) for raw in complete]
            run.lines.extend((now, line) for line in lines)
            if stop and any(stop.search(line) for line in lines):
                break
    finally:
        if buf:
            run.lines.append((time.monotonic() - start, clean(buf)))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        else:
            rest = p.stdout.read()
            if rest:
                run.lines.append((time.monotonic() - start, clean(rest)))
                run.chunks.append((time.monotonic() - start, rest.decode("latin-1")))
        p.stdout.close()
    run.rc = p.returncode
    run.wall = time.monotonic() - start
    return run


def report(title: str, steps: list[tuple[str, float | None]]) -> None:
    print(f"\n{title}")
    for name, t in steps:
        print(f"  {'-' if t is None else f'{t:6.2f}'} s  {name}")
