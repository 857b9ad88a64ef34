"""`pyvmm ls` and `pyvmm info|pause|resume|stop|kill|counters NAME`: one API call each, its
answer as a plain table or (--json) as JSON.  VerbError carries the exit status and the one line
the CLI prints: 2 for what the user got wrong (no such VM, a pause of a paused VM), 1 when the
VM fails or does not answer."""

from __future__ import annotations

import json
import os

from . import client
from .tables import counters_text, info_text, ls_table

# verb -> (method, target, what the VM is doing once it answered)
CALLS = {
    "info": ("GET", "/vm", None),
    "counters": ("GET", "/vm/counters", None),
    "pause": ("PUT", "/vm/pause", "paused"),
    "resume": ("PUT", "/vm/resume", "running"),
    "stop": ("PUT", "/vm/shutdown", "asked to power off"),
    "kill": ("PUT", "/vm/kill", "stopped"),
}


class VerbError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def ls(as_json: bool, directory: str | None = None) -> str:
    vms = client.list_vms(directory)
    if as_json:
        return json.dumps(vms, indent=1)
    return ls_table(vms) if vms else "no VMs running"


def vm_verb(verb: str, name: str, as_json: bool, directory: str | None = None) -> str:
    method, target, done = CALLS[verb]
    path = client.socket_of(name, directory)
    if not os.path.lexists(path):
        raise VerbError(2, f"no VM named {name} (no socket {path}; `pyvmm ls` lists the running ones)")
    try:
        reply = client.call(path, method, target)
    except client.VmNotRunning:
        raise VerbError(2, f"VM {name} is not running (its stale socket {path} was removed)") from None
    except client.VmNotAnswering as e:
        raise VerbError(1, f"VM {name} does not answer: {e}") from None
    except client.ApiError as e:
        raise VerbError(2 if e.status < 500 else 1, f"{name}: {e}") from None
    if as_json:
        return json.dumps(reply, indent=1)
    if verb == "info":
        return info_text(reply)
    if verb == "counters":
        return counters_text(reply)
    return f"{name}: {done}"
