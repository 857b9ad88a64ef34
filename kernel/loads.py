"""Loads into guest RAM that run beside the rest of a VM's set-up.

    loads = BackgroundLoads()
    load_linux(mem, kernel, initrd, loads=loads)   # returns at once; the bytes are still moving
    ... create devices ...
    loads.wait()                                   # all in guest RAM, or the first failure raised

The kernel's segments and the initrd go into guest RAM by sendfile (vmm/memory.py
GuestMemory.load_file), which releases the GIL: each in a thread of its own, they move side by side
while the main thread goes on.  Whoever starts loads must `wait` before the guest runs, and also
before giving up on an error of its own (`raise_errors=False`): nothing may write guest memory after.
"""

from __future__ import annotations

import threading
from typing import BinaryIO, Callable


class BackgroundLoads:
    def __init__(self):
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._files: list[BinaryIO] = []

    def run(self, load: Callable[[], None]) -> None:
        """Start `load()` in a thread; a failure is raised again by wait()."""
        def body():
            try:
                load()
            except BaseException as e:
                self._errors.append(e)

        thread = threading.Thread(target=body, name="pyvmm-load", daemon=True)
        thread.start()
        self._threads.append(thread)

    def close_when_done(self, file: BinaryIO) -> None:
        """`file`, which a load reads, is closed by wait()."""
        self._files.append(file)

    def wait(self, raise_errors: bool = True) -> None:
        """Join every load, close their files; raise the first failure (unless `raise_errors` is false:
        on the way out of another error)."""
        for thread in self._threads:
            thread.join()
        self._threads = []
        for file in self._files:
            file.close()
        self._files = []
        if self._errors and raise_errors:
            error, self._errors = self._errors[0], []
            raise error
