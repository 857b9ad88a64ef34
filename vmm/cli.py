"""pyvmm's command line.  The only place that prints user errors and picks exit codes:
0 the guest powered off (or was stopped on request), 1 the guest or pyvmm failed,
2 bad input from the user (one line on stderr, never a traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import signal
import sys
import time

from . import config
from .config.flags import add_run_options

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, status 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyvmm", description="A KVM virtual machine monitor with paravirtual virtio devices.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="boot a guest", description=(
        "Boot a Linux kernel (bzImage or vmlinux) with an initrd, a freestanding program in guest user mode, "
        "or (--firmware) a PC BIOS that boots the --disk images or a NIC's option ROM. "
        "With no --kernel, boots the default guest kit (scripts/guestkit.py build). "
        "On the serial console, Ctrl-A x quits."))
    add_run_options(run)
    run.add_argument("--config", metavar="FILE", help=(
        "read the options from a TOML file: each key an option's name without its dashes (cpus = 2, "
        "cpuid-mask = \"none\", disk = [\"a.img\", \"b.img,readonly=on\"], rng = true); flags given too win "
        "(a repeated flag replaces the file's array)"))
    run.add_argument("--print-config", action="store_true", help=(
        "print the options given (--config's file and the flags) as a config file and exit"))

    sub.add_parser("check", help="what this host's KVM supports, and whether guest kernel mode is native")

    ls = sub.add_parser("ls", help="the running VMs of this user: name, pid, state, vCPUs, memory, uptime")
    ls.add_argument("--json", action="store_true", help="as JSON")
    for verb, what in (("info", "a VM's state, uptime, configuration, vCPUs and devices"),
                       ("pause", "stop a VM's vCPUs (and its clock) until resume"),
                       ("resume", "let a paused VM run again"),
                       ("stop", "ask the guest to power off (the ACPI power button)"),
                       ("kill", "stop a VM now, whatever the guest is doing"),
                       ("counters", "per virtio device requests, bytes, errors, notifications, interrupts; "
                                    "per vCPU exits by kind")):
        verb_parser = sub.add_parser(verb, help=what)
        verb_parser.add_argument("name", metavar="NAME", help="the VM's --name (as `pyvmm ls` shows), or its API socket's path")
        verb_parser.add_argument("--json", action="store_true", help="the API's answer as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    main_start_wall = time.time()  # for --stats=PATH
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                            format="pyvmm: %(message)s")
        if args.command == "check":
            return cmd_check()
        if args.command == "run":
            return cmd_run(args, main_start_wall)
        if args.command in ("ls", "info", "pause", "resume", "stop", "kill", "counters"):
            return cmd_verb(args)
        build_parser().print_help()
        return EXIT_USAGE
    except (UsageError, config.ConfigError) as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def cmd_verb(args) -> int:
    """`pyvmm ls` and the verbs on one VM, through its API socket."""
    from .api import verbs

    try:
        if args.command == "ls":
            print(verbs.ls(args.json))
        else:
            print(verbs.vm_verb(args.command, args.name, args.json))
    except verbs.VerbError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return e.code
    return EXIT_OK


def open_kvm():
    from .kvm import Kvm

    path = os.environ.get("PYVMM_KVM", "/dev/kvm")
    try:
        return Kvm(path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: this host has no KVM (load kvm-intel or kvm-amd)") from None
    except PermissionError:
        raise UsageError(f"no permission to open {path} (add yourself to the kvm group or run as root)") from None


def cmd_check() -> int:
    from .hostcheck import report

    kvm = open_kvm()
    print(report(kvm))
    return EXIT_OK


def cmd_run(args, main_start_wall: float | None = None) -> int:
    from kernel.errors import KernelImageError

    if args.print_config:
        options, _ = config.checked_options(args)
        from .config.file import to_toml

        sys.stdout.write(to_toml(options))
        return EXIT_OK
    cfg = config.from_args(args)
    # First the kernel starts moving into guest RAM, while the rest is imported and made (vmm/early.py);
    # a kernel or initrd that cannot be loaded is reported after the host's and the options' errors.
    early = kernel_error = None
    try:
        early = start_early(cfg)
    except KernelImageError as e:
        kernel_error = e
    try:
        from .hostcheck import kernel_mode_native

        kvm = open_kvm()
        config.check_cpus(cfg, kvm.max_vcpus())
        if kernel_error is not None:
            raise UsageError(str(kernel_error))
        if not cfg.program:
            cfg = dataclasses.replace(cfg, kernel_mode_native=kernel_mode_native(kvm))
    except BaseException:
        if early is not None:
            early.abandon()
        raise
    current: list = [None]  # the Machine of this boot, for the API (None between boots)
    servers: list = []  # the API's server: started once the first boot's vCPUs run (not ~11 ms before)

    def start_api_once() -> None:
        if not servers:
            servers.append(start_api(cfg, lambda: current[0]))

    try:
        return run_boots(args, cfg, kvm, current, main_start_wall, early, on_started=start_api_once)
    finally:
        for server in servers:
            if server is not None:
                server.close()


def start_api(cfg, current):
    """The management API's server (vmm/api) on its socket, or None with --api-socket off."""
    from .api.routes import Routes
    from .api.server import ApiServer, ApiSocketBusy
    from .config.api import DEFAULT_NAME, api_socket_path

    try:
        path = api_socket_path(cfg.api_socket, cfg.name, os.getpid())
    except config.ConfigError as e:
        if cfg.api_socket is not None:
            raise
        # the default place cannot serve (an unusable runtime directory, a --name no file can
        # have): the VM runs all the same, without its API
        print(f"pyvmm: note: running without the management API: {e}", file=sys.stderr)
        return None
    if path is None:
        return None
    name = cfg.name if cfg.name != DEFAULT_NAME else f"{DEFAULT_NAME}-{os.getpid()}"
    try:
        server = ApiServer(path, Routes(current, name=name, api_socket=path))
    except ApiSocketBusy as e:
        raise UsageError(f"--api-socket: {e}") from None
    except OSError as e:
        raise UsageError(f"--api-socket {path}: {e.strerror or e}") from None
    server.start()
    return server


def run_boots(args, cfg, kvm, current: list, main_start_wall: float | None, early=None, on_started=None) -> int:
    """Boot the VM (again after a reset with --on-reboot restart); its exit status.  `early`: the first
    boot's guest RAM with its kernel on the way in (vmm/early.py), taken over by its Machine;
    `on_started()`: called once each boot's vCPUs run."""
    from kernel.errors import KernelImageError
    from virtio.backends.errors import ImageError, PortError, TapError
    from .console import stdin_fd
    from .firmware.image import FirmwareError
    from .hostcheck import EMULATED_WARNING
    from .machine import Machine

    first = True
    console_in = stdin_fd() if cfg.console == "stdio" else None
    stopped: list[int] = []  # a signal between two boots (--on-reboot restart) ends the loop
    profiles: list[list] = []  # --stats: each boot's exit profiles, one per vCPU
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    while not stopped:
        try:
            machine, early = Machine(cfg, kvm=kvm, console_in=console_in, early=early), None
        except (KernelImageError, ImageError, TapError, FirmwareError, PortError) as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            # A stop signal while a VM is being made (between two boots, --on-reboot restart) can
            # interrupt one of its ioctls (KVM_CREATE_VM: EINTR): the stop asked for, not an error.
            if e.errno == errno.EINTR and stopped:
                break
            raise
        if first:
            if cfg.kernel_mode_native is False:
                print(f"pyvmm: note: this host's KVM emulates guest kernel mode: {EMULATED_WARNING}", file=sys.stderr)
            for note in machine.notes:
                print(f"pyvmm: note: {note}", file=sys.stderr)
            lock_down(cfg.seccomp)  # set-up done, the vCPUs not yet started; a restart's VM is made under it
            first = False
        if stopped:  # a stop signal while the VM was being made (run() takes them from here on)
            machine.close()
            break
        current[0] = machine
        try:
            status = machine.run(on_started=on_started)
            message, reset = machine.lifecycle.message, machine.lifecycle.reset_requested
            forced = machine.graceful_stop.timed_out  # SIGTERM's graceful stop ran out of time
        finally:
            current[0] = None
            machine.close()
            stopped += machine.signals  # one that came as the guest reset itself ends the loop all the same
        if cfg.stats:
            profiles.append(machine.exit_stats)
            report_exit_stats(cfg, profiles, main_start_wall)
        if reset and (cfg.on_reboot == "restart" or machine.lifecycle.restart) and not stopped:
            why = "--on-reboot restart" if cfg.on_reboot == "restart" else "a reboot asked through the API"
            print(f"\npyvmm: guest reset; booting it again ({why})", file=sys.stderr)
            continue
        if message and (status != 0 or args.verbose or reset or forced):  # a poweroff ends quietly
            print(f"\npyvmm: {message}", file=sys.stderr)
        return status
    return EXIT_OK


def start_early(cfg):
    """For a direct Linux boot, guest RAM with the kernel and initrd on their way in (vmm/early.py);
    KernelImageError where they cannot be loaded."""
    from .early import start_linux, wants_early_linux

    return start_linux(cfg) if wants_early_linux(cfg) else None


def lock_down(mode: str) -> None:
    """Install the --seccomp filter on the whole process, for the rest of its life; where the kernel
    cannot, or falls back, say so in one line on stderr and go on (a VMM that refused to start
    there would only push users to --seccomp off everywhere; with off, nothing is said)."""
    from . import seccomp

    try:
        note = seccomp.install(mode)
    except seccomp.SeccompUnavailable as e:
        note = f"running without a syscall filter: {e}"
    if note:
        print(f"pyvmm: note: {note}", file=sys.stderr)


def report_exit_stats(cfg, profiles: list[list], main_start_wall: float | None) -> None:
    """The last boot's exit profile on stderr; every boot's in the --stats=PATH file."""
    from . import exit_stats

    boot = f" of boot {len(profiles)}" if cfg.on_reboot == "restart" else ""
    tables = "\n".join(exit_stats.render_table(s) for s in profiles[-1])
    print(f"\npyvmm: exit profile{boot} (time in pyvmm: from KVM_RUN's return to the next KVM_RUN)\n{tables}",
          file=sys.stderr)
    if cfg.stats_json is not None:
        report = exit_stats.report_json(profiles, process_start_wall=exit_stats.process_start_wall(),
                                        main_start_wall=main_start_wall)
        try:
            exit_stats.write_report(cfg.stats_json, report)
        except OSError as e:
            raise UsageError(f"--stats: cannot write {cfg.stats_json}: {e.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
