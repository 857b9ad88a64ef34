"""Entropy for virtio-rng: the host's getrandom(2), straight into guest memory.

`EntropySource` is what virtio/rng.py expects; `HostEntropy` fills memoryviews of guest RAM
with libc's getrandom through ctypes (Python's os.getrandom returns a new bytes object, one
copy more per request).  Flags 0: the urandom pool, which blocks only until the host's pool is
first initialised at boot.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Protocol, Sequence

_libc = ctypes.CDLL(None, use_errno=True)
_getrandom = _libc.getrandom  # glibc 2.25+
_getrandom.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
_getrandom.restype = ctypes.c_ssize_t


class EntropySource(Protocol):
    def fill(self, views: Sequence[memoryview]) -> int:
        """Fill every byte of `views` with random bytes; return the bytes written (raises OSError)."""


class HostEntropy:
    """getrandom(2) into each view, looping over short returns (it gives at most 32 MiB - 1 a call)."""

    def fill(self, views: Sequence[memoryview]) -> int:
        total = 0
        for view in views:
            length = len(view)
            if not length:
                continue
            target = (ctypes.c_char * length).from_buffer(view)
            base = ctypes.addressof(target)
            done = 0
            try:
                while done < length:
                    n = _getrandom(base + done, length - done, 0)
                    if n < 0:
                        err = ctypes.get_errno()
                        if err == errno.EINTR:
                            continue
                        raise OSError(err, f"getrandom: {os.strerror(err)}")
                    done += n
            finally:
                del target  # the export of the guest mapping ends here
            total += length
        return total
