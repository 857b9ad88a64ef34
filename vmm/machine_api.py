"""The Python API of a Machine, for tests and programs: `with Machine(cfg) as vm:` starts the VM
and hands it back while it runs beside the caller; waits on its console, commands in the kit
guest's shell, a graceful stop, its counters.  Errors (vmm/guest_console.py) carry the console's
last lines.

A mixin of vmm/machine.py's Machine: it uses its console, lifecycle, vCPU threads, state,
start(), resume(), kill() and close()."""

from __future__ import annotations

import os
import time

from .guest_console import VmError, VmTimeout


class PythonApi:
    def __enter__(self) -> "Machine":
        """Start the VM and hand it back; it runs until stop(), kill() or the end of the block."""
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.lifecycle.stop(0, "the with block ended")
        for t in self.threads:
            t.join(timeout=5)
        self.close()

    def _exit_code(self) -> int | None:
        """The exit status once the VM is stopping, else None."""
        return self.lifecycle.exit_code if self.lifecycle.stopping else None

    def wait_for(self, text: str, timeout: float = 60.0, *, start: int = 0) -> int:
        """Wait until the guest's console shows `text` (from console offset `start`); the offset
        past it.  VmTimeout, or VmStopped if the VM stops first, with the console's tail."""
        return self.console.wait_for(text, timeout, start=start, stopped=self._exit_code)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the VM to stop by itself (the guest powers off, crashes...); its exit status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            raise VmTimeout(f"the VM did not stop within {timeout:g} s", self.console.tail())
        return self.lifecycle.exit_code or 0

    def run_command(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run `command` in the kit guest's shell (on its console) -> (exit status, its output)."""
        tag = os.urandom(4).hex()
        begin, done = f"PYVMM-BEGIN-{tag}", f"PYVMM-DONE-{tag}"
        # Each marker is typed split by '' so that only what `echo` prints matches it, not the
        # terminal's echo of the typed line (which a line editor may also wrap or print again).
        start = self.console.offset
        self.console.write(f"echo {begin[:6]}''{begin[6:]}; {command}; echo {done[:6]}''{done[6:]}=$?\n")
        start = self.wait_for(begin, timeout, start=start)
        start = self.wait_for("\n", timeout, start=start)
        end = self.wait_for(f"{done}=", timeout, start=start)
        rest = self.wait_for("\n", timeout, start=end)
        status_text = self.console.between(end, rest).strip()
        output = self.console.between(start, end - len(done) - 1).replace("\r", "")
        try:
            status = int(status_text)
        except ValueError:
            raise VmError(f"{command!r}: no exit status after its output ({status_text!r})", self.console.tail()) from None
        return status, output.rstrip("\n")

    def stop(self, timeout: float = 30.0) -> int:
        """Ask the guest to power off (the ACPI power button) and wait; after `timeout`, or for a
        guest that cannot hear the button (a --program guest), stop it hard.  The exit status."""
        if self.state == "paused":
            self.resume()
        if self.request_shutdown():
            try:
                return self.wait(timeout)
            except VmTimeout:
                pass
        self.kill("stopped by the Python API")
        return self.wait(10)

    def counters(self) -> dict:
        """GET /vm/counters' answer: per virtio device and per vCPU."""
        from .api.describe import vm_counters

        return vm_counters(self)

