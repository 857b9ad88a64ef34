"""Where the vCPU threads wait while the VM is paused.

`Machine.pause()` closes the gate and kicks every vCPU out of KVM_RUN (immediate_exit and the
kick signal); each vCPU thread, seeing the gate closed before its next KVM_RUN, parks on the
gate's condition and is counted, so the pause returns only once no vCPU runs guest code.  The
gate opens on resume (or when the VM stops); a parked thread clears its vCPU's immediate_exit
before it leaves, then looks at the lifecycle again, so a stop that comes meanwhile is never
lost (the stop sets `stopping` before it kicks).
"""

from __future__ import annotations

import threading


class PauseGate:
    def __init__(self):
        self._cond = threading.Condition()
        self.closed = False  # read by the vCPU threads without the lock, once per exit
        self._parked = 0

    @property
    def parked(self) -> int:
        return self._parked

    def close(self) -> None:
        with self._cond:
            self.closed = True

    def open(self) -> None:
        with self._cond:
            self.closed = False
            self._cond.notify_all()

    def wake(self) -> None:
        """Let parked threads look at the lifecycle again (the VM is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def park(self, vcpu, lifecycle) -> None:
        """On a vCPU thread: wait while the gate is closed and the VM not stopping."""
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self.closed and not lifecycle.stopping:
                self._cond.wait()
            self._parked -= 1
            vcpu.clear_stop()

    def wait_parked(self, count, timeout: float) -> bool:
        """Until `count()` threads are parked (count: a callable, as threads may end meanwhile)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._parked >= count(), timeout)
