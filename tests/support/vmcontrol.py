"""`pyvmm run` in a child process that a test drives through the Python API while the guest runs.

pyvmm has no management channel yet (a later issue's API will expose Machine's methods); until
then a test that must act on a running VM - change the balloon's target, read its statistics -
runs this instead of vmm.cli: the same options, the same set-up and seccomp filter (installed as
`pyvmm run` does, after set-up), the guest's console on stdout, and a control thread calling the
Machine's methods for commands on stdin, one per line, each answered by one line on stderr:

    balloon-target BYTES    Machine.set_balloon_target(BYTES)    -> VMCONTROL {"ok": true}
    balloon-info            Machine.balloon_info()               -> VMCONTROL {...}

    python -m tests.support.vmcontrol --mem 768M --balloon stats=1 --append 'pyvmm.cmd=...'

`memfd_resident(pid)` measures the guest RAM the host holds for a pyvmm process: the blocks of its
guest RAM memfd (/proc/PID/fd), what punching holes gives back."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading

REPLY = "VMCONTROL "
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


def _answer(machine, line: str) -> dict:
    words = line.split()
    if words[:1] == ["balloon-target"] and len(words) == 2:
        machine.set_balloon_target(int(words[1]))
        return {"ok": True}
    if words == ["balloon-info"]:
        return machine.balloon_info()
    return {"error": f"unknown command {line!r}"}


def _serve(machine) -> None:
    for line in sys.stdin:
        try:
            reply = _answer(machine, line.strip())
        except (ValueError, OSError) as err:
            reply = {"error": str(err)}
        sys.stderr.write(REPLY + json.dumps(reply) + "\n")
        sys.stderr.flush()


def main(argv: list[str]) -> int:
    from vmm import cli, config
    from vmm.hostcheck import kernel_mode_native
    from vmm.machine import Machine

    args = cli.build_parser().parse_args(["run", *argv])
    logging.basicConfig(level=logging.WARNING, format="pyvmm: %(message)s")
    cfg = config.from_args(args)
    kvm = cli.open_kvm()
    config.check_cpus(cfg, kvm.max_vcpus())
    cfg = dataclasses.replace(cfg, kernel_mode_native=kernel_mode_native(kvm))
    machine = Machine(cfg, kvm=kvm, console_in=None)
    cli.lock_down(cfg.seccomp)
    threading.Thread(target=_serve, args=(machine,), name="vmcontrol", daemon=True).start()
    try:
        return machine.run()
    finally:
        machine.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
