"""What each endpoint does: a request -> (status, JSON body), on the API thread.

    GET /vm               state, uptime, configuration, vCPUs, devices
    GET /vm/counters      per device and per vCPU counters
    PUT /vm/pause         stop the vCPUs (409 unless running)
    PUT /vm/resume        let them run again (409 unless paused)
    PUT /vm/shutdown      ask the guest to power off (the ACPI power button)
    PUT /vm/reboot        reset the VM and boot it again
    PUT /vm/kill          stop the VM now
    GET /vm/balloon       the balloon's target, actual size and the guest's statistics
    PUT /vm/balloon       {"target": BYTES}: a new target

`Routes` reaches the VM through `current()`: the Machine of this boot, or None between two boots
(--on-reboot restart), when requests get 503."""

from __future__ import annotations

import logging
from typing import Callable

from .describe import vm_counters, vm_info
from .http import HttpError, Request

log = logging.getLogger(__name__)


class Routes:
    def __init__(self, current: Callable[[], object], *, name: str, api_socket: str | None = None):
        self.current = current
        self.name = name
        self.api_socket = api_socket
        self._table: dict[str, dict[str, Callable]] = {
            "/vm": {"GET": self.get_vm},
            "/vm/counters": {"GET": lambda m, r: (200, vm_counters(m))},
            "/vm/pause": {"PUT": self.pause},
            "/vm/resume": {"PUT": self.resume},
            "/vm/shutdown": {"PUT": self.shutdown},
            "/vm/reboot": {"PUT": self.reboot},
            "/vm/kill": {"PUT": self.kill},
            "/vm/balloon": {"GET": self.get_balloon, "PUT": self.put_balloon},
        }

    def handle(self, request: Request) -> tuple[int, dict]:
        """The status and JSON body for `request`; an HttpError from the parser is the caller's."""
        methods = self._table.get(request.path.rstrip("/") or "/")
        if methods is None:
            raise HttpError(404, f"no endpoint {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            raise HttpError(405, f"{request.method} {request.path}: use {' or '.join(methods)}")
        machine = self.current()
        if machine is None:
            raise HttpError(503, "the VM is between two boots; try again")
        return handler(machine, request)

    # -- the endpoints -----------------------------------------------------------------------
    def get_vm(self, machine, request: Request) -> tuple[int, dict]:
        return 200, vm_info(machine, name=self.name, api_socket=self.api_socket)

    def pause(self, machine, request: Request) -> tuple[int, dict]:
        return self._change_state(machine, machine.pause)

    def resume(self, machine, request: Request) -> tuple[int, dict]:
        return self._change_state(machine, machine.resume)

    def _change_state(self, machine, change) -> tuple[int, dict]:
        from ..machine import VmStateError

        try:
            change()
        except VmStateError as e:
            raise HttpError(409, str(e)) from None
        return 200, {"state": machine.state}

    def shutdown(self, machine, request: Request) -> tuple[int, dict]:
        if machine.state == "paused":
            raise HttpError(409, "the VM is paused: resume it first, or kill it")
        if not machine.request_shutdown():  # (Machine.request_shutdown: the ACPI power button)
            raise HttpError(409, "the guest cannot be asked to power off: it has no ACPI power button "
                                 "(a --program guest), or the VM is stopping")
        return 202, {"state": machine.state, "requested": "shutdown"}

    def reboot(self, machine, request: Request) -> tuple[int, dict]:
        machine.request_reboot()
        return 202, {"state": machine.state, "requested": "reboot"}

    def kill(self, machine, request: Request) -> tuple[int, dict]:
        machine.kill()
        return 200, {"state": machine.state}

    def get_balloon(self, machine, request: Request) -> tuple[int, dict]:
        try:
            return 200, machine.balloon_info()
        except ValueError as e:
            raise HttpError(404, str(e)) from None

    def put_balloon(self, machine, request: Request) -> tuple[int, dict]:
        body = request.json()
        if not isinstance(body, dict) or set(body) != {"target"}:
            raise HttpError(400, 'the body must be {"target": BYTES}')
        target = body["target"]
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise HttpError(400, "target must be a whole number of bytes, 0 or more")
        if machine.balloon is None:
            raise HttpError(404, "this VM has no balloon (--balloon)")
        try:
            machine.set_balloon_target(target)
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        return 200, machine.balloon_info()
