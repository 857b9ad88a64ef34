"""Network namespaces for tests: every tap and address a test uses lives in one it made itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid

import pytest


def usable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


@contextlib.contextmanager
def namespace():
    """A fresh namespace with loopback up; deleted afterwards, also on failure."""
    reason = usable()
    if reason:
        pytest.skip(reason)
    name = f"pvt-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
