"""The guest RAM the host holds for a pyvmm process: the blocks of its guest RAM memfd
(/proc/PID/fd), what punching holes (the balloon, free page reporting) gives back."""

from __future__ import annotations

import os

RAM_MEMFD = "/memfd:pyvmm-ram"


def memfd_resident(pid: int) -> int:
    """Bytes allocated to the guest RAM memfd of process `pid`."""
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith(RAM_MEMFD):
                return os.stat(f"{fd_dir}/{name}").st_blocks * 512
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"process {pid} has no guest RAM memfd")
